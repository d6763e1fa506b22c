"""The pipeline checks of ``python -m mclx.gpu_check``: retrieval on every array type at
N = 200,000, Q = 4,096, k = 200 against the CPU float32 result; ``mclx infer`` end to end
for each backend; throughput. Same protocol as :mod:`mclx.gpu_check.engines`.

Every backend runs on its own: one that is not installed (TensorRT, ONNX Runtime's CUDA
build, CuPy) is listed under ``skipped`` with the reason, one that fails is a problem
named after it, and neither stops the others."""

from __future__ import annotations

import contextlib
import io
import time
import warnings

import numpy as np

from mclx.gpu_check.environment import cupy_missing, onnxruntime_cuda_missing, tensorrt_missing
from mclx.gpu_check.workspace import N_BANK, N_QUERIES, K, Workspace

NEAR_TIE = 1e-5  # cosine gap between a query's k-th and (k+1)-th key below which float32 may swap


def _sync() -> None:
    import sys

    import torch

    cp = sys.modules.get("cupy")
    if cp is not None:
        cp.cuda.Device().synchronize()
    torch.cuda.synchronize()


def _near_ties(rows, q, keys) -> list[float]:
    """Float64 gap between the k-th and (k+1)-th cosine of each query in ``rows``."""
    kn = keys.astype(np.float64)
    kn /= np.linalg.norm(kn, axis=1, keepdims=True)
    gaps = []
    for r in rows:
        qn = q[r].astype(np.float64) / np.linalg.norm(q[r])
        top = -np.sort(np.partition(-(kn @ qn), K)[: K + 1])
        gaps.append(float(top[K - 1] - top[K]))
    return gaps


def agreement(idx, want_idx, pred, want, q, keys) -> dict:
    """Neighbour sets against the CPU float32 ones (rows that differ must be float32
    near-ties, at most 50 of them) and predictions on the rows that agree."""
    same = (np.sort(idx, 1) == np.sort(want_idx, 1)).all(1)
    differ = np.flatnonzero(~same)
    gaps = _near_ties(differ, q, keys) if 0 < len(differ) <= 50 else []
    rel = np.abs(pred[same] - want[same]) / (np.abs(want[same]) + 1e-6)
    return {
        "rows_with_other_neighbours": int(len(differ)),
        "gaps_of_those_rows": gaps[:10],
        "all_near_ties": len(differ) <= 50 and all(g < NEAR_TIE for g in gaps),
        "max_pred_rel_err": float(rel.max()) if rel.size else 0.0,
    }


def _cases(q, keys, vals):
    """The array types retrieval runs on: torch CUDA tensors, and CuPy where installed."""
    import torch

    tq, tk, tv = (torch.from_numpy(a).cuda() for a in (q, keys, vals))
    if cupy_missing():
        return {"torch_cuda": (tq, tk, tv, "fp32")}
    import cupy as cp

    cq, ck, cv = (cp.asarray(a) for a in (q, keys, vals))
    return {
        "cupy_kernels_fp32": (cq, ck, cv, "fp32"),
        "cupy_kernels_bf16": (cq, ck, cv, "bf16"),
        "torch_cuda": (tq, tk, tv, "fp32"),
        "numpy_queries_cupy_bank": (q, ck, cv, "fp32"),
        "cupy_queries_numpy_bank": (cq, keys, vals, "fp32"),
    }


def _timed(qq, kk, vv, precision):
    from mclx.inference import to_host
    from mclx.kernels import retrieve, topk_cosine

    topk_cosine(qq[:64], kk, K, precision=precision)  # compile and self-check first
    _sync()
    t0 = time.perf_counter()
    idx = to_host(topk_cosine(qq, kk, K, precision=precision)[1])
    _sync()
    t1 = time.perf_counter()
    pred = to_host(retrieve(qq, kk, vv, K, precision=precision))
    _sync()
    return (
        idx,
        pred,
        {"topk_seconds": t1 - t0, "queries_per_s": len(idx) / (time.perf_counter() - t1)},
    )


