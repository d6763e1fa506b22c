"""``model.ov-int8.onnx``: INT8 for OpenVINO, quantised by NNCF (``mclx export --openvino``).

NNCF's post-training quantisation (``nncf.quantize`` on the FP32 ONNX graph, calibrated
on the export job's real patches) writes QDQ nodes where OpenVINO's CPU plugin fuses them
into int8 kernels. The QDQ file made for ONNX Runtime (``model.int8.onnx``) is not a
substitute: OpenVINO runs it, but DenseNet-121's embeddings drift to cosine 0.905
against FP32 (measured on HER2+ patches), below the parity gate. Needs the openvino extra
(NNCF comes with it).
"""

from __future__ import annotations

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

    msg = f"{out}: --openvino needs NNCF and OpenVINO (pip install 'mclx[openvino]')"
    nncf = require("nncf", message=msg)
    from mclx.export.onnx_export import _set_metadata, head_nodes

    fp32 = Path(job.paths["onnx"])
    meta = read_onnx_metadata(fp32)
    x = to_model_input(job.calib, job.ck.preprocess)
    keep = head_nodes(fp32)
    batches = [{INPUT: x[i : i + 8]} for i in range(0, len(x), 8)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantised = nncf.quantize(
            onnx.load(str(fp32)),
            nncf.Dataset(batches),
            subset_size=len(x),
            target_device=nncf.TargetDevice.CPU,
            ignored_scope=nncf.IgnoredScope(names=keep, validate=False),
        )
    _set_metadata(quantised, {**meta, "precision": "int8"})
    with atomic_path(out) as tmp:
        onnx.save(quantised, str(tmp))
    job.notes["openvino-int8"] = {"fp32_layers": keep, "calibration_patches": len(x)}
    return "int8"
