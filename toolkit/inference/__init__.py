"""Inference: how a patch becomes a prediction, for evaluation, export checks and slides.

A uint8 patch goes through the one pixel transform (:mod:`.transform`) into an
:class:`~.encoders.Encoder` (the checkpoint in PyTorch, its ONNX export or a TensorRT
engine, opened by :func:`~.choose.open_encoder` from the :mod:`.formats` table on the
device :mod:`.device` resolves); its embedding is matched against a bank's spot
embeddings (:func:`~.predict.match`: cosine top-k, inverse-square-distance weights)
and the weighted expression of those spots is the prediction (:func:`~.predict.predict`).
Spot embeddings for banks and image features come from :mod:`.embed`.

Importing this package loads neither torch, onnxruntime, tensorrt nor cupy.
"""

from __future__ import annotations

from mclx.inference.choose import open_encoder
from mclx.inference.formats import FORMATS, MAX_REL_ERR_FP32, MIN_COSINE, Format
from mclx.inference.predict import match, predict, to_host
from mclx.inference.transform import to_model_input

__all__ = [
    "FORMATS",
    "MAX_REL_ERR_FP32",
    "MIN_COSINE",
    "Format",
    "match",
    "open_encoder",
    "predict",
    "to_host",
    "to_model_input",
]
