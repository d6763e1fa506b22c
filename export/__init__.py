"""Export of the image encoder (DenseNet + projection head) and the backends that run it.

``mclx.export.exporter.export`` writes ONNX FP32 (and INT8, and a TensorRT engine) beside
a checkpoint, each checked against PyTorch; ``mclx.export.backends.create_backend`` opens
the best one for the runtime. Importing this package loads neither onnx, onnxruntime,
tensorrt nor cupy.
"""

from __future__ import annotations

from mclx.export.formats import FORMATS, MAX_REL_ERR_FP32, MIN_COSINE, artifact_path

__all__ = ["FORMATS", "MAX_REL_ERR_FP32", "MIN_COSINE", "artifact_path"]
