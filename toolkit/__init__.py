"""mclx: mclSTExp spatial gene expression prediction from H&E histology.

Data flow, one package or module each::

    data (readers of each layout, spot files, slides and images, preprocessing, patches)
    -> models (backbones, heads, mclSTExp, BLEEP, ST-Net, ...) -> training (recipe, loop,
    resumable state) -> checkpoint -> bank / export -> inference (encoders, retrieval)
    -> wsi (tiles, plan, reader pool, runtime, writers, cohorts) -> predictions
    -> evaluation (metrics, cross-validation, analyses) and viewer; cli drives them all.

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
