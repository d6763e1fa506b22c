"""``make demo``: the whole chain on an embedded default, through the real commands.

Uses the HER2+ data when ``$MCLX_HER2ST`` or ``../shared/data/her2st`` exists, otherwise
writes a small synthetic dataset in the same layout. Outputs land in ``demo_out/``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from mclx.cli import main as mclx

OUT = Path("demo_out")


def find_data() -> tuple[Path, bool]:
    """The real data folder when present, else a synthetic one (created once)."""
    for cand in (os.environ.get("MCLX_HER2ST"), "../shared/data/her2st"):
        if cand and (Path(cand) / "data" / "ST-cnts").is_dir():
            return Path(cand), True
    from mclx.data.synthetic import write_synthetic_her2st

    root = OUT / "synthetic"
    if not (root / "genes.txt").is_file():
        write_synthetic_her2st(root)
    return root, False


def run(*args: object) -> None:
    argv = [str(a) for a in args]
    print(f"\n$ mclx {' '.join(argv)}", flush=True)
    try:
        mclx(argv)
    except SystemExit as exc:
        if exc.code:
            raise


def main() -> None:
    t0 = time.perf_counter()
    OUT.mkdir(exist_ok=True)
    data, real = find_data()
    print(f"mclx demo on {'her2st' if real else 'synthetic'} data: {data}")
    if real:
        holdout, sections, encoder = "C2", "C2,C3,C4", "densenet121"
        genes: list[object] = []
    else:
        holdout, sections, encoder = "S3", "S1,S2,S3", "tiny_cnn"
        genes = ["--genes", data / "genes.txt"]
    common = ["--data", data, "--encoder", encoder, "--freeze-encoder", *genes]
    run("train", *common, "--holdout", holdout, "--epochs", 30, "--out", OUT / "model.pt")
    run("evaluate", *common, "--sections", sections, "--epochs", 30, "--out", OUT / "evaluate.json")
    print(
        f"\nmclx demo done in {time.perf_counter() - t0:.0f} s: checkpoint {OUT / 'model.pt'}, "
        f"evaluation {OUT / 'evaluate.json'} and {OUT / 'evaluate.genes.csv'}"
    )


if __name__ == "__main__":
    sys.exit(main())
