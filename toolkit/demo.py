"""``make demo``: the whole chain on an embedded default, through the real commands.

train -> bank build -> export -> infer (with plots, GeoJSON) -> view. Uses the HER2+ data when
``$MCLX_HER2ST`` or ``../shared/data/her2st`` exists (held-out section C2, predicted at
its spots), otherwise writes a small synthetic dataset in the same layout and a pyramidal
TIFF slide (predicted on a tissue grid read through OpenSlide). Outputs go to demo_out/.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from mclx.cli import main as mclx

OUT = Path("demo_out")


def find_data() -> Path | None:
    for cand in (os.environ.get("MCLX_HER2ST"), "../shared/data/her2st"):
        if cand and (Path(cand) / "data" / "ST-cnts").is_dir():
            return Path(cand)
    return None


def run(*args: object) -> None:
    argv = [str(a) for a in args]
    print(f"\n$ mclx {' '.join(argv)}", flush=True)
    t0 = time.perf_counter()
    try:
        mclx(argv)
    except SystemExit as exc:
        if exc.code:
            raise
    print(f"({argv[0]} took {time.perf_counter() - t0:.0f} s)", flush=True)


def synthetic_inputs() -> tuple[Path, Path]:
    """Synthetic her2st-layout data and a pyramidal TIFF of its held-out section S3."""
    from mclx.data.slide import load_image, write_pyramidal_tiff
    from mclx.data.synthetic import PITCH_PX, write_synthetic_her2st

    root = OUT / "synthetic"
    if not (root / "genes.txt").is_file():
        write_synthetic_her2st(root)
    slide = OUT / "S3.tif"
    if not slide.is_file():
        image = load_image(root / "data" / "ST-imgs" / "S" / "S3" / "S3.jpg")
        write_pyramidal_tiff(image, slide, mpp=200.0 / PITCH_PX, tile=256, levels=3)
    return root, slide


def bank_sections(candidates: str, predicted: str) -> str:
    """The bank's sections without the one the demo predicts: a bank holding it would
    predict each spot from itself (leakage), and the maps would look better than true."""
    return ",".join(s for s in candidates.split(",") if s != predicted)


def her2st_steps(data: Path, model: Path, bank: Path) -> list[list[object]]:
    """train on C3-C6 (frozen features, cached for the next run) -> a bank of five
    sections without C2 -> export -> infer C2 at its spots."""
    spots = data / "data" / "ST-spotfiles" / "C2_selection.tsv"
    slide = next((data / "data" / "ST-imgs" / "C" / "C2").glob("*.jpg"))
    return [
        ["train", "--data", data, "--sections", "C3,C4,C5,C6", "--freeze-encoder",
         "--epochs", 10, "--out", model],
        ["bank", "build", "--ckpt", model, "--data", data,
         "--sections", bank_sections("C1,C3,C4,C5,C6", "C2"), "--out", bank],
        ["export", "--ckpt", model, "--calib-data", data],
        ["infer", slide, "--bank", bank, "--spots", spots, "--plot", "FASN", "--plot", "GNAS",
         "--geojson", OUT / "C2.geojson", "--geojson-genes", 50, "--out", OUT / "C2.h5ad"],
        ["view", OUT / "C2.h5ad", "--gene", "FASN", "--out", OUT / "C2_view"],
    ]  # fmt: skip


def synthetic_steps(model: Path, bank: Path) -> list[list[object]]:
    """A tiny CNN trained on S1, S2 -> bank without S3 -> export (+ INT8) -> infer S3's slide."""
    root, slide = synthetic_inputs()
    return [
        ["train", "--data", root, "--sections", "S1,S2", "--encoder", "tiny_cnn",
         "--encoder-weights", "none", "--genes", root / "genes.txt", "--freeze-encoder",
         "--epochs", 80, "--batch-size", 32, "--lr", "1e-3", "--out", model],
        ["bank", "build", "--ckpt", model, "--data", root,
         "--sections", bank_sections("S1,S2,S4", "S3"), "--out", bank],
        ["export", "--ckpt", model, "--int8", "--calib-data", root],
        ["infer", slide, "--bank", bank, "--k", 20, "--plot", "GENE000", "--plot", "GENE001",
         "--geojson", OUT / "S3.geojson", "--out", OUT / "S3.h5ad"],
        ["view", OUT / "S3.h5ad", "--out", OUT / "S3_view"],
    ]  # fmt: skip


def main() -> int:
    t0 = time.perf_counter()
    OUT.mkdir(exist_ok=True)
    data = find_data()
    model, bank = OUT / "model.pt", OUT / "bank.npz"
    if data is not None:
        print(f"mclx demo on the HER2+ data in {data}; C2 is held out")
        steps = her2st_steps(data, model, bank)
    else:
        print(f"mclx demo on synthetic data in {OUT / 'synthetic'} (no HER2+ data); S3 held out")
        steps = synthetic_steps(model, bank)
    viewer = _viewer_missing()
    if viewer:  # the demo still shows everything else
        print(f"mclx demo: skipping `mclx view`: {viewer}")
        steps = steps[:-1]
    for step in steps:
        run(*step)
    infer = next(s for s in steps if s[0] == "infer")
    print(
        f"\nmclx demo done in {time.perf_counter() - t0:.0f} s. Predictions: {infer[-1]} "
        f"(sc.read_h5ad, then sc.pl.spatial(adata, color=GENE)); plots: {OUT}/*.png; "
        f"QuPath objects: {OUT}/*.geojson; checkpoint {model}, bank {bank}, ONNX encoder "
        f"{model.with_suffix('.onnx')}"
        + ("" if viewer else f"; viewer: open {steps[-1][-1]}/index.html in a browser")
    )
    return 0


def _viewer_missing() -> str | None:
    from mclx.viewer import openseadragon

    try:
        openseadragon.find()
    except FileNotFoundError as exc:
        return str(exc)
    return None


if __name__ == "__main__":
    sys.exit(main())
