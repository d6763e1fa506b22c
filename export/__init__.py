"""Export of the image encoder (DenseNet + projection head) to the formats that run it.

``mclx.export.exporter.export`` builds the rows of the formats table
(:mod:`mclx.inference.formats`) that it is asked for beside a checkpoint: ONNX FP32
(``onnx_export``), static INT8 ONNX and a TensorRT engine (``tensorrt_build``), each
opened by the inference layer and checked against PyTorch (``parity``) before it is
renamed into place. Importing this package loads neither onnx, onnxruntime, tensorrt
nor cupy.
"""

from __future__ import annotations
