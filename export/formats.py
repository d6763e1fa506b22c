"""The table of export formats, read by the exporter and by the runtime alike.

Each row: the backend that runs it, the file suffix beside the checkpoint, where it can
run, and the precisions it offers. Artifacts carry one metadata dict (ONNX
``metadata_props``; a sidecar JSON for TensorRT engines, which stay plain engines).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Backend = Literal["torch", "onnxruntime", "tensorrt"]
PrecisionName = Literal["fp32", "fp16", "bf16", "int8"]

MIN_COSINE = 0.99  # reduced precision must keep embeddings this close to FP32
MAX_REL_ERR_FP32 = 1e-4  # FP32 exports must match PyTorch this closely


@dataclass(frozen=True)
class Format:
    name: str
    backend: Backend
    suffix: str
    gpu_only: bool
    precision: PrecisionName


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("torch", "torch", ".pt", False, "fp32"),
        Format("torch-bf16", "torch", ".pt", False, "bf16"),
        Format("onnx", "onnxruntime", ".onnx", False, "fp32"),
        Format("onnx-int8", "onnxruntime", ".int8.onnx", False, "int8"),
        Format("engine", "tensorrt", ".engine", True, "fp16"),
    )
}


def artifact_path(checkpoint: str | Path, fmt: str) -> Path:
    """Where format ``fmt`` of ``checkpoint`` lives: beside it, same stem."""
    ck = Path(checkpoint)
    return ck.with_name(ck.stem + FORMATS[fmt].suffix)


def report_path(checkpoint: str | Path) -> Path:
    """The export report beside a checkpoint: parity of every exported artifact."""
    ck = Path(checkpoint)
    return ck.with_name(ck.stem + ".export.json")


def read_report(checkpoint: str | Path) -> dict[str, Any]:
    path = report_path(checkpoint)
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def metadata(ck) -> dict[str, str]:
    """The metadata dict written into every artifact of checkpoint ``ck``."""
    from mclx import __version__
    from mclx.config import to_dict

    return {
        "mclx_artifact": "image-encoder",
        "mclx_version": __version__,
        "fingerprint": ck.fingerprint,
        "checkpoint": str(Path(ck.path).resolve()) if ck.path else "",
        "model": json.dumps(to_dict(ck.model_cfg)),
        "preprocess": json.dumps(to_dict(ck.preprocess)),
        "input": "images: float32 N x 3 x H x W, pixel scale of 'preprocess'",
        "output": "embeddings: float32 N x D",
    }
