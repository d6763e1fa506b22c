"""A small synthetic dataset in the her2st layout, for demos and tests without real data.

Each section is a grid of spots on an H&E-like image; a few latent "tissue programmes"
drive both the colour/texture of the image around a spot and the counts of gene modules,
so a model can learn a real image -> expression relation.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

PITCH_PX = 224  # pixels between array positions (ST pitch 200 µm -> 0.89 µm/px)
MARGIN = 3  # array steps of bare glass around the tissue, as on a real slide


def write_synthetic_her2st(
    root: str | os.PathLike,
    *,
    sections: tuple[str, ...] = ("S1", "S2", "S3"),
    no_image: tuple[str, ...] = ("S4",),
    grid: tuple[int, int] = (10, 10),
    n_genes: int = 40,
    n_programmes: int = 3,
    seed: int = 0,
    scale: float = 30.0,
) -> Path:
    """Write ``root/data/ST-{cnts,spotfiles,imgs}`` and ``root/genes.txt``; return root."""

    rng = np.random.default_rng(seed)
    root = Path(root)
    data = root / "data"
    for sub in ("ST-cnts", "ST-spotfiles"):
        (data / sub).mkdir(parents=True, exist_ok=True)
    genes = [f"GENE{i:03d}" for i in range(n_genes)]
    loadings = rng.gamma(1.0, 1.0, size=(n_programmes, n_genes))
    # H&E-like colours: hues from blue to pink (blends stay saturated, so tissue
    # detection sees every spot), distinct in hue and brightness
    from matplotlib.colors import hsv_to_rgb

    hsv = np.stack(
        [
            rng.uniform(0.55, 1.0, n_programmes),
            rng.uniform(0.55, 0.85, n_programmes),
            rng.uniform(0.35, 0.9, n_programmes),
        ],
        1,
    )
    palette = hsv_to_rgb(hsv) * 255
    for name in sections + no_image:
        _write_section(
            data, name, rng, genes, loadings, palette, grid=grid, scale=scale,
            image=name not in no_image,
        )  # fmt: skip
    (root / "genes.txt").write_text("\n".join(genes) + "\n")
    return root


def _write_section(data: Path, name: str, rng, genes, loadings, palette, *, grid, scale, image):
    """One section: counts driven by smooth programme proportions over the grid, its spot
    file and (``image``) an H&E-like JPEG coloured by the same proportions."""
    from PIL import Image

    nx, ny = grid
    n_programmes = len(loadings)
    xs, ys = np.meshgrid(np.arange(1, nx + 1), np.arange(1, ny + 1), indexing="ij")
    xs, ys = xs.ravel(), ys.ravel()
    # smooth latent field over the grid -> programme proportions per spot
    centres = rng.uniform(0, max(nx, ny), size=(n_programmes, 2))
    d = np.hypot(xs[:, None] - centres[:, 0], ys[:, None] - centres[:, 1])
    props = np.exp(-d / 3.0)
    props /= props.sum(1, keepdims=True)
    rate = scale * props @ loadings + 0.05
    counts = rng.poisson(rate).astype(np.int64)
    index = [f"{x}x{y}" for x, y in zip(xs, ys)]
    header = "\t" + "\t".join(genes) + "\n"
    body = "".join(f"{i}\t" + "\t".join(map(str, row)) + "\n" for i, row in zip(index, counts))
    with gzip.open(data / "ST-cnts" / f"{name}.tsv.gz", "wt") as fh:
        fh.write(header + body)
    px = (xs + MARGIN) * PITCH_PX + rng.normal(0, 1.0, xs.size)
    py = (ys + MARGIN) * PITCH_PX + rng.normal(0, 1.0, ys.size)
    lines = ["x\ty\tnew_x\tnew_y\tpixel_x\tpixel_y\tselected"]
    lines += [
        f"{x}\t{y}\t{x:.3f}\t{y:.3f}\t{a:.2f}\t{b:.2f}\t1" for x, y, a, b in zip(xs, ys, px, py)
    ]
    (data / "ST-spotfiles" / f"{name}_selection.tsv").write_text("\n".join(lines) + "\n")
    if not image:
        return
    w, h = (nx + 2 * MARGIN + 1) * PITCH_PX, (ny + 2 * MARGIN + 1) * PITCH_PX
    img = np.full((h, w, 3), 235.0)
    half = PITCH_PX // 2
    for cx, cy, p in zip(px.astype(int), py.astype(int), props):
        img[cy - half : cy + half, cx - half : cx + half] = p @ palette
    img += rng.normal(0, 12, img.shape)
    folder = data / "ST-imgs" / name[0] / name
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{name}.jpg", quality=90)