def retrieval(ws: Workspace):
    """CuPy kernels (fp32, bf16), torch CUDA and mixed numpy / CuPy inputs against the
    CPU float32 neighbours and predictions (torch CUDA alone where CuPy is missing)."""
    from mclx.kernels import retrieve, topk_cosine

    rng = np.random.default_rng(0)
    keys = rng.normal(size=(N_BANK, 256)).astype(np.float32)
    q = rng.normal(size=(N_QUERIES, 256)).astype(np.float32)
    vals = rng.gamma(1.0, size=(N_BANK, 785)).astype(np.float32)
    t0 = time.perf_counter()
    want_idx = topk_cosine(q, keys, K, precision="fp32")[1]
    want = retrieve(q, keys, vals, K, precision="fp32")
    details, problems = {"cpu_float32_seconds": time.perf_counter() - t0}, []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name, (qq, kk, vv, precision) in _cases(q, keys, vals).items():
            idx, pred, rates = _timed(qq, kk, vv, precision)
            res = details[name] = agreement(idx, want_idx, pred, want, q, keys) | rates
            if not res["all_near_ties"]:
                problems.append(f"{name}: {res['rows_with_other_neighbours']} rows differ")
            if res["max_pred_rel_err"] > 1e-5:
                problems.append(f"{name}: predictions differ by {res['max_pred_rel_err']:.1e}")
    problems += [f"warning: {w.message}" for w in caught if issubclass(w.category, RuntimeWarning)]
    if cupy_missing():
        details["skipped"] = {"cupy_kernels": cupy_missing()}
        return details, problems
    import cupy as cp

    from mclx.kernels import gpu_select

    details["cupy_kernels_used"] = gpu_select.usable(cp.cuda.Device().id)
    if not details["cupy_kernels_used"]:
        problems.append("the CuPy kernels were set aside (self-check)")
    ws.rates["retrieval_queries_per_s"] = details["cupy_kernels_fp32"]["queries_per_s"]
    return details, problems


def _cli(args) -> tuple[int, str]:
    """``mclx ARGS`` in this process: (exit status, stderr)."""
    from mclx.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main([str(a) for a in args])
            rc = 0
        except SystemExit as exc:
            rc = int(exc.code or 0)
    return rc, " ".join(err.getvalue().split())[:400]


INFER_RUNS = {
    "torch_cpu": ["--backend", "torch", "--device", "cpu"],  # the reference
    "torch_cuda": ["--backend", "torch", "--device", "cuda"],
    "onnxruntime_cuda": ["--backend", "onnxruntime", "--device", "cuda"],
    "tensorrt_cuda": ["--backend", "tensorrt", "--device", "cuda"],
    "engine_device_cpu": ["--device", "cpu"],  # --model model.engine: bank on the host
}


def _prepare_run(ws: Workspace, name: str) -> str | None:
    """Make what run ``name`` needs beside the checkpoint (its ONNX file, its engine);
    the reason it cannot run here, or None."""
    from mclx.export.exporter import export

    ck = ws.checkpoint()
    if name == "onnxruntime_cuda":
        why = onnxruntime_cuda_missing()
        if why is None and not ck.with_suffix(".onnx").is_file():
            export(ck, calib_data=ws.data(), log=lambda *_: None)
        return why
    if name in ("tensorrt_cuda", "engine_device_cpu"):
        why = tensorrt_missing()
        if why is None and not ck.with_suffix(".engine").is_file():
            export(ck, trt=True, max_batch=32, calib_data=ws.data(), log=lambda *_: None)
        return why
    return None


def _infer_one(ws: Workspace, name: str, args: list[str]) -> tuple[dict, np.ndarray]:
    """One ``mclx infer`` run: what it recorded, and its predictions."""
    import anndata as ad

    ck = ws.checkpoint()
    model = ck.with_suffix(".engine") if name == "engine_device_cpu" else ck
    out = ws.root / f"{name}.h5ad"
    rc, err = _cli(["infer", ws.slide(), "--bank", ws.bank(), "--model", model, *args,
                    "--out", out, "-q"])  # fmt: skip
    if rc:
        msg = f"exit {rc}: {err}"
        raise RuntimeError(msg)
    a = ad.read_h5ad(out)
    m = a.uns["mclx"]
    keys = ("backend", "precision", "device", "bank_device")
    found = {k: m.get(k) for k in keys} | {"tiles": a.n_obs}
    found["tiles_per_s"] = a.n_obs / float(m["timings"]["total"])
    return found, np.asarray(a.X, np.float64)


