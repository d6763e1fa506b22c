"""Exported encoders in OpenVINO, Intel's inference runtime (CPU).

OpenVINO runs the FP32 ONNX file itself, at fp32 or with its bf16 inference-precision
hint (AVX512-BF16 / AMX; the image encoder only: the graph is cut at the pooled features
and the head after them, a standardisation included, is compiled in f32), and
``model.ov-int8.onnx``, NNCF's INT8 QDQ graph made by ``mclx export --openvino``
(:mod:`mclx.export.openvino_export`), with int8 kernels. The compiled model is cached by
OpenVINO in ``cache_dir("openvino")`` (the first compile of DenseNet-121 takes ~1 s, a
cached one a fraction). The ONNX file's mclx metadata (fingerprint, preprocessing) is
read as for ONNX Runtime. An optional extra: ``pip install -e '.[openvino]'`` (NNCF
included).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np

from mclx.errors import FormatError, short
from mclx.inference.encoders import INPUT, onnx_metadata
from mclx.inference.transform import to_model_input

INSTALL = "pip install -e '.[openvino]'"
TRUNK = "/image_encoder/"  # the exporter's name scope of the image encoder's nodes
HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}  # int8: the rest of the graph f32


def import_openvino(what: str):
    from mclx.extras import require

    return require("openvino", message=f"{what}: OpenVINO is not installed ({INSTALL})")


class OpenVinoEncoder:
    """An exported ``.onnx`` / ``.ov-int8.onnx`` compiled by OpenVINO for the CPU at
    ``precision`` (``fp32`` or ``bf16`` for the FP32 file; ``int8`` for the INT8 one)."""

    name = "openvino"

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        precision: str = "fp32",
        device: str = "cpu",
        threads: int | None = None,
    ) -> None:
        path = Path(path)
        if device != "cpu":
            msg = f"{path}: the openvino backend runs on the CPU only (not {device})"
            raise ValueError(msg)
        if precision not in HINTS:
            msg = f"openvino backend: precision {precision!r} not offered (fp32, bf16, int8)"
            raise ValueError(msg)
        ov = import_openvino(str(path))
        meta, self.pre = onnx_metadata(path)
        self.fingerprint, self.precision, self.device, self.path = (
            meta["fingerprint"], precision, device, path,
        )  # fmt: skip
        if precision == "bf16" and "BF16" not in _capabilities(ov):
            msg = f"{path}: this CPU has no bf16 arithmetic for OpenVINO (AVX512-BF16 or AMX)"
            raise RuntimeError(msg)
        config = {
            "INFERENCE_PRECISION_HINT": HINTS[precision],
            "PERFORMANCE_HINT": "LATENCY",  # one batch at a time, all cores on it
            "INFERENCE_NUM_THREADS": int(threads or os.cpu_count() or 1),
        }
        core = ov.Core()
        with contextlib.suppress(OSError):
            from mclx.cache import cache_dir

            folder = cache_dir("openvino")
            folder.mkdir(parents=True, exist_ok=True)
            if os.access(folder, os.W_OK):
                config["CACHE_DIR"] = str(folder)
        try:
            parts = _split(ov, core.read_model(str(path)), path) if precision == "bf16" else None
            if parts is None:
                self.compiled = core.compile_model(str(path), "CPU", config)
                self.head = None
            else:  # the trunk in bf16, the head in f32
                self.compiled = core.compile_model(parts[0], "CPU", config)
                f32 = {**config, "INFERENCE_PRECISION_HINT": "f32"}
                self.head = core.compile_model(parts[1], "CPU", f32).create_infer_request()
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses of its own
            msg = f"{path}: OpenVINO cannot compile the model ({short(exc, 200)})"
            raise FormatError(msg) from exc
        self.request = self.compiled.create_infer_request()

    def __call__(self, batch):
        x = to_model_input(np.asarray(batch), self.pre)
        try:
            out = self.request.infer({INPUT: x})
            if self.head is not None:
                out = self.head.infer([next(iter(out.values()))])
        except Exception as exc:
            msg = f"{self.path}: OpenVINO failed on a batch of {x.shape} ({short(exc, 200)})"
            raise RuntimeError(msg) from exc
        return np.array(next(iter(out.values())), np.float32, copy=True)


def _capabilities(ov) -> list[str]:
    try:
        return list(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    except Exception:
        return []


def _split(ov, model, path: Path):
    """``(trunk, head)``: ``model`` cut at the image encoder's pooled features (the one
    tensor from the exporter's ``/image_encoder/`` scope into the rest), or None where
    there is no such single tensor."""
    name = trunk_output(path)
    if name is None:
        return None
    found = [o for op in model.get_ordered_ops() for o in op.outputs() if name in o.get_names()]
    if len(found) != 1:
        return None
    out = found[0]
    consumers = list(out.get_target_inputs())
    trunk = ov.Model([out], model.get_parameters(), "trunk")
    features = ov.opset13.parameter(out.get_partial_shape(), ov.Type.f32, name="features")
    for target in consumers:
        target.replace_source_output(features.output(0))
    return trunk, ov.Model(model.get_results(), [features], "head")


def trunk_output(path: str | os.PathLike) -> str | None:
    """The one tensor of an exported ONNX graph that the image encoder's nodes (named in
    the exporter's ``/image_encoder/`` scope) pass to the other nodes, or None."""
    import onnx

    nodes = onnx.load(str(path), load_external_data=False).graph.node
    made = {o for n in nodes if n.name.startswith(TRUNK) for o in n.output}
    edge = {i for n in nodes if not n.name.startswith(TRUNK) for i in n.input if i in made}
    return edge.pop() if len(edge) == 1 else None
