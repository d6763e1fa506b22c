"""Issue #28's measurement: leave-one-section-out on her2st C2-C6 (frozen random-init
DenseNet-121, recipe default) of ridge, knn, mclstexp and bleep without and with
``--context-radius``, one process per seed so that every configuration reads the same
cached features. The radius for mclstexp and bleep is ridge's best on seed 0 among
RADII; seed 1 (another random encoder) repeats the chosen radius.

    python bench/context_loo.py OUT_DIR SEED [RADIUS]   (one JSON line per run in OUT_DIR/log.jsonl)
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from mclx.cli.model_options import ModelOptions
from mclx.evaluation.evaluate import cross_validate

DATA = "/work/shared/data/her2st"
RADII = (300.0, 500.0, 800.0)


def run(out: Path, caches, model: str, seed: int, radius: float) -> float:
    opts = ModelOptions(model=model, freeze_encoder=True, seed=seed, context_radius=radius)
    t0 = time.perf_counter()
    res = cross_validate(DATA, opts.recipe(), caches=caches, progress=False)
    row = {
        "model": model, "seed": seed, "radius": radius,
        "mean": res["mean"],
        "acg": {s: r["pcc_acg"] for s, r in res["sections"].items()},
        "seconds": round(time.perf_counter() - t0, 1),
    }  # fmt: skip
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)
    return res["mean"]["pcc_acg"]


def main() -> None:
    out, seed = Path(sys.argv[1]), int(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    caches: dict = {}
    if len(sys.argv) > 3:
        best = float(sys.argv[3])
        run(out, caches, "ridge", seed, 0.0)
        run(out, caches, "ridge", seed, best)
    else:
        scores = {r: run(out, caches, "ridge", seed, r) for r in (0.0, *RADII)}
        best = max(RADII, key=scores.get)
    for model in ("knn", "mclstexp", "bleep"):
        run(out, caches, model, seed, 0.0)
        run(out, caches, model, seed, best)


if __name__ == "__main__":
    main()
