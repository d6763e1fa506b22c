"""The default recipe at reduced precision, end to end (#27): one reproducible run.

    .venv/bin/python bench/default_recipe_formats.py [--work DIR] [--epochs 90]

Trains ``--recipe default --freeze-encoder`` on HER2+ C3-C6, builds the bank of C3-C6,
exports every CPU format (``--int8 --openvino``, calibrated and gated on real spots),
runs ``mclx infer`` on C2 at its spots with ``--backend auto`` (its summary line says
which format it took), then, in one process, encodes C2's spots with each format:
encode rate against eager PyTorch FP32 measured in the same run, PCC(ACG) on C2 against
the measured expression, and the gate's record. Last, the plain BF16 and INT8 matrix
products of the same cores, and the encoder's arithmetic rate as a fraction of them
(DenseNet-121: 5.7 GFLOP per 224 px image), and the whole-slide stream of ``--backend
auto``'s encoder over C2 as a pyramidal TIFF against that encoder alone on the same
tiles. Steps whose output exists are skipped.
Needs the her2st data (``MCLX_HER2ST``) and the openvino extra; ~15 min on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

GFLOP_PER_IMAGE = 5.7  # DenseNet-121, 224 px (multiply-adds x 2)
ROWS = (  # (label, backend, precision)
    ("torch fp32 (eager)", "torch", "fp32"),
    ("torch bf16", "torch", "bf16"),
    ("openvino fp32", "openvino", "fp32"),
    ("openvino bf16", "openvino", "bf16"),
    ("openvino int8", "openvino", "int8"),
    ("onnxruntime int8", "onnxruntime", "int8"),
)


def mclx(*args: str, check: bool = True) -> bool:
    """Run one mclx command, echoing it and its output; whether it succeeded."""
    cmd = [str(Path(sys.executable).with_name("mclx")), *args]
    print("$", " ".join(cmd), flush=True)
    out = subprocess.run(cmd, capture_output=True, text=True)
    print(out.stdout.strip(), out.stderr.strip()[-2000:], sep="\n", flush=True)
    if check and out.returncode:
        raise SystemExit(f"{cmd[1]} failed")
    return out.returncode == 0


def prepare(work: Path, data: Path, epochs: int) -> tuple[Path, Path]:
    """The checkpoint, its bank and its exports (skipped where they exist)."""
    ck, bank = work / "model.pt", work / "bank.npz"
    if not ck.is_file():
        mclx("train", "--data", str(data), "--sections", "C3,C4,C5,C6", "--freeze-encoder",
             "--epochs", str(epochs), "--out", str(ck), "--quiet")  # fmt: skip
    if not bank.is_file():
        mclx("bank", "build", "--ckpt", str(ck), "--data", str(data),
             "--sections", "C3,C4,C5,C6", "--out", str(bank))  # fmt: skip
    if not ck.with_name("model.export.json").is_file():
        # a format that fails its gate is not written and the export exits non-zero, but
        # the formats that held are written and recorded: what auto chooses from
        mclx("export", "--ckpt", str(ck), "--int8", "--openvino", "--calib-data", str(data),
             check=False)  # fmt: skip
    return ck, bank


def infer_auto(work: Path, data: Path, bank: Path) -> None:
    root = data / "data" if (data / "data").is_dir() else data
    image = next((root / "ST-imgs" / "C" / "C2").glob("*.jpg"))
    out = work / "C2.auto.h5ad"
    out.unlink(missing_ok=True)
    mclx("infer", str(image), "--spots", str(root / "ST-spotfiles" / "C2_selection.tsv"),
         "--bank", str(bank), "--backend", "auto", "--out", str(out), "--quiet")  # fmt: skip


def encode_rate(encoder, patches: np.ndarray, batch: int = 64) -> tuple[np.ndarray, float]:
    """All embeddings and the steady-state rate (images/s; the first batch, which pays
    one-time compilation, is run twice and timed the second time)."""
    getattr(encoder, "warm_up", lambda: None)()
    encoder(patches[:batch])
    t = time.perf_counter()
    out = [encoder(patches[s : s + batch]) for s in range(0, len(patches), batch)]
    return np.concatenate(out), len(patches) / (time.perf_counter() - t)


def formats(ck_path: Path, bank_path: Path, data: Path) -> dict:  # long: one table, row by row
    from mclx.bank import load_bank
    from mclx.checkpoint import load_checkpoint
    from mclx.data.dataset import build_table
    from mclx.data.her2st import read_section
    from mclx.data.patches import model_patches
    from mclx.evaluation.metrics import pearson_per_gene
    from mclx.inference import open_encoder
    from mclx.inference.formats import read_report
    from mclx.inference.predict import match

    ck, bank = load_checkpoint(ck_path), load_bank(bank_path)
    c2 = read_section(data, "C2")
    patches = model_patches(c2, ck.preprocess)
    truth = build_table({"C2": c2}, ck.preprocess).expr
    report = read_report(ck_path)
    rows, base = {}, None
    for label, backend, precision in ROWS:
        try:
            enc = open_encoder(ck_path, backend=backend, precision=precision, device="cpu")
        except Exception as exc:  # not exported, not installed, no bf16 arithmetic
            print(f"{label:<20} skipped: {exc}", flush=True)
            continue
        emb, rate = encode_rate(enc, patches)
        pred = np.asarray(match(emb, bank))
        pcc = float(np.nanmean(pearson_per_gene(pred, truth)))
        base = base or rate
        name = {"torch": "torch", "openvino": "openvino", "onnxruntime": "onnx"}[backend]
        key = name if precision == "fp32" else f"{name}-{precision}"
        rec = report.get(key, {})
        rows[label] = {"rate": rate, "x_fp32": rate / base, "pcc_acg": pcc,
                       "held": rec.get("held"), "min_cosine": rec.get("min_cosine"),
                       "task": rec.get("task")}  # fmt: skip
        print(f"{label:<20} {rate:7.1f} img/s  {rate / base:5.2f}x eager fp32  "
              f"PCC(ACG) {pcc:.4f}  gate held {rec.get('held')}  "
              f"cosine {rec.get('min_cosine')}", flush=True)  # fmt: skip
    return rows


def whole_slide(ck_path: Path, bank_path: Path, data: Path, work: Path) -> dict:
    """``--backend auto``'s encoder over C2 as a pyramidal TIFF, tiles over all its
    tissue: end-to-end tiles/s (read, encode, retrieve; the stream ``mclx infer`` runs)
    against encoder-only tiles/s on the same tiles in memory, before and after."""
    from mclx.bank import load_bank
    from mclx.data.her2st import read_section
    from mclx.data.resolution import tile_size
    from mclx.data.slide import load_image, open_slide, write_pyramidal_tiff
    from mclx.inference import open_encoder
    from mclx.wsi.plan import view_sizes
    from mclx.wsi.prefetch import read_tile
    from mclx.wsi.runtime import stream
    from mclx.wsi.tiling import grid_tiles

    c2 = read_section(data, "C2")
    path = work / "C2.tif"
    if not path.is_file():
        write_pyramidal_tiff(load_image(c2.uns["image_path"]), path, mpp=float(c2.uns["mpp"]))
    slide, bank = open_slide(path), load_bank(bank_path)
    enc = open_encoder(ck_path, device="cpu")
    tiles = grid_tiles(slide, size=tile_size(enc.pre, slide.mpp, str(path)))
    tiles.views = view_sizes(enc.pre, slide.mpp, str(path))  # the default's wide field
    size = enc.pre.patch_size
    imgs = np.stack([read_tile(slide, tiles.crops(i), size) for i in range(len(tiles))])
    _, before = encode_rate(enc, imgs)
    t = time.perf_counter()
    _, timings = stream(slide, tiles, enc, bank, batch_size=64, progress=False)
    e2e = len(tiles) / (time.perf_counter() - t)
    _, after = encode_rate(enc, imgs)
    only = (before + after) / 2
    print(f"whole slide C2: {len(tiles)} tiles, {enc.name}/{enc.precision}: end to end "
          f"{e2e:.1f} tiles/s, encoder only {before:.1f} / {after:.1f} tiles/s (before / "
          f"after): {e2e / only:.2f}x; seconds "
          f"{json.dumps({k: round(v, 2) for k, v in timings.items()})}",
          flush=True)  # fmt: skip
    return {"tiles": len(tiles), "end_to_end": e2e, "encoder_only": [before, after],
            "timings": timings, "backend": [enc.name, enc.precision]}  # fmt: skip


def matmul_rates(n: int = 2048, repeats: int = 10) -> dict[str, float]:
    """TFLOP/s (TOP/s for int8) of plain square matrix products on all cores: bf16
    (oneDNN, AMX where present) and int8 (``torch._int_mm``)."""
    import torch

    out = {}
    a, b = torch.randn(n, n), torch.randn(n, n)
    cases = {"fp32": (a, b, torch.mm), "bf16": (a.bfloat16(), b.bfloat16(), torch.mm)}
    if hasattr(torch, "_int_mm"):
        q = torch.randint(-128, 127, (n, n), dtype=torch.int8)
        cases["int8"] = (q, q.clone(), torch._int_mm)
    for name, (x, y, op) in cases.items():
        try:
            op(x, y)
        except RuntimeError:
            continue
        t = time.perf_counter()
        for _ in range(repeats):
            op(x, y)
        out[name] = 2 * n**3 * repeats / (time.perf_counter() - t) / 1e12
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("default_recipe_formats"))
    p.add_argument("--epochs", type=int, default=90)
    here = Path(__file__).resolve().parents[2] / "shared" / "data" / "her2st"
    p.add_argument("--data", type=Path, default=Path(os.environ.get("MCLX_HER2ST", here)))
    p.add_argument("--stages", default="infer,formats,slide,peak",
                   help="which of infer, formats, slide, peak to run")  # fmt: skip
    args = p.parse_args()
    stages = set(args.stages.split(","))
    args.work.mkdir(parents=True, exist_ok=True)
    ck, bank = prepare(args.work, args.data, args.epochs)
    out: dict = {}
    if "infer" in stages:
        infer_auto(args.work, args.data, bank)
    if "formats" in stages:
        out["rows"] = formats(ck, bank, args.data)
    if "slide" in stages:
        out["slide"] = whole_slide(ck, bank, args.data, args.work)
    if "peak" in stages:
        out["peak"] = peak = matmul_rates()
        print("matrix products (same cores):", {k: f"{v:.2f} T/s" for k, v in peak.items()})
        for label, row in out.get("rows", {}).items():
            tflops = row["rate"] * GFLOP_PER_IMAGE / 1e3
            kind = "int8" if "int8" in label else "bf16" if "bf16" in label else "fp32"
            if kind in peak:
                share = tflops / peak[kind]
                print(f"{label:<20} {tflops:.3f} TFLOP/s = {share:.1%} of the {kind} product")
    (args.work / f"formats-{'-'.join(sorted(stages))}.json").write_text(
        json.dumps(out, indent=2, default=str)
    )


if __name__ == "__main__":
    main()
