"""Export of the image encoder (DenseNet + projection head) to ONNX and TensorRT.

Not implemented yet: tracked by the export issue. Importing this package is cheap and
loads neither onnx, onnxruntime nor tensorrt.
"""

from __future__ import annotations

__all__: list[str] = []
