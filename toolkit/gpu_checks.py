"""The checks of ``python -m mclx.gpu_check`` (see :mod:`mclx.gpu_check`).

Each check takes the :class:`Workspace` (a DenseNet-121 checkpoint with random weights,
synthetic her2st-layout data, its bank, slide and exports, built once and shared) and
returns ``(details, problems)``: what it measured, and why it failed (empty: passed).
Reference embeddings are PyTorch FP32 on the CPU. Written for an NVIDIA GPU with the
``gpu`` extra; nothing here has run on one yet (README, "GPU").
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MAX_REL_FP32 = 1e-4
MIN_COS = 0.99
N_BANK, N_QUERIES, K = 200_000, 4_096, 200


def batches(max_batch: int) -> list[int]:
    """Batch sizes a TensorRT engine is checked at: 1, 7, max, max + 1, 3 max + 5."""
    return [1, 7, max_batch, max_batch + 1, 3 * max_batch + 5]


@dataclass
class Workspace:
    """Inputs shared by the checks, each made on first use under ``root``."""

    root: Path
    made: dict[str, Any] = field(default_factory=dict)
    rates: dict[str, float] = field(default_factory=dict)  # throughput seen by the checks
    most: int = 3 * 256 + 5  # the most patches a check compares: references made at once

    def _once(self, key: str, make):
        if key not in self.made:
            self.made[key] = make()
        return self.made[key]

    def data(self) -> Path:
        from mclx.data.synthetic import write_synthetic_her2st

        return self._once("data", lambda: write_synthetic_her2st(self.root / "synthetic"))

    def checkpoint(self, name: str = "model.pt", seed: int = 0) -> Path:
        return self._once(f"ck:{name}", lambda: _densenet_checkpoint(self, name, seed))

    def ck(self):
        from mclx.checkpoint import load_checkpoint

        return self._once("loaded", lambda: load_checkpoint(self.checkpoint()))

    def onnx(self, precision: str = "fp32") -> Path:
        from mclx.export.onnx_export import export_onnx

        path = self.root / ("model.onnx" if precision == "fp32" else "model.fp16.onnx")
        return self._once(
            f"onnx:{precision}", lambda: export_onnx(self.ck(), path, precision=precision)
        )

    def engine(self, name: str, max_batch: int, precision: str = "fp16") -> Path:
        from mclx.export.tensorrt_build import build_engine

        def make():
            out = self.root / name
            cache = self.root / "timing.cache"  # shared: later builds reuse the timings
            graph = self.onnx(precision)
            build_engine(graph, out, max_batch=max_batch, timing_cache=cache, source=self.onnx())
            return out

        return self._once(f"engine:{name}", make)

    def patches(self, n: int) -> np.ndarray:
        """``n`` uint8 patches from the synthetic sections (flipped and turned copies
        when the sections have fewer spots)."""
        from mclx.export.calib import calibration_patches

        def make():
            base, _ = calibration_patches(self.data(), n=1000)
            turns = [base, base[:, ::-1], base[:, :, ::-1], base.transpose(0, 2, 1, 3)]
            return np.ascontiguousarray(np.concatenate(turns))

        pool = self._once("patches", make)
        return np.ascontiguousarray(np.resize(pool, (n, *pool.shape[1:])))

    def reference(self, n: int) -> np.ndarray:
        """PyTorch FP32 (CPU) embeddings of ``patches(n)``, computed once for the most."""
        from mclx.inference.encoders import TorchEncoder

        have = self.made.get("reference")
        if have is None or len(have) < n:
            x = self.patches(max(n, self.most))
            enc = TorchEncoder(self.ck())
            have = np.concatenate([enc(x[s : s + 64]) for s in range(0, len(x), 64)])
            self.made["reference"] = have
        return have[:n]

    def bank(self) -> Path:
        from mclx.bank import build_bank, save_bank

        path = self.root / "bank.npz"
        return self._once(
            "bank",
            lambda: save_bank(
                build_bank(self.checkpoint(), self.data(), sections=["S1", "S2", "S4"]), path
            ),
        )

    def slide(self) -> Path:
        return self._once("slide", lambda: _slide(self))


def _densenet_checkpoint(ws: Workspace, name: str, seed: int) -> Path:
    import torch

    from mclx.checkpoint import save_checkpoint
    from mclx.config import ModelCfg, PreprocessCfg
    from mclx.data.synthetic import PITCH_PX
    from mclx.models import create_model

    genes = (ws.data() / "genes.txt").read_text().split()
    torch.manual_seed(seed)
    net = create_model(ModelCfg(encoder="densenet121", n_genes=len(genes), pos_size=(64, 64)))
    path = ws.root / name
    save_checkpoint(
        path, net.eval(), preprocess=PreprocessCfg(genes=tuple(genes), mpp=200 / PITCH_PX)
    )
    return path


def _slide(ws: Workspace) -> Path:
    from mclx.data.slide import load_image, write_pyramidal_tiff
    from mclx.data.synthetic import PITCH_PX

    image = load_image(ws.data() / "data" / "ST-imgs" / "S" / "S3" / "S3.jpg")
    return write_pyramidal_tiff(image, ws.root / "S3.tif", mpp=200.0 / PITCH_PX, tile=256, levels=3)


def _compare(ref, got) -> dict[str, float]:
    from mclx.export.parity import compare

    res = compare(ref, got)
    return {"max_rel_err": res["max_rel_err"], "min_cosine": res["min_cosine"]}


# --- environment --------------------------------------------------------------------


def environment(ws: Workspace):
    """Versions, CUDA majors, one ONNX Runtime distribution, providers."""
    import platform

    import cupy
    import onnxruntime as ort
    import tensorrt
    import torch

    from mclx import __version__
    from mclx.inference.device import onnxruntime_distributions
    from mclx.kernels import nvrtc

    runtime = cupy.cuda.runtime.runtimeGetVersion()
    info = {
        "python": platform.python_version(),
        "mclx": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cupy": cupy.__version__,
        "cupy_cuda_runtime": f"{runtime // 1000}.{runtime % 1000 // 10}",
        "tensorrt": tensorrt.__version__,
        "onnxruntime": ort.__version__,
        "onnxruntime_distributions": onnxruntime_distributions(),
        "onnxruntime_providers": ort.get_available_providers(),
        "nvrtc": ".".join(map(str, nvrtc.version())),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    }
    majors = {
        "torch": int(str(torch.version.cuda).split(".")[0]) if torch.version.cuda else None,
        "cupy": runtime // 1000,
        "nvrtc": nvrtc.version()[0],
        "tensorrt": _tensorrt_cuda_major(),
    }
    info["cuda_majors"] = majors
    problems = []
    if len(info["onnxruntime_distributions"]) != 1:
        problems.append(f"ONNX Runtime distributions: {info['onnxruntime_distributions']}")
    if "CUDAExecutionProvider" not in info["onnxruntime_providers"]:
        problems.append("ONNX Runtime has no CUDAExecutionProvider")
    if len({v for v in majors.values() if v is not None}) != 1:
        problems.append(f"CUDA majors differ: {majors}")
    if not torch.cuda.is_available():
        problems.append("PyTorch sees no CUDA GPU")
    return info, problems


def _tensorrt_cuda_major() -> int | None:
    """The CUDA major of the installed TensorRT wheel (tensorrt-cu12 / tensorrt-cu13)."""
    from importlib import metadata

    for major in (13, 12):
        for name in (f"tensorrt-cu{major}-libs", f"tensorrt-cu{major}", f"tensorrt_cu{major}_libs"):
            try:
                metadata.version(name)
                return major
            except metadata.PackageNotFoundError:
                continue
    return None


# --- TensorRT -----------------------------------------------------------------------


def _busy_null_stream():
    """Queue ~20 ms of work on the legacy null stream: copies that wrongly go there
    would wait behind it, or race with the engine."""
    import cupy as cp

    with cp.cuda.Stream.null:
        a = cp.ones((4096, 4096), cp.float32)
        for _ in range(8):
            a = (a @ a) * np.float32(1e-4)
    return a


def engine_parity(ws: Workspace, engine: Path, max_batch: int, fp32: bool) -> tuple[dict, list]:
    """The engine against PyTorch FP32 (CPU) at :func:`batches`, from host and from
    device (made on the null stream), with the null stream busy."""
    import cupy as cp

    from mclx.inference.tensorrt import TensorRTEncoder
    from mclx.inference.transform import to_model_input

    enc = TensorRTEncoder(engine)
    details, problems = {"profile": [enc.min_batch, enc.max_batch], "precision": enc.precision}, []
    for n in batches(max_batch):
        x, ref = ws.patches(n), ws.reference(n)
        for where in ("host", "device"):
            batch = x if where == "host" else cp.asarray(to_model_input(x, enc.pre))
            _busy_null_stream()
            res = _compare(ref, enc(batch).get())
            details[f"batch_{n}_{where}"] = res
            if fp32 and res["max_rel_err"] > MAX_REL_FP32:
                problems.append(f"batch {n} ({where}): max relative error {res['max_rel_err']:.2e}")
            if res["min_cosine"] < MIN_COS:
                problems.append(f"batch {n} ({where}): min cosine {res['min_cosine']:.4f}")
    return details, problems


def tensorrt_fp16(ws: Workspace):
    """``mclx export --trt --max-batch 32`` and an engine at the default 256: FP16."""
    from mclx.export.exporter import export

    t0 = time.perf_counter()
    rep = export(ws.checkpoint(), trt=True, max_batch=32, calib_data=ws.data(), log=lambda *_: None)
    details = {"export_max_batch_32": rep["engine"], "export_seconds": time.perf_counter() - t0}
    problems = [] if rep["engine"]["precision"] == "fp16" else ["export built no FP16 engine"]
    engine = ws.checkpoint().with_suffix(".engine")
    details["max_batch_32"], more = engine_parity(ws, engine, 32, fp32=False)
    problems += [f"max batch 32, {p}" for p in more]
    t0 = time.perf_counter()
    default = ws.engine("default.engine", 256)
    details["default_build_seconds"] = time.perf_counter() - t0
    details["max_batch_256"], more = engine_parity(ws, default, 256, fp32=False)
    problems += [f"max batch 256, {p}" for p in more]
    return details, problems


def tensorrt_fp32(ws: Workspace):
    """An FP32 engine (TF32 cleared) within 1e-4 of PyTorch."""
    engine = ws.engine("fp32.engine", 32, precision="fp32")
    return engine_parity(ws, engine, 32, fp32=True)


def tensorrt_refusals(ws: Workspace):
    """An engine of another checkpoint, and a sidecar of another build, are refused."""
    from mclx.errors import FingerprintMismatch, FormatError
    from mclx.inference import open_encoder
    from mclx.inference.tensorrt import TensorRTEncoder, sidecar_path

    engine = ws.engine("fp32.engine", 32, precision="fp32")
    other = ws.checkpoint("other.pt", seed=1)
    shutil.copy(engine, other.with_suffix(".engine"))
    shutil.copy(sidecar_path(engine), sidecar_path(other.with_suffix(".engine")))
    details, problems = {}, []
    try:
        open_encoder(other, backend="tensorrt", device="cuda")
        problems.append("an engine of another checkpoint was opened")
    except FingerprintMismatch as exc:
        details["other_checkpoint"] = str(exc)
    mixed = ws.root / "mixed.engine"
    shutil.copy(ws.engine("default.engine", 256), mixed)
    shutil.copy(sidecar_path(engine), sidecar_path(mixed))
    try:
        TensorRTEncoder(mixed)
        problems.append("an engine with the sidecar of another build was opened")
    except FormatError as exc:
        details["other_build"] = str(exc)
    return details, problems


# --- ONNX Runtime and PyTorch on the GPU ----------------------------------------------


def onnxruntime_cuda(ws: Workspace):
    """The FP32 ONNX file in ONNX Runtime's CUDA provider, really on CUDA, within 1e-4."""
    from mclx.inference.encoders import OnnxRuntimeEncoder

    enc = OnnxRuntimeEncoder(ws.onnx(), device="cuda")
    providers = enc.session.get_providers()
    details, problems = {"providers": providers}, []
    if providers[0] != "CUDAExecutionProvider":
        problems.append(f"session providers {providers}")
    for n in (7, 64):
        res = details[f"batch_{n}"] = _compare(ws.reference(n), enc(ws.patches(n)))
        if res["max_rel_err"] > MAX_REL_FP32:
            problems.append(f"batch {n}: max relative error {res['max_rel_err']:.2e}")
    return details, problems


def torch_gpu(ws: Workspace):
    """PyTorch on the GPU: FP32 (TF32 off) within 1e-4, FP16 autocast cosine >= 0.99."""
    from mclx.inference.encoders import TorchEncoder

    details, problems = {}, []
    for precision in ("fp32", "fp16"):
        enc = TorchEncoder(ws.ck(), precision=precision, device="cuda")
        res = details[precision] = _compare(ws.reference(64), enc(ws.patches(64)))
        ws.ck().model.cpu()
        if precision == "fp32" and res["max_rel_err"] > MAX_REL_FP32:
            problems.append(f"fp32: max relative error {res['max_rel_err']:.2e}")
        if res["min_cosine"] < MIN_COS:
            problems.append(f"{precision}: min cosine {res['min_cosine']:.4f}")
    return details, problems
