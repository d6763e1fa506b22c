"""One export entry point: checkpoint -> the requested rows of the formats table.

``export()`` loops over the rows it is asked for (``onnx`` always; ``onnx-int8`` with
``--int8``; ``openvino-int8`` with ``--openvino``; ``engine`` with ``--trt``). Each row
is built by its own builder under a staging name, opened by the inference layer and
compared with PyTorch FP32 on the same patches, and only then renamed into place: a
failed parity check leaves the previous good artifact untouched, and a run that fails
(a TensorRT build, an FP32 parity check) puts back every file it had already renamed
into place: the folder is left as it was. Each row is labelled with the precision that
was actually built. OpenVINO, which also runs the FP32 ONNX file itself, gets its parity
recorded on it (fp32, bf16) when installed. The results go to ``<stem>.export.json``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mclx.errors import MclxError
from mclx.export.parity import record
from mclx.extras import installed
from mclx.files import check_output, undone_on_failure, write_text_atomic
from mclx.inference.formats import (
    FORMATS,
    MAX_REL_ERR_FP32,
    MIN_COSINE,
    Format,
    host,
    report_path,
)


class ParityError(MclxError):
    """An exported encoder disagrees with PyTorch beyond the allowed bound."""


@dataclass
class ExportJob:
    """What every builder of one export run shares.

    Attributes:
        ck: the loaded checkpoint.
        patches: uint8 patches of the held-back spots the parity gate judges on.
        paths: final path of each requested format.
        options: the export options (see each row's ``options``).
        positions: array coordinates given with the patches to a section-level model
            (HisToGene; None for the others).
        cal: the :class:`~mclx.export.calib.CalibrationSet` (INT8 calibration patches,
            the held-back spots' expression and bank); None: calibrate on ``patches``.
        notes: what builders tell the report beside the parity (layers kept in FP32).
        progress: whether the libraries a builder calls may draw their own progress bars
            (NNCF's); False under ``mclx export -q``.
    """

    ck: Any
    patches: np.ndarray
    paths: dict[str, Path]
    options: dict[str, Any] = field(default_factory=dict)
    positions: np.ndarray | None = None
    cal: Any = None
    notes: dict[str, dict[str, Any]] = field(default_factory=dict)
    progress: bool = True

    def timed(self, name: str, encoder) -> np.ndarray:
        """``encoder`` on the parity patches (which warms it up), then its rate on up to
        16 of them (images/s, best of three) into ``notes[name]["rate"]``: what ``--backend
        auto`` ranks the formats by on this machine."""
        from mclx.inference import to_host

        out = to_host(self.run(encoder))
        if self.positions is None:
            few, best = self.patches[:16], float("inf")
            for _ in range(3):
                t = time.perf_counter()
                encoder(few)
                best = min(best, time.perf_counter() - t)
            self.notes.setdefault(name, {})["rate"] = round(len(few) / max(best, 1e-9), 2)
        return out

    @property
    def calib(self) -> np.ndarray:
        """The INT8 calibration patches (other spots than the gate's where there are)."""
        return self.patches if self.cal is None else self.cal.calib

    def run(self, encoder) -> Any:
        """``encoder`` on the parity patches (with their positions when it needs them)."""
        return (
            encoder(self.patches)
            if self.positions is None
            else encoder(self.patches, self.positions)
        )


def _staging(path: Path) -> Path:
    return path.with_name(f".{path.name}.staging{''.join(path.suffixes[-1:])}")


def check_parity(fmt: str, path: Path, res: Mapping[str, Any], precision: str) -> None:
    """FP32 within ``MAX_REL_ERR_FP32`` relative; a reduced precision passes the task
    gate (:mod:`mclx.export.gate`) or, recorded without a task, cosine >= ``MIN_COSINE``."""
    from mclx.export.gate import failures

    if precision == "fp32" and res["max_rel_err"] > MAX_REL_ERR_FP32:
        msg = (
            f"{path}: FP32 parity failed, max relative error {res['max_rel_err']:.2e} > "
            f"{MAX_REL_ERR_FP32:.0e}"
        )
        raise ParityError(msg)
    if precision == "fp32":
        return
    if res.get("task"):
        missed = failures(res["task"])
        if missed:
            msg = f"{path}: {fmt} parity failed on the task: {'; '.join(missed)}"
            raise ParityError(msg)
    elif res["min_cosine"] < MIN_COSINE:
        msg = f"{path}: {fmt} parity failed, min cosine {res['min_cosine']:.4f} < {MIN_COSINE}"
        raise ParityError(msg)


def requested(flags: set[str]) -> list[Format]:
    """The rows one ``mclx export`` builds, in table order (the FP32 ONNX file first:
    INT8 and TensorRT are made from it)."""
    return [f for f in FORMATS.values() if f.builder and (f.flag is None or f.flag in flags)]


def export_outputs(
    checkpoint: str | os.PathLike,
    *,
    onnx_path: str | os.PathLike | None = None,
    int8: bool = False,
    openvino: bool = False,
    trt: bool = False,
) -> list[Path]:
    """Every file one :func:`export` writes: each requested format's artifact and its
    sidecars, and the report beside the checkpoint (for the check of a command's paths)."""
    flags = {f for f, on in (("int8", int8), ("openvino", openvino), ("trt", trt)) if on}
    rows = requested(flags)
    paths = _paths(rows, checkpoint, onnx_path)
    sidecars = [paths[f.name].with_name(paths[f.name].name + x) for f in rows for x in f.sidecars]
    return [*paths.values(), *sidecars, report_path(checkpoint)]


def check_options(rows: list[Format], given: Mapping[str, Any]) -> None:
    """Refuse an option that no row knows, or that none of the requested rows reads (it
    would be silently ignored)."""
    owners = {o: f for f in FORMATS.values() for o in f.options}
    for name in given:
        flag = "--" + name.replace("_", "-")
        if name not in owners:
            msg = f"export: unknown option {flag} (known: {', '.join(sorted(owners))})"
            raise TypeError(msg)
        if owners[name] not in rows:
            fmt = owners[name]
            msg = f"{flag} applies to the {fmt.name} format only (--{fmt.flag} not given)"
            raise ValueError(msg)


def export(
    checkpoint: str | os.PathLike,
    *,
    onnx_path: str | os.PathLike | None = None,
    calib_data: str | os.PathLike | None = None,
    n_patches: int = 64,
    int8: bool = False,
    openvino: bool = False,
    trt: bool = False,
    log: Callable[[str], Any] = print,
    progress: bool = True,
    **options: Any,
) -> dict[str, Any]:
    """Export the checkpoint's encoder in the requested formats, each checked against
    PyTorch; return the report (also written beside the checkpoint).

    Args:
        onnx_path: the FP32 ONNX file (default beside the checkpoint); the INT8 file
            goes beside it.
        calib_data: real patches for parity and INT8 calibration (see ``calib``).
        log: where the export's own lines go.
        progress: False: no progress bars of the libraries the builders call (NNCF's).
        options: per-format options: ``opset`` (ONNX), ``fp16``, ``max_batch`` (engine).
    """
    from mclx.checkpoint import load_checkpoint
    from mclx.export.calib import calibration_set
    from mclx.inference.device import require_gpu_stack
    from mclx.inference.encoders import TorchEncoder

    flags = (("int8", int8), ("openvino", openvino), ("trt", trt))
    rows = requested({f for f, on in flags if on})
    check_options(rows, options)
    ck = load_checkpoint(checkpoint)
    positions = _section_positions(ck, rows, n_patches, checkpoint)
    paths = _paths(rows, checkpoint, onnx_path)
    for fmt in rows:
        if fmt.device == "cuda":  # before writing anything
            require_gpu_stack(f"--{fmt.flag}: {paths[fmt.name]} not built")
    for out in [*paths.values(), report_path(checkpoint)]:
        check_output(out)
    cal = calibration_set(calib_data, ck, n=n_patches)
    log(f"parity patches: {len(cal.patches)} from {cal.source}")
    job = ExportJob(ck, cal.patches, paths, options, positions, cal, progress=progress)
    reference = job.timed("torch", TorchEncoder(ck))
    report: dict[str, Any] = {
        "fingerprint": ck.fingerprint,
        "host": host(),
        "reference": {"format": "torch", **job.notes.get("torch", {})},
        "patches": cal.source,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _record_torch_reduced(job, reference, report, checkpoint, log)
    _publish_rows(rows, job, reference, report, checkpoint, log)
    refused = [e["refused"] for e in report.values() if isinstance(e, dict) and "refused" in e]
    if refused:  # after the other rows: one refused format does not cost the user the rest
        msg = f"{refused[0]} (not written; the other formats and {report_path(checkpoint)} were)"
        raise ParityError(msg)
    return report


def _publish_rows(rows: list[Format], job: ExportJob, reference, report: dict, checkpoint, log):
    """Build, check and publish each row, the report rewritten after each. Each row is
    renamed into place once checked, and later rows are made from it (the FP32 ONNX
    file): a row that fails puts back every file as it was before this run."""
    path = report_path(checkpoint)
    with undone_on_failure(_written(rows, job.paths, checkpoint)):
        for fmt in rows:
            report[fmt.name] = _publish(fmt, job, reference, log)
            write_text_atomic(path, json.dumps(report, indent=2) + "\n")
        if _record_readers(job, reference, report, log):
            write_text_atomic(path, json.dumps(report, indent=2) + "\n")


def _written(rows: list[Format], paths: Mapping[str, Path], checkpoint) -> list[Path]:
    """Every file the rows may put in place: artifacts, sidecars, the engine's timing
    cache (:func:`mclx.export.tensorrt_build.build`) and the report."""
    out = [report_path(checkpoint)]
    for fmt in rows:
        path = paths[fmt.name]
        out += [path, *(path.with_name(path.name + x) for x in fmt.sidecars)]
        if fmt.name == "engine":
            out.append(path.with_name(path.name + ".timing.cache"))
    return out


def _section_positions(ck, rows: list[Format], n: int, checkpoint) -> np.ndarray | None:
    """For a section-level model (HisToGene): array coordinates for the ``n`` parity
    patches (a raster over its positional tables, one section of ``n`` spots), after
    refusing the formats it cannot be built in. None for the other models."""
    if getattr(ck.model, "kind", "") != "section":
        return None
    other = [f.name for f in rows if f.name != "onnx"]
    if other:
        msg = (
            f"{checkpoint}: a {ck.model_cfg.name} model takes a whole section with its "
            f"positions; only FP32 ONNX is offered, not {', '.join(other)}"
        )
        raise ValueError(msg)
    nx, ny = ck.model_cfg.pos_size
    i = np.arange(n)
    return np.stack([i % nx, (i // nx) % ny], axis=1).astype(np.int64)


def _paths(rows: list[Format], checkpoint, onnx_path) -> dict[str, Path]:
    """Final path of each row: beside the checkpoint, or beside ``onnx_path`` for ONNX."""
    paths = {f.name: f.path(checkpoint) for f in rows}
    if onnx_path is not None:
        onnx = Path(onnx_path)
        paths["onnx"] = onnx
        if "onnx-int8" in paths:
            paths["onnx-int8"] = onnx.with_name(onnx.name.removesuffix(".onnx") + ".int8.onnx")
    return paths


def _record_torch_reduced(job: ExportJob, reference, report: dict, checkpoint, log) -> None:
    """PyTorch's own reduced precisions need no file, but ``--backend auto`` takes them
    only with a parity record: bf16 on CPUs with fast bf16, fp16 where PyTorch sees a
    GPU."""
    from mclx.inference.device import torch_cuda
    from mclx.inference.encoders import TorchEncoder
    from mclx.kernels import cpu_has_fast_bf16

    if job.positions is not None:  # a section-level model is offered in FP32 only
        return
    rows = [("torch-bf16", "cpu")] if cpu_has_fast_bf16() else []
    if torch_cuda():
        rows.append(("torch-fp16", "cuda"))
    for name, device in rows:
        precision = FORMATS[name].precision
        got = job.timed(name, TorchEncoder(job.ck, precision=precision, device=device))
        job.ck.model.cpu()  # the encoder moved the shared model
        report[name] = record(job, name, Path(checkpoint), precision, reference, got, log)


def _record_readers(job: ExportJob, reference, report: dict, log) -> bool:
    """Rows that run another row's file (OpenVINO on the ONNX files) get their parity
    recorded once that file is exported here; ``--backend auto`` takes them only with a
    record that held. Skipped where their runtime is not installed or cannot run (bf16
    on a CPU without it). Returns whether anything was recorded."""

    recorded = False
    if job.positions is not None:  # a section-level model is offered in FP32 ONNX only
        return recorded
    for fmt in FORMATS.values():
        if fmt.reads not in report or not installed(fmt.backend):
            continue
        from mclx.inference.openvino import OpenVinoEncoder  # the one backend that reads

        path = Path(report[fmt.reads]["path"])
        try:
            got = job.timed(fmt.name, OpenVinoEncoder(path, precision=fmt.precision))
        except RuntimeError as exc:
            log(f"{fmt.name:<13} {fmt.precision:<5} not recorded: {exc}")
            continue
        report[fmt.name] = record(job, fmt.name, path, fmt.precision, reference, got, log)
        recorded = True
    return recorded


def _publish(fmt: Format, job: ExportJob, reference, log) -> dict[str, Any]:
    """Build ``fmt`` under a staging name, check parity, then rename it (and its
    sidecars) into place; return its report entry (a reduced precision that fails its
    gate is not written, and its entry says why under ``refused``)."""

    final = job.paths[fmt.name]
    stage = _staging(final)
    sidecars = [
        (stage.with_name(stage.name + x), final.with_name(final.name + x)) for x in fmt.sidecars
    ]
    try:
        precision = _build(fmt, job, stage, final)
        device = "cuda" if fmt.device == "cuda" else "cpu"
        got = job.timed(fmt.name, _open_stage(fmt, stage, device))
        entry = record(job, fmt.name, final, precision, reference, got, log)
        try:
            check_parity(fmt.name, final, entry, precision)
        except ParityError as exc:
            if precision == "fp32":  # the file every other row is made from
                raise
            return {**entry, "refused": str(exc)}
        os.replace(stage, final)
        for src, dst in sidecars:
            os.replace(src, dst)
        return entry
    finally:
        stage.unlink(missing_ok=True)
        for src, _ in sidecars:
            src.unlink(missing_ok=True)


def _open_stage(fmt: Format, stage: Path, device: str):
    """The staging file in its format's own runtime: its name (``.X.staging.onnx``) does
    not say the format, and OpenVINO's INT8 file would open in ONNX Runtime, which is
    not what the gate and the rate must measure."""
    from mclx.inference.formats import open_file

    if fmt.backend == "openvino":
        from mclx.inference.openvino import OpenVinoEncoder

        return OpenVinoEncoder(stage, precision=fmt.precision)
    return open_file(stage, device=device)


def _build(fmt: Format, job: ExportJob, stage: Path, final: Path) -> str:
    """Run the row's builder; an OSError names the artifact, not its staging file."""
    try:
        return fmt.build()(job, stage)
    except OSError as exc:
        if str(stage) not in str(exc):
            raise
        err = OSError(str(exc).replace(str(stage), str(final)))
        err.errno = exc.errno
        raise err from exc
