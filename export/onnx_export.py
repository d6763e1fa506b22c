"""PyTorch -> ONNX (FP32) and ONNX Runtime static INT8 quantisation of the image encoder.

The graph maps an image batch (float32, N x 3 x H x W, the checkpoint's pixel scale) to
its embeddings (image encoder + projection head; a ViT's tokens included), with a
dynamic batch axis. A ``--context-fov`` model's batch is N x 6 x H x W (the patch, then
its wider field of view): the graph runs both through the encoder and joins them. A
section-level model (HisToGene) takes a second input, the spots' array ``positions``
(int64, N x 2), and N is the section's spots. The TorchScript
exporter (``dynamo=False``) is used: it gives a correct graph for DenseNet's concatenations.
The FP32 file is saved after ONNX Runtime's basic (portable, ONNX-only) optimisations,
so TensorRT can still parse it; the runtime enables the rest when it opens a session.

``precision="fp16"`` writes the graph a strongly typed TensorRT network builds an FP16
engine from (TensorRT 11 has no FP16 builder flag): the image encoder's weights and
activations in float16, the projection head in float32, float32 input and output. It is
the exporter's graph as it is, with no ONNX Runtime pass: the CPU provider has no float16
Conv, so its optimiser inserts ``InsertedPrecisionFreeCast_*`` nodes that turn every
float16 weight back into float32 (a DenseNet-121 then computes all its Conv, BatchNorm
and Relu nodes in float32, and TensorRT builds an FP32 engine from it). A graph's
precision is the type its Conv / MatMul / Gemm nodes compute in
(:func:`graph_precision`), never the type of its weights.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np

from mclx.files import atomic_path
from mclx.inference.encoders import INPUT, OUTPUT, POSITIONS, read_onnx_metadata
from mclx.inference.transform import to_model_input


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
        "input": f"{INPUT}: float32 N x {ck.preprocess.channels()} x H x W, pixel scale of "
        "'preprocess'"
        + _views_note(ck)
        + (f"; {POSITIONS}: int64 N x 2 array coordinates" if _section(ck) else ""),
        "output": f"{OUTPUT}: float32 N x D",
    }


def _views_note(ck) -> str:
    views = ck.preprocess.views_um
    if not views:
        return ""
    return f" (RGB of the patch, then of its {', '.join(f'{v:g}' for v in views)} µm field)"


def _section(ck) -> bool:
    """Whether the checkpoint's model predicts a whole section at once (HisToGene)."""
    return getattr(ck.model, "kind", "") == "section"


def build_onnx(job, out: Path) -> str:
    """Formats-table builder of ``onnx``: the FP32 graph (``opset``, default 17)."""
    export_onnx(job.ck, out, opset=job.options.get("opset") or 17)
    return "fp32"


def build_int8(job, out: Path) -> str:
    """Formats-table builder of ``onnx-int8``: calibrated on the job's calibration
    patches, the head (everything after the image encoder's pooling) kept in FP32."""
    fp32 = job.paths["onnx"]
    keep = head_nodes(fp32)
    quantize_int8(fp32, out, to_model_input(job.calib, job.ck.preprocess), exclude=keep)
    job.notes["onnx-int8"] = {"fp32_layers": keep, "calibration_patches": len(job.calib)}
    return "int8"


TRUNK = "/image_encoder/"  # the exporter's name scope of the image encoder's nodes


def head_nodes(path: str | os.PathLike) -> list[str]:
    """Names of the nodes of an exported graph outside the image encoder: the feature
    standardisation and the projection head, which INT8 builds keep in FP32 (their input,
    the pooled features, loses its small per-patch variation to 8-bit steps once centred).
    Empty for a graph whose encoder nodes are not named by the exporter's scope."""
    import onnx

    nodes = onnx.load(str(path), load_external_data=False).graph.node
    if not any(n.name.startswith(TRUNK) for n in nodes):
        return []
    return [n.name for n in nodes if n.name and not n.name.startswith(TRUNK)]


def _set_metadata(model_proto, meta: dict[str, str]) -> None:
    del model_proto.metadata_props[:]
    for key, value in meta.items():
        entry = model_proto.metadata_props.add()
        entry.key, entry.value = key, value


def _half_encoder(model):
    """``images (, positions) -> embeddings`` with the image encoder in float16 (the
    convolutions: almost all the work) and the head in float32; float32 in and out
    (a section-level model's positions pass to its head as they are). ``model`` is not
    changed."""
    import copy

    import torch

    class HalfEncoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = copy.deepcopy(model.image_encoder).half()
            self.model = model

        def forward(self, images, *positions):
            feats = self.encoder(images.half()).float()
            return self.model.embed_image_features(feats, *positions)

    return HalfEncoder().eval()


COMPUTE_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")  # where the work is


