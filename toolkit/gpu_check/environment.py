"""The environment check of ``python -m mclx.gpu_check``, and what the other checks need.

The environment step reports every version it can find and never fails on a missing
optional package: TensorRT and ONNX Runtime's CUDA build are optional (a bare CUDA
machine has neither, docs/gpu.md), and the checks that need them are skipped with the
reason (:func:`tensorrt_missing`, :func:`onnxruntime_cuda_missing`). It fails only on
what makes the GPU path wrong where it runs: PyTorch without a CUDA GPU, two ONNX Runtime
builds installed together (the CPU build hides the CUDA provider), or CUDA majors that
differ between the libraries present.
"""

from __future__ import annotations

import importlib
import importlib.util
import platform
import sys
import warnings
from typing import Any

GPU_EXTRA = "pip install 'mclx[gpu]' on this machine, or carry its wheels (docs/gpu.md)"


def installed(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it."""
    if module in sys.modules:  # imported already (or blocked: None)
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def tensorrt_missing() -> str | None:
    """Why the TensorRT checks cannot run here (None: they can)."""
    if not installed("tensorrt"):
        return f"tensorrt is not installed ({GPU_EXTRA})"
    return cupy_missing()


def cupy_missing() -> str | None:
    """Why the CuPy kernels cannot run here (None: they can)."""
    if not installed("cupy"):
        return f"cupy is not installed ({GPU_EXTRA})"
    return None


def onnxruntime_cuda_missing(python: tuple[int, int] | None = None) -> str | None:
    """Why ONNX Runtime cannot run on CUDA here: the CPU build (or none) is installed;
    on Python 3.10 none can be (``python``: the version to judge, default this one)."""
    from mclx.inference.device import onnxruntime_distributions

    found = onnxruntime_distributions()
    major, minor = python or sys.version_info[:2]
    if (major, minor) < (3, 11) and "onnxruntime-gpu" not in found:
        return (
            f"onnxruntime-gpu >= 1.29 has no wheels for Python {major}.{minor}: ONNX Runtime "
            "on CUDA needs Python >= 3.11 (the gpu extra skips it here)"
        )
    if "onnxruntime-gpu" not in found:
        have = f"installed: {', '.join(found)}" if found else "no ONNX Runtime installed"
        return f"onnxruntime-gpu is not installed ({have}; {GPU_EXTRA})"
    return None


def _version(module: str) -> str:
    """A module's version, or why there is none (never raises)."""
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return "not installed"
    except Exception as exc:  # a broken install says why, it does not stop the report
        return f"import failed: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
    with warnings.catch_warnings():  # anndata, scanpy: "__version__ is deprecated"
        warnings.simplefilter("ignore")
        return str(getattr(mod, "__version__", "unknown"))


def _safely(get, default: Any = None) -> Any:
    try:
        return get()
    except Exception as exc:
        return default if default is not None else f"{type(exc).__name__}: {exc}"[:200]


def versions() -> dict[str, Any]:
    """Versions of Python, mclx and every library the GPU path may use."""
    from mclx import __version__

    info: dict[str, Any] = {"python": platform.python_version(), "mclx": __version__}
    for name in ("torch", "torchvision", "numpy", "cupy", "tensorrt", "onnxruntime", "onnx"):
        info[name] = _version(name)
    for name in ("numba", "anndata", "scanpy", "openslide", "tifffile", "timm"):
        info[name] = _version(name)
    return info


def cuda_details(info: dict[str, Any]) -> dict[str, Any]:
    """GPUs seen by PyTorch, the CUDA runtimes, ONNX Runtime's builds and providers."""
    from mclx.inference.device import onnxruntime_distributions

    out: dict[str, Any] = {"onnxruntime_distributions": onnxruntime_distributions()}
    majors: dict[str, int | None] = {}
    if _present(info, "torch"):
        import torch

        out["torch_cuda"] = torch.version.cuda
        out["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        majors["torch"] = int(str(torch.version.cuda).split(".")[0]) if torch.version.cuda else None
    if _present(info, "cupy"):
        import cupy

        runtime = _safely(cupy.cuda.runtime.runtimeGetVersion, 0)
        out["cupy_cuda_runtime"] = f"{runtime // 1000}.{runtime % 1000 // 10}"
        majors["cupy"] = runtime // 1000 or None
    if _present(info, "onnxruntime"):
        import onnxruntime as ort

        out["onnxruntime_providers"] = ort.get_available_providers()
    nvrtc = _safely(_nvrtc_version, "unavailable")
    out["nvrtc"] = nvrtc
    majors["nvrtc"] = int(nvrtc.split(".")[0]) if nvrtc[:1].isdigit() else None
    majors["tensorrt"] = _tensorrt_cuda_major()
    out["cuda_majors"] = majors
    return out


def _present(info: dict[str, Any], module: str) -> bool:
    """Whether :func:`versions` imported ``module`` (a version, not why there is none)."""
    return info[module] != "not installed" and not info[module].startswith("import failed")


def _nvrtc_version() -> str:
    from mclx.kernels import nvrtc

    return ".".join(map(str, nvrtc.version()))


def environment(ws: Any):
    """Versions, CUDA majors, one ONNX Runtime distribution, providers; optional
    packages that are missing are named (``optional_missing``), not failed."""
    info = versions()
    info |= cuda_details(info)
    missing = {
        "tensorrt": tensorrt_missing(),
        "onnxruntime-gpu": onnxruntime_cuda_missing(),
        "cupy": cupy_missing(),
    }
    info["optional_missing"] = {k: v for k, v in missing.items() if v}
    problems = []
    if len(info["onnxruntime_distributions"]) > 1:
        problems.append(f"ONNX Runtime distributions: {info['onnxruntime_distributions']}")
    ort_gpu = "onnxruntime-gpu" in info["onnxruntime_distributions"]
    if ort_gpu and "CUDAExecutionProvider" not in info.get("onnxruntime_providers", []):
        problems.append("onnxruntime-gpu is installed but has no CUDAExecutionProvider")
    majors = info["cuda_majors"]
    if len({v for v in majors.values() if v is not None}) > 1:
        problems.append(f"CUDA majors differ: {majors}")
    if not info.get("gpus"):
        problems.append("PyTorch sees no CUDA GPU")
    return info, problems


def _tensorrt_cuda_major() -> int | None:
    """The CUDA major of the installed TensorRT wheel (tensorrt-cu12 / tensorrt-cu13)."""
    from importlib import metadata

    for major in (13, 12):
        for name in (f"tensorrt-cu{major}-libs", f"tensorrt-cu{major}", f"tensorrt_cu{major}_libs"):
            try:
                metadata.version(name)
                return major
            except metadata.PackageNotFoundError:
                continue
    return None
