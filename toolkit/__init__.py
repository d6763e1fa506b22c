"""mclx: mclSTExp spatial gene expression prediction from H&E histology.

Data flow, one module each::

    data (her2st reader, preprocessing, patches) -> models (encoders, heads, mclSTExp,
    BLEEP, ST-Net) -> train -> checkpoint -> bank / export -> runtime -> predictions

``import mclx`` is cheap: torch, scanpy, onnxruntime, tensorrt, cupy and openslide are
imported only by the modules that need them.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mclx")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
