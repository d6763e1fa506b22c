"""``python -m mclx.gpu_check`` (``make gpu-check``): prove the GPU path on this machine.

Runs the checks of :mod:`mclx.gpu_checks` (environment, TensorRT FP16 and FP32 engines
and their parity, a refused engine, ONNX Runtime on CUDA, torch FP16, retrieval at
N = 200,000 / Q = 4,096 / k = 200 on every array type, ``mclx infer`` end to end, and
throughput) and prints one JSON report on stdout; progress goes to stderr.

Exit status: 0 every check passed; 1 a check failed (the report says which and why);
2 bad arguments; 77 skipped: no NVIDIA GPU here (one JSON line with the reason, the
automake/ctest convention for "skipped": nothing was proven, and it is not a pass).
``--probe`` only looks for a GPU (0 or 77), without importing any GPU library: the
Makefile runs it before installing the GPU stack.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SKIPPED = 77
REPORT_VERSION = 1


@dataclass(frozen=True)
class Check:
    """One check: ``run(workspace) -> (details, problems)``, and what it proves."""

    run: Callable[[Any], tuple[dict, list]]
    about: str


def default_checks() -> dict[str, Check]:
    """The checks, in the order they run (later ones reuse what earlier ones built)."""
    from mclx import gpu_checks as enc
    from mclx import gpu_checks_pipeline as pipe

    return {
        "environment": Check(enc.environment, "versions, CUDA majors, one ONNX Runtime, providers"),
        "tensorrt_fp16": Check(enc.tensorrt_fp16, "FP16 engines (max batch 32, 256): parity"),
        "tensorrt_fp32": Check(enc.tensorrt_fp32, "FP32 engine, TF32 off: within 1e-4"),
        "tensorrt_refusals": Check(enc.tensorrt_refusals, "foreign engine / sidecar refused"),
        "onnxruntime_cuda": Check(enc.onnxruntime_cuda, "ONNX Runtime really on CUDA: 1e-4"),
        "torch_gpu": Check(enc.torch_gpu, "PyTorch FP32 within 1e-4, FP16 cosine >= 0.99"),
        "retrieval": Check(pipe.retrieval, "N 200k, Q 4096, k 200: every array type vs CPU"),
        "infer": Check(pipe.infer, "mclx infer end to end for each backend"),
        "throughput": Check(pipe.throughput, "images/s per backend, queries/s, tiles/s"),
    }


def probe() -> tuple[dict[str, Any] | None, str | None]:
    """``(gpus, None)`` when the NVIDIA driver sees a GPU, else ``(None, reason)``; asks
    ``libcuda`` directly (no torch, CuPy or TensorRT needed)."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None, "no NVIDIA driver on this machine (libcuda.so.1 not found)"
    rc = lib.cuInit(0)
    if rc != 0:
        what = "no CUDA-capable device" if rc == 100 else f"CUDA driver error {rc}"
        return None, f"the NVIDIA driver cannot start CUDA: {what} (cuInit returned {rc})"
    count, version = ctypes.c_int(0), ctypes.c_int(0)
    lib.cuDeviceGetCount(ctypes.byref(count))
    lib.cuDriverGetVersion(ctypes.byref(version))
    if count.value < 1:
        return None, "the NVIDIA driver sees no GPU (cuDeviceGetCount = 0)"
    names = []
    for i in range(count.value):
        dev, buf = ctypes.c_int(0), ctypes.create_string_buffer(256)
        lib.cuDeviceGet(ctypes.byref(dev), i)
        lib.cuDeviceGetName(buf, 256, dev)
        names.append(buf.value.decode(errors="replace"))
    cuda = f"{version.value // 1000}.{version.value % 1000 // 10}"
    return {"count": count.value, "names": names, "driver_cuda": cuda}, None


def skipped(reason: str) -> dict[str, Any]:
    """The report of a run that proved nothing: one line, status ``skipped``."""
    return {"mclx_gpu_check": REPORT_VERSION, "status": "skipped", "ok": False, "reason": reason}


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or "(no message)"
    return f"{type(exc).__name__}: {text}"[:400]


def run_checks(
    names: Sequence[str], checks: dict[str, Any], ws: Any, log: Callable[[str], Any]
) -> dict[str, dict[str, Any]]:
    """Run ``names`` in order; each check returns ``(details, problems)``. An exception
    is a failed check with its one-line message and the last frames of its traceback."""
    results = {}
    for name in names:
        log(f"gpu-check: {name} ...")
        t0 = time.perf_counter()
        try:
            details, problems = checks[name].run(ws)
        except Exception as exc:  # a check's failure is reported, not raised
            frames = traceback.format_exception(exc)[-4:]
            details, problems = {"trace": [" ".join(f.split())[:300] for f in frames]}, []
            problems.append(_one_line(exc))
        seconds = round(time.perf_counter() - t0, 2)
        results[name] = {"ok": not problems, "seconds": seconds, "problems": problems, **details}
        verdict = "ok" if not problems else f"FAILED: {problems[0]}"
        log(f"gpu-check: {name}: {verdict} ({seconds:.1f} s)")
    return results


def report(gpus: dict[str, Any], results: dict[str, dict[str, Any]], seconds: float) -> dict:
    failed = [name for name, r in results.items() if not r["ok"]]
    return {
        "mclx_gpu_check": REPORT_VERSION,
        "status": "failed" if failed else "passed",
        "ok": not failed,
        "failed": failed,
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

    from mclx.gpu_checks import Workspace

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
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
