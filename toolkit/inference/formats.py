"""The table of encoder formats, read by the exporter and by the runtime alike.

Each row says which backend runs the format, at which precision, where (``device``),
which file beside the checkpoint holds it (none for the checkpoint's own model), which
export options it accepts, and which exporter function builds it. ``mclx export`` loops
over the rows it is asked for (:mod:`mclx.export.exporter`); :func:`open_encoder` opens
a row's artifact, or picks the best row for ``--backend auto``. Exported artifacts
record their agreement with PyTorch in ``<stem>.export.json``, and ``auto`` skips any
that failed the parity gate (:func:`parity_held`).
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

MIN_COSINE = 0.99  # the gate where there is no task to judge (no measured expression)
# the gate on the task (mclx.export.gate), on held-back calibration spots against FP32:
# chosen from the measurements in docs/inference.md ("The parity gate")
TASK_GATE = {
    "topk_overlap": 0.5,  # mean share of FP32's top-k bank spots also retrieved
    "gene_corr_median": 0.9,  # median over genes of the prediction's correlation to FP32's
    "pcc_acg_drop": 0.005,  # PCC(ACG) against the measured expression, below FP32's
}
MAX_REL_ERR_FP32 = 1e-4  # FP32 exports must match PyTorch this closely


@dataclass(frozen=True)
class Format:
    """One way to run the image encoder.

    Attributes:
        name: the format's key (also its record in the export report).
        backend: ``torch``, ``onnxruntime``, ``openvino`` or ``tensorrt``.
        precision: ``fp32``, ``bf16``, ``fp16`` or ``int8``.
        suffix: file beside the checkpoint (``model.pt`` -> ``model.int8.onnx``); None
            for the checkpoint's own model.
        device: where it runs: ``any``, ``cpu`` only or ``cuda`` only.
        flag: the ``mclx export`` flag that asks for it (None: always built, if it has
            a builder).
        options: export options (``mclx export`` keywords) that only this row reads.
        builder: ``module:function`` of the exporter that writes it (imported on use, so
            that the runtime never loads the exporter), called as ``build(job, out)``
            and returning the precision it built.
        sidecars: suffixes of files written beside the artifact (``.engine.json``).
        reads: the row whose file this one runs (OpenVINO runs the FP32 ONNX file): it
            has no file, builder or flag of its own, and its parity is recorded when the
            file it reads is exported.
    """

    name: str
    backend: Literal["torch", "onnxruntime", "openvino", "tensorrt"]
    precision: Literal["fp32", "bf16", "fp16", "int8"]
    suffix: str | None = None
    device: Literal["any", "cpu", "cuda"] = "any"
    flag: str | None = None
    options: tuple[str, ...] = ()
    builder: str | None = None
    sidecars: tuple[str, ...] = ()
    reads: str | None = None

    def path(self, checkpoint: str | os.PathLike) -> Path:
        """Where this format of ``checkpoint`` lives: beside it, same stem."""
        if self.reads is not None:
            return FORMATS[self.reads].path(checkpoint)
        ck = Path(checkpoint)
        return ck if self.suffix is None else ck.with_name(ck.stem + self.suffix)

    @property
    def has_file(self) -> bool:
        """Whether it runs a file beside the checkpoint (its own, or the one it reads)."""
        return self.suffix is not None or self.reads is not None

    def runs_on(self, device: str) -> bool:
        from mclx.inference.device import is_cuda

        return self.device in ("any", "cuda" if is_cuda(device) else device)

    def build(self) -> Callable[..., Any]:
        """The exporter function ``build(job, out) -> precision built``."""
        if self.builder is None:
            msg = f"format {self.name} has no file to build"
            raise ValueError(msg)
        module, func = self.builder.split(":")
        return getattr(importlib.import_module(module), func)

    def open(self, checkpoint: str | os.PathLike, *, device: str = "cpu", ck: Any = None):
        """An encoder of this format for ``checkpoint`` (its file, or the model itself)."""
        if self.backend == "torch":
            from mclx.checkpoint import load_checkpoint
            from mclx.inference.encoders import TorchEncoder

            ck = ck or load_checkpoint(checkpoint)
            return TorchEncoder(ck, precision=self.precision, device=device)
        if self.backend == "openvino":
            from mclx.inference.openvino import OpenVinoEncoder

            return OpenVinoEncoder(self.path(checkpoint), precision=self.precision, device=device)
        return open_file(self.path(checkpoint), device=device)


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("torch", "torch", "fp32"),
        Format("torch-bf16", "torch", "bf16", device="cpu"),
        Format("torch-fp16", "torch", "fp16", device="cuda"),
        Format(
            "onnx",
            "onnxruntime",
            "fp32",
            ".onnx",
            options=("opset",),
            builder="mclx.export.onnx_export:build_onnx",
        ),
        Format(
            "onnx-int8",
            "onnxruntime",
            "int8",
            ".int8.onnx",
            flag="int8",
            builder="mclx.export.onnx_export:build_int8",
        ),
        Format(
            "engine",
            "tensorrt",
            "fp16",
            ".engine",
            device="cuda",
            flag="trt",
            options=("fp16", "max_batch"),
            builder="mclx.export.tensorrt_build:build",
            sidecars=(".json",),
        ),
        Format("openvino", "openvino", "fp32", device="cpu", reads="onnx"),
        Format("openvino-bf16", "openvino", "bf16", device="cpu", reads="onnx"),
        Format(
            "openvino-int8",
            "openvino",
            "int8",
            ".ov-int8.onnx",
            device="cpu",
            flag="openvino",
            builder="mclx.export.openvino_export:build_int8",
        ),
    )
}

# --backend auto, fastest first where each is available and kept its parity; a reduced
# precision row is taken only with a parity record (``mclx export`` writes them)
AUTO_ORDER = {
    "cuda": ("engine", "onnx", "torch-fp16", "torch"),
    "cpu": (
        "openvino-bf16",
        "torch-bf16",
        "openvino-int8",
        "onnx-int8",
        "openvino",
        "onnx",
        "torch",
    ),  # fmt: skip
}


def auto_order(device: str) -> tuple[str, ...]:
    """The rows ``--backend auto`` tries on ``device`` (``cpu``, ``cuda`` or ``cuda:N``)."""
    from mclx.inference.device import is_cuda

    return AUTO_ORDER["cuda" if is_cuda(device) else "cpu"]


def parity_held(name: str, report: dict[str, Any]) -> bool:
    """Whether ``auto`` may take row ``name``: its record passed the task gate
    (:func:`task_held`), or, recorded without a task (no measured expression), its
    cosine to FP32 is at least :data:`MIN_COSINE`. A reduced-precision row needs a
    record (an FP32 row without one is taken: it is the reference's own precision)."""
    entry = report.get(name)
    if entry is None:
        return FORMATS[name].precision == "fp32"
    if entry.get("task"):
        return task_held(entry["task"])
    return entry.get("min_cosine", 0.0) >= MIN_COSINE


def task_held(task: dict[str, Any]) -> bool:
    """Whether a task record (:func:`mclx.export.gate.judge`) meets every threshold of
    :data:`TASK_GATE` (a missing or NaN value fails)."""
    overlap = task.get("topk_overlap")
    if overlap is not None and not overlap >= TASK_GATE["topk_overlap"]:
        return False
    if not task.get("gene_corr_median", float("nan")) >= TASK_GATE["gene_corr_median"]:
        return False
    drop = task.get("pcc_acg_fp32", float("nan")) - task.get("pcc_acg", float("nan"))
    return bool(drop <= TASK_GATE["pcc_acg_drop"])


def host() -> str:
    """This machine as the export report names it: CPU model and core count (the rates
    recorded at export rank the formats only on the machine that measured them)."""
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            names = (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
            model = next(names, "")
    except OSError:
        import platform

        model = platform.processor()
    return f"{model or 'unknown CPU'} x{os.cpu_count()}"


def ranked(names: list[str], report: dict[str, Any]) -> list[str]:
    """``names`` (in :data:`AUTO_ORDER`) fastest first by the encode rates the export
    measured, where it measured every one of them on this machine; else as given."""
    rates = {n: (report.get(n) or {}).get("rate") for n in names}
    if report.get("reference", {}).get("rate") and "torch" in names:
        rates["torch"] = report["reference"]["rate"]
    if report.get("host") != host() or not all(rates.values()):
        return list(names)
    return sorted(names, key=lambda n: -rates[n])


def format_of_file(path: str | os.PathLike) -> Format | None:
    """The exported format a file's name says it is (longest suffix first), or None."""
    name = Path(path).name
    files = [f for f in FORMATS.values() if f.suffix and f.reads is None]
    files.sort(key=lambda f: -len(f.suffix))
    return next((f for f in files if name.endswith(f.suffix)), None)


def open_file(path: Path, *, device: str = "cpu"):
    """The encoder of an exported file, chosen by its suffix."""
    fmt = format_of_file(path)
    if fmt is not None and fmt.backend == "tensorrt":
        from mclx.inference.tensorrt import TensorRTEncoder

        return TensorRTEncoder(path, device=device)
    if fmt is not None and fmt.backend == "openvino":
        from mclx.inference.openvino import OpenVinoEncoder

        return OpenVinoEncoder(path, precision=fmt.precision, device=device)
    from mclx.inference.encoders import OnnxRuntimeEncoder

    return OnnxRuntimeEncoder(path, device=device)


def report_path(checkpoint: str | os.PathLike) -> Path:
    """The export report beside a checkpoint: parity of every exported artifact."""
    ck = Path(checkpoint)
    return ck.with_name(ck.stem + ".export.json")


def read_report(checkpoint: str | os.PathLike) -> dict[str, Any]:
    path = report_path(checkpoint)
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
