"""``model.ov-int8.onnx``: INT8 for OpenVINO, quantised by NNCF (``mclx export --openvino``).

NNCF's post-training quantisation (``nncf.quantize`` on the FP32 ONNX graph, calibrated
on the export job's real patches) writes QDQ nodes where OpenVINO's CPU plugin fuses them
into int8 kernels. The QDQ file made for ONNX Runtime (``model.int8.onnx``) is not a
substitute: OpenVINO runs it, but DenseNet-121's embeddings drift to cosine 0.905
against FP32 (measured on HER2+ patches), below the parity gate. Needs the openvino extra
(NNCF comes with it).
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator
from pathlib import Path

from mclx.files import atomic_path
from mclx.inference.encoders import INPUT, read_onnx_metadata
from mclx.inference.transform import to_model_input


def build_int8(job, out: Path) -> str:
    """Formats-table builder of ``openvino-int8``: NNCF on the job's FP32 ONNX file,
    calibrated on the job's calibration patches, per-channel weights (NNCF's CPU
    default), the head after the pooled features (standardisation, projection) in FP32."""
    import warnings

    import onnx

    from mclx.extras import require

    msg = f"{out}: --openvino needs NNCF and OpenVINO (pip install -e '.[openvino]')"
    with _quiet_loggers():  # NNCF imports torch's cpp_extension: "No CUDA runtime is found"
        nncf = require("nncf", message=msg)
    from mclx.export.onnx_export import _set_metadata, head_nodes

    fp32 = Path(job.paths["onnx"])
    meta = read_onnx_metadata(fp32)
    x = to_model_input(job.calib, job.ck.preprocess)
    keep = head_nodes(fp32)
    batches = [{INPUT: x[i : i + 8]} for i in range(0, len(x), 8)]
    with warnings.catch_warnings(), _quiet_loggers(), _bars(job.progress):
        warnings.simplefilter("ignore")
        quantised = nncf.quantize(
            onnx.load(str(fp32)),
            nncf.Dataset(batches),
            subset_size=len(batches),  # NNCF counts dataset items: batches, not patches
            target_device=nncf.TargetDevice.CPU,
            ignored_scope=nncf.IgnoredScope(names=keep, validate=False),
        )
    _set_metadata(quantised, {**meta, "precision": "int8"})
    with atomic_path(out) as tmp:
        onnx.save(quantised, str(tmp))
    job.notes["openvino-int8"] = {"fp32_layers": keep, "calibration_patches": len(x)}
    return "int8"


@contextlib.contextmanager
def _bars(shown: bool) -> Iterator[None]:
    """NNCF's progress bars ("Statistics collection", "Applying Fast Bias correction")
    unless not ``shown`` (``mclx export -q``). NNCF offers no switch for them: each
    algorithm draws its own ``rich`` progress on a new Console, which writes to
    ``sys.stdout`` as it is when it draws; its log lines are :func:`_quiet_loggers`'."""
    if shown:
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()):
        yield


@contextlib.contextmanager
def _quiet_loggers(names=("torch.utils.cpp_extension", "nncf")) -> Iterator[None]:
    """Only errors from the libraries ``names`` log to while NNCF loads and quantises
    (their warnings are about their own set-up, not about the user's export)."""
    loggers = [logging.getLogger(n) for n in names]
    saved = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, saved):
            lg.setLevel(level)
