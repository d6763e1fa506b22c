"""The command line of ``python -m mclx.gpu_check``: the checks in order, the GPU probe,
the JSON report and the exit status (see :mod:`mclx.gpu_check`)."""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mclx.gpu_check.probe import REPORT_VERSION, SKIPPED, probe, skipped


@dataclass(frozen=True)
class Check:
    """One check: ``run(workspace) -> (details, problems)``, what it proves, and
    ``needs() -> reason or None``: why it cannot run here (skipped, not failed)."""

    run: Callable[[Any], tuple[dict, list]]
    about: str
    needs: Callable[[], str | None] | None = None


def default_checks() -> dict[str, Check]:
    """The checks, in the order they run (later ones reuse what earlier ones built):
    those that need no TensorRT first, so a bare CUDA machine runs them all."""
    from mclx.gpu_check import backends, engines, environment, pipeline

    trt = environment.tensorrt_missing
    return {
        "environment": Check(
            environment.environment, "versions, CUDA majors, one ONNX Runtime, providers"
        ),
        "torch_gpu": Check(backends.torch_gpu, "PyTorch FP32 within 1e-4, FP16 cosine >= 0.99"),
        "onnxruntime_cuda": Check(
            backends.onnxruntime_cuda,
            "ONNX Runtime really on CUDA: 1e-4 (needs onnxruntime-gpu)",
            environment.onnxruntime_cuda_missing,
        ),
        "retrieval": Check(pipeline.retrieval, "N 200k, Q 4096, k 200: every array type vs CPU"),
        "infer": Check(pipeline.infer, "mclx infer end to end for each installed backend"),
        "tensorrt_fp16": Check(
            engines.tensorrt_fp16, "FP16 engines (max batch 32, 256): parity", trt
        ),
        "tensorrt_fp32": Check(engines.tensorrt_fp32, "FP32 engine, TF32 off: within 1e-4", trt),
        "tensorrt_refusals": Check(
            engines.tensorrt_refusals, "foreign engine / sidecar refused", trt
        ),
        "throughput": Check(pipeline.throughput, "images/s per installed backend, queries/s"),
    }


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or "(no message)"
    return f"{type(exc).__name__}: {text}"[:400]


def run_checks(
    names: Sequence[str], checks: dict[str, Any], ws: Any, log: Callable[[str], Any]
) -> dict[str, dict[str, Any]]:
    """Run ``names`` in order; each check returns ``(details, problems)``. A check whose
    ``needs`` gives a reason (or that raises :class:`Skipped`) is skipped with it; an
    exception is a failed check with its one-line message and its last frames."""
    from mclx.gpu_check.workspace import Skipped

    results = {}
    for name in names:
        t0 = time.perf_counter()
        needs = getattr(checks[name], "needs", None)
        reason = None
        log(f"gpu-check: {name} ...")
        try:
            reason = needs() if needs is not None else None
            if reason is None:
                details, problems = checks[name].run(ws)
        except Skipped as exc:
            reason = str(exc)
        except Exception as exc:  # a check's failure is reported, not raised
            frames = traceback.format_exception(exc)[-4:]
            details, problems = {"trace": [" ".join(f.split())[:300] for f in frames]}, []
            problems.append(_one_line(exc))
        seconds = round(time.perf_counter() - t0, 2)
        if reason is not None:
            results[name] = {"status": "skipped", "ok": True, "reason": reason}
            log(f"gpu-check: {name}: skipped: {reason}")
            continue
        status = "failed" if problems else "passed"
        results[name] = {"status": status, "ok": not problems, "seconds": seconds,
                         "problems": problems, **details}  # fmt: skip
        verdict = "ok" if not problems else f"FAILED: {problems[0]}"
        log(f"gpu-check: {name}: {verdict} ({seconds:.1f} s)")
    return results


def report(gpus: dict[str, Any], results: dict[str, dict[str, Any]], seconds: float) -> dict:
    """The JSON report: ``passed`` when every check that ran passed (the rest skipped,
    each with its reason), ``failed`` when one that ran failed, ``skipped`` when none
    ran. ``ran`` / ``skipped`` / ``failed`` say plainly which parts ran."""
    failed = [name for name, r in results.items() if r["status"] == "failed"]
    ran = [name for name, r in results.items() if r["status"] != "skipped"]
    skipped = {name: r["reason"] for name, r in results.items() if r["status"] == "skipped"}
    status = "failed" if failed else "passed" if ran else "skipped"
    return {
        "mclx_gpu_check": REPORT_VERSION,
        "status": status,
        "ok": status == "passed",
        "ran": ran,
        "failed": failed,
        "skipped": skipped,
        "seconds": round(seconds, 1),
        "gpus": gpus,
        "checks": results,
    }


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, as every mclx error
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def parse_args(argv: Sequence[str] | None, names: Sequence[str]) -> argparse.Namespace:
    parser = _Parser(
        prog="python -m mclx.gpu_check",
        description="Prove mclx's GPU path on this machine; print a JSON report. Exit 0 "
        "passed, 1 failed, 2 bad arguments, 77 skipped (no NVIDIA GPU).",
    )
    parser.add_argument("--probe", action="store_true", help="Only look for a GPU (exit 0/77).")
    parser.add_argument("--list", action="store_true", help="List the checks and exit.")
    parser.add_argument("--only", default="", help="Comma-separated checks to run (in order).")
    parser.add_argument("--skip", default="", help="Comma-separated checks not to run.")
    parser.add_argument("--out", type=Path, help="Also write the report to this file.")
    parser.add_argument("--workdir", type=Path, help="Build artifacts here (default: a temp dir).")
    args = parser.parse_args(argv)
    for option in ("only", "skip"):
        chosen = [n for n in getattr(args, option).split(",") if n]
        unknown = [n for n in chosen if n not in names]
        if unknown:
            parser.error(f"--{option}: unknown check(s) {', '.join(unknown)} ({', '.join(names)})")
        setattr(args, option, chosen)
    return args


def main(argv: Sequence[str] | None = None, *, checks: dict[str, Any] | None = None) -> int:
    checks = default_checks() if checks is None else checks
    args = parse_args(argv, list(checks))
    if args.list:
        for name, check in checks.items():
            print(f"{name:<22} {check.about}")
        return 0
    gpus, reason = probe()
    if gpus is None:
        print(json.dumps(skipped(reason)))
        return SKIPPED
    if args.probe:
        print(json.dumps({"mclx_gpu_check": REPORT_VERSION, "status": "gpu", "gpus": gpus}))
        return 0
    names = [n for n in (args.only or list(checks)) if n not in args.skip]
    return _run(args, names, checks, gpus)


def _run(args, names, checks, gpus) -> int:
    import tempfile

    from mclx.gpu_check.workspace import Workspace

    t0 = time.perf_counter()
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="mclx-gpu-check-") as tmp:
        ws = Workspace(Path(args.workdir or tmp))
        ws.root.mkdir(parents=True, exist_ok=True)
        results = run_checks(names, checks, ws, log)
    out = report(gpus, results, time.perf_counter() - t0)
    text = json.dumps(out, indent=2, default=str)
    print(text)
    if args.out:
        from mclx.files import write_text_atomic

        write_text_atomic(args.out, text + "\n")
    return {"passed": 0, "failed": 1}.get(out["status"], SKIPPED)
