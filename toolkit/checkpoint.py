"""Self-describing checkpoints and the fingerprint that ties derived artifacts to them.

A checkpoint is a plain dict loadable with ``torch.load(weights_only=True)``::

    {"format": "mclx-checkpoint", "format_version": 3,
     "model": ModelCfg dict, "preprocess": PreprocessCfg dict,
     "provenance": {sections, epochs, seed, mclx version, ...},
     "fingerprint": sha256 of the weights (16 hex digits), "state_dict": {...}}
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mclx.artifacts import read_torch_artifact, require_keys
from mclx.config import ModelCfg, PreprocessCfg, from_dict, to_dict
from mclx.errors import FormatError, short
from mclx.files import atomic_path

FORMAT = "mclx-checkpoint"
# 2: the spot encoder's attention length is in the model config; 3: model configs carry
# CMRCNet's fusion fields (fusion_shared, mask_keep), which older readers do not know;
# 4: feature_norm (standardised frozen features). Files of versions 1 to 3 load: fields
# they lack take the defaults they were built with.
FORMAT_VERSION = 4


def _upgrade(payload: dict[str, Any]) -> dict[str, Any]:
    """A version-1 model config without ``seq_len``: version 1 embedded bank spots in
    runs of the training batch size, which it kept in the provenance."""
    model = payload["model"]
    if payload["format_version"] < 2 and "seq_len" not in model:
        train = payload.get("provenance", {}).get("train", {})
        model = {**model, "seq_len": int(train.get("batch_size", 128))}
    return {**payload, "model": model}


def fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of every tensor, sorted by name."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


@dataclass
class Checkpoint:
    """A loaded checkpoint: configs, provenance and the built model."""

    model: nn.Module
    model_cfg: ModelCfg
    preprocess: PreprocessCfg
    provenance: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""
    path: Path | None = None


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    preprocess: PreprocessCfg,
    provenance: dict[str, Any] | None = None,
) -> str:
    """Write ``model`` atomically to ``path``; return its fingerprint."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    fp = fingerprint(state)
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": to_dict(model.cfg),
        "preprocess": to_dict(preprocess),
        "provenance": dict(provenance or {}),
        "fingerprint": fp,
        "state_dict": state,
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return fp


def read_checkpoint_dict(path: str | os.PathLike) -> dict[str, Any]:
    """Load and validate the raw dict (no model built)."""
    path = Path(path)
    payload = read_torch_artifact(path, "checkpoint", expected=FORMAT, supported=FORMAT_VERSION)
    require_keys(path, "checkpoint", payload, _FIELDS)
    for key, kind in _FIELDS.items():
        if not isinstance(payload[key], kind):
            msg = f"{path}: checkpoint field '{key}' is a {type(payload[key]).__name__}"
            raise FormatError(msg)
    if not isinstance(payload.get("provenance", {}), dict):
        msg = f"{path}: checkpoint field 'provenance' is not a dict"
        raise FormatError(msg)
    bad = [k for k, v in payload["state_dict"].items() if not isinstance(v, torch.Tensor)]
    if bad:
        msg = f"{path}: checkpoint state_dict entry {str(bad[0])!r} is not a tensor"
        raise FormatError(msg)
    return payload


_FIELDS = {"model": dict, "preprocess": dict, "state_dict": dict, "fingerprint": str}


def _views(pre: PreprocessCfg, model_cfg: ModelCfg) -> PreprocessCfg:
    """``pre`` with the wide field of view of a ``--context-fov`` model, which
    checkpoints written before PreprocessCfg had ``views_um`` record in the model only."""
    wide = float(getattr(model_cfg, "context_fov_um", 0.0) or 0.0)
    if wide > 0 and not pre.views_um:
        return replace(pre, views_um=(wide,))
    return pre


def load_checkpoint(path: str | os.PathLike, *, map_location: str = "cpu") -> Checkpoint:
    """Rebuild the model from a checkpoint and check its fingerprint."""
    from mclx.models import create_model

    path = Path(path)
    payload = read_checkpoint_dict(path)
    try:
        model_cfg = from_dict(ModelCfg, _upgrade(payload)["model"])
        pre = _views(from_dict(PreprocessCfg, payload["preprocess"]), model_cfg)
        model = create_model(model_cfg, encoder_weights=None)
        model.load_state_dict(payload["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as exc:
        msg = f"{path}: checkpoint does not match its model config ({short(exc)})"
        raise FormatError(msg) from exc
    fp = fingerprint(payload["state_dict"])
    if fp != payload["fingerprint"]:
        msg = f"{path}: weights do not match the recorded fingerprint (corrupt file?)"
        raise FormatError(msg)
    model.to(map_location).eval()
    return Checkpoint(model, model_cfg, pre, payload.get("provenance", {}), fp, path)
