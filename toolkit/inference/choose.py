"""Open the encoder a user asks for: a file as it is, or a checkpoint's best format.

``open_encoder(model, backend=..., precision=..., device=...)`` takes a checkpoint, an
``.onnx`` or an ``.engine``. For a checkpoint, ``--backend auto`` walks
:data:`~mclx.inference.formats.AUTO_ORDER` for the device and opens the first format
whose artifact exists and whose recorded parity held; a named backend opens that
format or says in one line why it cannot.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from mclx.inference.device import is_cuda, resolve_device, torch_device
from mclx.inference.formats import (
    FORMATS,
    Format,
    auto_order,
    format_of_file,
    open_file,
    parity_held,
    ranked,
    read_report,
)


def open_encoder(
    model: str | os.PathLike,
    *,
    backend: str = "auto",
    precision: str = "auto",
    device: str = "auto",
    ck=None,
):
    """An :class:`~mclx.inference.encoders.Encoder` for ``model``.

    Args:
        model: checkpoint (``.pt``), exported ``.onnx`` / ``.int8.onnx``, or ``.engine``.
        backend: ``auto``, ``torch``, ``onnxruntime``, ``openvino`` or ``tensorrt``
            (``openvino`` also runs an ``.onnx`` / ``.ov-int8.onnx`` file given directly).
        precision: ``auto``, ``fp32``, ``bf16``, ``fp16`` or ``int8`` (checkpoints only).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        ck: the checkpoint already loaded (spares reading it again).
    """
    path = Path(model)
    if backend == "openvino" and device == "auto":
        device = "cpu"  # its only device
    if format_of_file(path) is not None:
        if backend == "openvino":  # the ONNX file, compiled by OpenVINO
            return _openvino_file(path, precision, device)
        return open_file(path, device=resolve_device(device, onnx=path.suffix == ".onnx"))
    asked, device = device, str(torch_device(device))
    if backend == "auto":
        return _best(path, precision, device, ck)
    fmt = _format(backend, precision, device, read_report(path))
    _require_device(path, fmt, device, asked)
    encoder = fmt.open(_require_artifact(path, fmt), device=device, ck=ck)
    if fmt.has_file:
        _check_fingerprint(encoder, path)
    return encoder


def _openvino_file(path: Path, precision: str, device: str):
    from mclx.inference.openvino import OpenVinoEncoder

    fmt = format_of_file(path)
    rows = [fmt] if fmt.backend == "openvino" else []
    reading = rows or [
        f for f in FORMATS.values() if f.backend == "openvino" and f.reads == fmt.name
    ]
    if not reading:
        msg = f"{path}: OpenVINO runs the exported .onnx / .ov-int8.onnx files, not a {fmt.name}"
        raise ValueError(msg)
    offered = [f.precision for f in reading]
    if precision == "auto":
        precision = offered[0]
    elif precision not in offered:
        msg = f"{path}: openvino runs this file at {', '.join(offered)}, not {precision}"
        raise ValueError(msg)
    return OpenVinoEncoder(path, precision=precision, device=str(torch_device(device)))


def _best(checkpoint: Path, precision: str, device: str, ck):
    """The fastest format that runs here and whose parity gate held (:func:`ranked`); a
    precision named (``--precision bf16``) also takes, after those, the rows ``auto``
    alone would not (no parity record, a CPU without fast BF16). The encoder carries its
    parity record as ``parity``."""
    report = read_report(checkpoint)
    rows = _present(checkpoint, precision, device)
    held = ranked(_eligible(rows, report), report)
    names = held + ([n for n in rows if n not in held] if precision != "auto" else [])
    for name in names:
        fmt = FORMATS[name]
        with contextlib.suppress(ImportError, RuntimeError):
            encoder = fmt.open(checkpoint, device=device, ck=ck)
            if fmt.has_file:
                _check_fingerprint(encoder, checkpoint)
            encoder.parity = {"format": name, **report.get(name, {}), "held": name in held}
            return encoder
    msg = f"{checkpoint}: no encoder backend available for precision {precision}"
    raise RuntimeError(msg)


def _present(checkpoint: Path, precision: str, device: str) -> list[str]:
    """The rows of :func:`auto_order` at ``precision`` whose artifact exists."""
    out = []
    for name in auto_order(device):
        fmt = FORMATS[name]
        if precision not in ("auto", fmt.precision):
            continue
        if fmt.has_file and not fmt.path(checkpoint).is_file():
            continue
        out.append(name)
    return out


def _eligible(rows: list[str], report: dict) -> list[str]:
    """Those of ``rows`` that this machine runs fast and whose recorded parity held."""
    from mclx.kernels import cpu_has_fast_bf16

    slow_bf16 = not cpu_has_fast_bf16()
    return [n for n in rows if parity_held(n, report) and not (n == "torch-bf16" and slow_bf16)]


def _format(backend: str, precision: str, device: str, report: dict | None = None) -> Format:
    """The row of ``backend`` at ``precision`` (``auto``: on a GPU, fp16 where the backend
    offers it and its parity was recorded; else the first row that runs on ``device``)."""
    rows = [f for f in FORMATS.values() if f.backend == backend]
    if not rows:
        known = ", ".join(dict.fromkeys(f.backend for f in FORMATS.values()))
        msg = f"unknown backend {backend!r} (auto, {known})"
        raise ValueError(msg)
    if precision == "auto":
        usable = [f for f in rows if f.runs_on(device)] or rows
        fp16 = [f for f in usable if f.precision == "fp16"]
        only = len(usable) == 1  # tensorrt: the engine is what there is
        if is_cuda(device) and fp16 and (only or parity_held(fp16[0].name, report or {})):
            return fp16[0]
        return next((f for f in usable if f.precision == "fp32"), usable[0])
    for f in rows:
        if f.precision == precision:
            return f
    offered = ", ".join(f.precision for f in rows)
    msg = f"{backend} backend: precision {precision!r} not offered ({offered})"
    raise ValueError(msg)


def _require_device(checkpoint: Path, fmt: Format, device: str, asked: str) -> None:
    """Refuse a GPU-only format (a TensorRT engine) on a machine without a CUDA GPU, or
    with ``--device cpu``, before suggesting an export that could not build it there."""
    if fmt.runs_on(device):
        return
    where = "this machine has no NVIDIA (CUDA) GPU" if asked == "auto" else f"--device {asked}"
    what = "a TensorRT engine" if fmt.backend == "tensorrt" else f"{fmt.name}"
    msg = (
        f"{fmt.path(checkpoint)}: --backend {fmt.backend} needs an NVIDIA GPU ({what} is "
        f"built and run only on one) and {where}; use --backend onnxruntime or torch"
    )
    raise RuntimeError(msg)


def _require_artifact(checkpoint: Path, fmt: Format) -> Path:
    """The checkpoint (torch formats) or the exported file beside it, which must exist."""
    path = fmt.path(checkpoint)
    if fmt.has_file and not path.is_file():
        msg = f"{path}: not exported yet; run 'mclx export --ckpt {checkpoint}'"
        raise FileNotFoundError(msg)
    return checkpoint


def _check_fingerprint(encoder, checkpoint: Path) -> None:
    from mclx.checkpoint import read_checkpoint_dict
    from mclx.errors import FingerprintMismatch

    fp = read_checkpoint_dict(checkpoint)["fingerprint"]
    if encoder.fingerprint != fp:
        msg = f"{checkpoint}: exported encoder fingerprint {encoder.fingerprint} != {fp}; re-export"
        raise FingerprintMismatch(msg)
