"""What the checks of ``python -m mclx.gpu_check`` share: the :class:`Workspace` (a
DenseNet-121 checkpoint with random weights shaped as the default recipe's model, which
reads a 461 µm wider field of view beside each patch (N x 6 x H x W input), synthetic
her2st-layout data, its bank, slide and exports, each built once on first use), the
work sizes and the comparison.

Each check takes the workspace and returns ``(details, problems)``: what it measured,
and why it failed (empty: passed); it raises :class:`Skipped` when what it needs is not
installed. Reference embeddings are PyTorch FP32 on the CPU.

Work sizes (:data:`N_BANK`, :data:`N_QUERIES`, :data:`K`, :func:`batches`) are chosen so
that the whole check and ``pytest -m gpu`` fit in 8 minutes on one H100 (docs/gpu.md,
"Time budget").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MAX_REL_FP32 = 1e-4
MIN_COS = 0.99
N_BANK, N_QUERIES, K = 200_000, 4_096, 200


class Skipped(Exception):
    """Raised by a check (or part of one) whose package is not installed: the reason."""


def batches(max_batch: int) -> list[int]:
    """Batch sizes a TensorRT engine is checked at: 1, 7, max, max + 1, 3 max + 5."""
    return [1, 7, max_batch, max_batch + 1, 3 * max_batch + 5]


@dataclass
class Workspace:
    """Inputs shared by the checks, each made on first use under ``root``."""

    root: Path
    made: dict[str, Any] = field(default_factory=dict)
    rates: dict[str, float] = field(default_factory=dict)  # throughput seen by the checks

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
            base, _ = calibration_patches(self.data(), n=1000, pre=self.ck().preprocess)
            turns = [base, base[:, ::-1], base[:, :, ::-1], base.transpose(0, 2, 1, 3)]
            return np.ascontiguousarray(np.concatenate(turns))

        pool = self._once("patches", make)
        return np.ascontiguousarray(np.resize(pool, (n, *pool.shape[1:])))

    def reference(self, n: int) -> np.ndarray:
        """PyTorch FP32 (CPU) embeddings of ``patches(n)``; rows already made are kept
        (``patches(m)`` is the start of ``patches(n)``), so each image is encoded once
        and only as many as the checks that run compare (64 without TensorRT, 773 with:
        the CPU reference is the slowest part of a run without it)."""
        from mclx.inference.encoders import TorchEncoder

        have = self.made.get("reference", np.empty((0, 0), np.float32))
        if len(have) < n:
            x = self.patches(n)[len(have) :]
            enc = TorchEncoder(self.ck())
            more = [enc(x[s : s + 64]) for s in range(0, len(x), 64)]
            have = np.concatenate([have, *more]) if len(have) else np.concatenate(more)
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
    from mclx.training.context import DEFAULT_FOV_UM

    genes = (ws.data() / "genes.txt").read_text().split()
    torch.manual_seed(seed)
    wide = DEFAULT_FOV_UM  # the default recipe's wider field of view
    cfg = ModelCfg(encoder="densenet121", n_genes=len(genes), pos_size=(64, 64),
                   context_fov_um=wide)  # fmt: skip
    pre = PreprocessCfg(genes=tuple(genes), mpp=200 / PITCH_PX, views_um=(wide,))
    path = ws.root / name
    save_checkpoint(path, create_model(cfg).eval(), preprocess=pre)
    return path


def _slide(ws: Workspace) -> Path:
    from mclx.data.slide import load_image, write_pyramidal_tiff
    from mclx.data.synthetic import PITCH_PX

    image = load_image(ws.data() / "data" / "ST-imgs" / "S" / "S3" / "S3.jpg")
    return write_pyramidal_tiff(image, ws.root / "S3.tif", mpp=200.0 / PITCH_PX, tile=256, levels=3)


def compare(ref, got) -> dict[str, float]:
    """Max relative error and min cosine of ``got`` against the reference embeddings."""
    from mclx.export.parity import compare as parity

    res = parity(ref, got)
    return {"max_rel_err": res["max_rel_err"], "min_cosine": res["min_cosine"]}
