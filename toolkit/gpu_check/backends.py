"""The encoder checks of ``python -m mclx.gpu_check`` that need no TensorRT: PyTorch on
the GPU (FP32 with TF32 off within 1e-4, FP16 cosine >= 0.99) and the FP32 ONNX file in
ONNX Runtime's CUDA provider (skipped, with the reason, where only the CPU build of ONNX
Runtime is installed)."""

from __future__ import annotations

from mclx.gpu_check.workspace import MAX_REL_FP32, MIN_COS, Workspace, compare


def onnxruntime_cuda(ws: Workspace):
    """The FP32 ONNX file in ONNX Runtime's CUDA provider, really on CUDA, within 1e-4."""
    from mclx.inference.encoders import OnnxRuntimeEncoder

    enc = OnnxRuntimeEncoder(ws.onnx(), device="cuda")
    providers = enc.session.get_providers()
    details, problems = {"providers": providers}, []
    if providers[0] != "CUDAExecutionProvider":
        problems.append(f"session providers {providers}")
    for n in (7, 64):
        res = details[f"batch_{n}"] = compare(ws.reference(n), enc(ws.patches(n)))
        if res["max_rel_err"] > MAX_REL_FP32:
            problems.append(f"batch {n}: max relative error {res['max_rel_err']:.2e}")
    return details, problems


def torch_gpu(ws: Workspace):
    """PyTorch on the GPU: FP32 (TF32 off) within 1e-4, FP16 autocast cosine >= 0.99."""
    from mclx.inference.encoders import TorchEncoder

    details, problems = {}, []
    for precision in ("fp32", "fp16"):
        enc = TorchEncoder(ws.ck(), precision=precision, device="cuda")
        res = details[precision] = compare(ws.reference(64), enc(ws.patches(64)))
        ws.ck().model.cpu()
        if precision == "fp32" and res["max_rel_err"] > MAX_REL_FP32:
            problems.append(f"fp32: max relative error {res['max_rel_err']:.2e}")
        if res["min_cosine"] < MIN_COS:
            problems.append(f"{precision}: min cosine {res['min_cosine']:.4f}")
    return details, problems