def compute_types(path: str | os.PathLike) -> dict[str, int]:
    """How many Conv / MatMul / Gemm nodes of an ONNX graph compute in each element type
    (``float16``, ``float``, ...): the type of a node's first input, after shape
    inference (a Cast in front of a node is what changes it, not the weights' type)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inferred = onnx.shape_inference.infer_shapes(model).graph
    types = {t.name: t.data_type for t in inferred.initializer}
    for v in (*inferred.input, *inferred.value_info, *inferred.output):
        types[v.name] = v.type.tensor_type.elem_type
    counts: dict[str, int] = {}
    for node in inferred.node:
        if node.op_type in COMPUTE_OPS and node.input:
            name = onnx.TensorProto.DataType.Name(types.get(node.input[0], 0)).lower()
            counts[name] = counts.get(name, 0) + 1
    return counts


def graph_precision(path: str | os.PathLike) -> str:
    """``fp16`` when most Conv / MatMul / Gemm nodes of an ONNX graph compute in float16
    (an FP16 encoder ahead of a float32 projection head), else ``fp32``: what a strongly
    typed TensorRT network builds from it (:func:`compute_types`)."""
    counts = compute_types(path)
    half = counts.get("float16", 0)
    return "fp16" if half and 2 * half > sum(counts.values()) else "fp32"


def export_onnx(ck, out: str | os.PathLike, *, opset: int = 17, precision: str = "fp32") -> Path:
    """Write checkpoint ``ck``'s image encoder to ``out`` as ONNX (``fp32``, or ``fp16``
    for TensorRT: see the module docstring); return the path."""
    import onnx
    import torch

    from mclx.inference.device import import_onnxruntime

    if precision not in ("fp32", "fp16"):
        msg = f"{out}: ONNX export precision {precision!r} (fp32 or fp16)"
        raise ValueError(msg)
    ort = import_onnxruntime(str(out)) if precision == "fp32" else None
    out = Path(out)
    size = ck.preprocess.patch_size
    module = ck.model.cpu().eval()  # forward: images (, positions) -> embeddings
    if precision == "fp16":
        module = _half_encoder(module)
    args: tuple = (torch.rand(3, ck.preprocess.channels(), size, size),)
    names = [INPUT]
    if _section(ck):
        args += (torch.tensor([[0, 0], [1, 0], [0, 1]]),)
        names.append(POSITIONS)
    with atomic_path(out) as tmp:
        raw = tmp.with_name(tmp.name + ".raw.onnx")  # removed by atomic_path
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                args,
                str(raw),
                dynamo=False,
                input_names=names,
                output_names=[OUTPUT],
                opset_version=opset,
                dynamic_axes={n: {0: "batch"} for n in [*names, OUTPUT]},
            )
        if precision == "fp32":  # fp16: no CPU pass (it would cast back to float32)
            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
            so.optimized_model_filepath = str(tmp)
            ort.InferenceSession(str(raw), so, providers=["CPUExecutionProvider"])
        proto = onnx.load(str(tmp if precision == "fp32" else raw))
        _set_metadata(proto, metadata(ck) | {"precision": precision})
        onnx.checker.check_model(proto, full_check=True)
        onnx.save(proto, str(tmp))
    return out


class _Reader:
    """ONNX Runtime calibration reader over float32 model input (N x 3 x H x W)."""

    def __init__(self, images: np.ndarray, batch: int = 8) -> None:
        self.batches = [images[i : i + batch] for i in range(0, len(images), batch)]
        self.i = 0

    def get_next(self):
        if self.i >= len(self.batches):
            return None
        self.i += 1
        return {INPUT: self.batches[self.i - 1]}

    def rewind(self) -> None:
        self.i = 0


def quantize_int8(
    fp32_path: str | os.PathLike,
    out: str | os.PathLike,
    calib: np.ndarray,
    *,
    exclude: list[str] | tuple[str, ...] = (),
) -> Path:
    """Static INT8 (QDQ, per-channel weights) of an FP32 ONNX file, calibrated on ``calib``
    (float32 N x 3 x H x W in the model's pixel scale); the nodes named in ``exclude``
    stay in FP32.

    Only Conv, MatMul and Gemm are quantised. DenseNet's pre-activation layers run
    BatchNorm + ReLU on every concatenation; quantising those too puts a
    Quantize/Dequantize pair around each of them, which costs more than the int8
    convolutions save (the slowdown seen with out-of-the-box QDQ).
    """
    import onnx

    from mclx.inference.device import import_onnxruntime

    import_onnxruntime(str(out))
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32_path, out = Path(fp32_path), Path(out)
    meta = read_onnx_metadata(fp32_path)
    with atomic_path(out) as tmp:
        prep = tmp.with_name(tmp.name + ".prep.onnx")  # removed by atomic_path
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quant_pre_process(str(fp32_path), str(prep), skip_symbolic_shape=True)
            quantize_static(
                str(prep),
                str(tmp),
                _Reader(calib),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                op_types_to_quantize=["Conv", "MatMul", "Gemm"],
                calibrate_method=CalibrationMethod.MinMax,
                nodes_to_exclude=list(exclude),
            )
        proto = onnx.load(str(tmp))
        _set_metadata(proto, meta | {"precision": "int8"})
        onnx.save(proto, str(tmp))
    return out
