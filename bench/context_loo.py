"""Issue #28's measurement: leave-one-section-out on her2st C2-C6 (frozen random-init
DenseNet-121, recipe default) of models without and with ``--context-radius``, in one
process per seed so that every configuration reads the same cached features.

    python bench/context_loo.py OUT_DIR SEED MODEL:RADIUS[:OPT=VALUE,...] [...]

OPT is a ModelOptions field (``encoder=densenet121``, ``epochs=100``, ``depth=2``) or
``opt.FIELD`` for a ModelCfg size (``--model-opt FIELD=VALUE``), e.g.
``his2st:0:encoder=densenet121,opt.graph_depth=2``; the context options too:
``ridge:0:context_fov=461`` (``--context-fov``), ``ridge:400:context_mode=concat``.

One JSON line per run (mean metrics, per-section PCC(ACG), seconds) in OUT_DIR/log.jsonl.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from mclx.cli.model_options import ModelOptions
from mclx.evaluation.evaluate import cross_validate

DATA = "/work/shared/data/her2st"


def options(spec: str) -> dict:
    """``a=1,b=x,opt.c=2`` as ModelOptions keyword arguments (numbers as numbers)."""
    kw: dict = {}
    model_opts = []
    for item in filter(None, spec.split(",")):
        key, value = item.split("=", 1)
        if key.startswith("opt."):
            model_opts.append(f"{key[4:]}={value}")
            continue
        if value in ("True", "False"):
            kw[key] = value == "True"
            continue
        for cast in (int, float, str):
            try:
                kw[key] = cast(value)
                break
            except ValueError:
                continue
    if model_opts:
        kw["model_opts"] = tuple(model_opts)
    return kw


def run(out: Path, caches, model: str, seed: int, radius: float, extra: str = "") -> None:
    opts = ModelOptions(
        model=model, freeze_encoder=True, seed=seed, context_radius=radius, **options(extra)
    )
    t0 = time.perf_counter()
    res = cross_validate(DATA, opts.recipe(), caches=caches, progress=False)
    row = {
        "model": model, "seed": seed, "radius": radius, "options": extra,
        "mean": res["mean"],
        "acg": {s: r["pcc_acg"] for s, r in res["sections"].items()},
        "seconds": round(time.perf_counter() - t0, 1),
    }  # fmt: skip
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def main() -> None:
    out, seed = Path(sys.argv[1]), int(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    caches: dict = {}
    for spec in sys.argv[3:]:
        model, radius, *extra = spec.split(":", 2)
        run(out, caches, model, seed, float(radius), *extra)


if __name__ == "__main__":
    main()