def infer(ws: Workspace):
    """``mclx infer`` on a synthetic pyramidal TIFF for each backend on ``cuda``, and an
    engine with ``--device cpu``; predictions against PyTorch on the CPU. Each backend
    runs on its own; one that is not installed is skipped with the reason."""
    details, problems, preds, skipped = {}, [], {}, {}
    for name, args in INFER_RUNS.items():
        try:
            why = _prepare_run(ws, name)
            if why is not None:
                skipped[name] = why
                continue
            details[name], preds[name] = _infer_one(ws, name, args)
        except Exception as exc:  # one backend failing does not hide the others
            problems.append(f"{name}: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}")
    problems += _check_infer(details, preds)
    details["skipped"] = skipped
    if "tensorrt_cuda" in details:
        ws.rates["infer_tiles_per_s"] = details["tensorrt_cuda"]["tiles_per_s"]
    elif "torch_cuda" in details:
        ws.rates["infer_tiles_per_s_torch"] = details["torch_cuda"]["tiles_per_s"]
    return details, problems


def _check_infer(details: dict, preds: dict) -> list[str]:
    problems = []
    ref = preds.get("torch_cpu")
    for name, x in preds.items():
        where = details[name]
        gpu = name != "torch_cpu"
        if gpu and not str(where["device"]).startswith("cuda"):
            problems.append(f"{name}: the encoder ran on {where['device']}")
        want_bank = "cpu" if name in ("torch_cpu", "engine_device_cpu") else "cuda"
        if not str(where["bank_device"]).startswith(want_bank):
            problems.append(f"{name}: the bank was on {where['bank_device']}")
        if ref is not None and gpu:
            cos = (x * ref).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(ref, axis=1))
            where["cosine_to_torch_cpu"] = {"mean": float(cos.mean()), "min": float(cos.min())}
            if cos.mean() < 0.99:
                problems.append(f"{name}: mean cosine to torch on the CPU {cos.mean():.4f}")
    return problems


def _encoders(ws: Workspace) -> dict[str, tuple]:
    """Each encoder backend on the GPU: (what makes it, why it cannot run here or None)."""
    from mclx.inference.encoders import OnnxRuntimeEncoder, TorchEncoder

    def engine():
        from mclx.inference.tensorrt import TensorRTEncoder

        return TensorRTEncoder(ws.engine("default.engine", 256))

    return {
        "torch_fp32": (lambda: TorchEncoder(ws.ck(), device="cuda"), None),
        "torch_fp16": (lambda: TorchEncoder(ws.ck(), precision="fp16", device="cuda"), None),
        "onnxruntime_cuda": (
            lambda: OnnxRuntimeEncoder(ws.onnx(), device="cuda"),
            onnxruntime_cuda_missing(),
        ),
        "tensorrt_fp16": (engine, tensorrt_missing()),
    }


def throughput(ws: Workspace):
    """Images/s of each encoder backend at batch 256 (those installed); with the
    retrieval and infer rates the other checks measured."""
    x = ws.patches(256)
    rates, problems, skipped = {}, [], {}
    for name, (make, why) in _encoders(ws).items():
        if why is not None:
            skipped[name] = why
            continue
        try:
            enc = make()
            enc(x)  # warm-up
            _sync()
            t0 = time.perf_counter()
            for _ in range(3):
                enc(x)
            _sync()
            rates[name] = round(3 * len(x) / (time.perf_counter() - t0), 1)
        except Exception as exc:  # one backend failing does not hide the others
            problems.append(f"{name}: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}")
    ws.ck().model.cpu()
    return {"images_per_s_batch_256": rates, "skipped": skipped, **ws.rates}, problems
