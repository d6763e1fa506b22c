"""Is there an NVIDIA GPU here? Asks the driver (``libcuda``) directly: no torch, CuPy or
TensorRT, and no mclx import, so that ``python3 toolkit/gpu_check/probe.py`` answers on a
machine where nothing is installed yet (``make gpu-check-offline`` runs it first). As a
script: one JSON line, exit 0 (a GPU) or 77 (skipped: none, with the reason).
"""

from __future__ import annotations

import ctypes
import json
import sys
from typing import Any

SKIPPED = 77  # the automake / ctest convention for "skipped": nothing proven, not a pass
REPORT_VERSION = 1


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


def main() -> int:
    gpus, reason = probe()
    if gpus is None:
        print(json.dumps(skipped(reason)))
        return SKIPPED
    print(json.dumps({"mclx_gpu_check": REPORT_VERSION, "status": "gpu", "gpus": gpus}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
