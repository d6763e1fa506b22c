"""``needs`` marks, resolved at collection as scanpy's are: ``@needs("her2st")``,
``@needs("stutility-mob")``, ``@needs("visium-fixture")`` (real data of shared/data),
``@needs("gpu")`` (CUDA visible to PyTorch), ``@needs("cupy")``, ``@needs("tensorrt")``,
``@needs("onnxruntime-cuda")`` (onnxruntime-gpu with its CUDA provider, and a GPU),
``@needs("numba")``,
``@needs("browser")`` (system Chromium + chromedriver + selenium),
``@needs("openseadragon")``, ``@needs("spatialdata")``, ``@needs("openvino")``,
``@needs("ray")`` (Ray Data; required with ``MCLX_REQUIRE_RAY=1``).

A test so marked is skipped, with the reason, before it runs (``pytest -rs`` lists them
all up front) when what it needs is missing; with ``MCLX_REQUIRE_DATA=1`` a test that
needs her2st fails instead. Each need also adds the pyproject marker of its kind
(``data`` for her2st, ``gpu`` for the GPU stack), so ``-m "not gpu"`` keeps working.
A test that takes the ``her2st`` fixture needs her2st without saying so.

The hooks live in ``tests/conftest.py``: :func:`resolve` runs in
``pytest_collection_modifyitems``, :func:`fail_if_required` in ``pytest_runtest_setup``.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import pytest

from helpers.data import SHARED, data_required, her2st_missing, shared_missing
from helpers.viewer import (
    browser_missing,
    openseadragon_missing,
    spatialdata_missing,
    spatialdata_required,
    viewer_required,
)

GPU_STACK = "pip install .[gpu] on a machine with an NVIDIA GPU"


@cache
def _torch_cuda() -> str | None:
    import torch

    if torch.cuda.is_available():
        return None
    return "needs an NVIDIA GPU (CUDA visible to PyTorch); none on this machine"


@cache
def _cupy() -> str | None:
    if importlib.util.find_spec("cupy") is None:
        return f"needs an NVIDIA GPU with CuPy: CuPy is not installed ({GPU_STACK})"
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            return None
    except Exception as exc:  # CUDARuntimeError without a driver or device
        return f"needs an NVIDIA GPU usable through CuPy ({type(exc).__name__}: {exc})"
    return "needs an NVIDIA GPU usable through CuPy; CuPy sees no device"


@cache
def _tensorrt() -> str | None:
    if importlib.util.find_spec("tensorrt") is None:
        return f"needs an NVIDIA GPU with TensorRT: TensorRT is not installed ({GPU_STACK})"
    return _cupy() or _torch_cuda()


@cache
def _onnxruntime_cuda() -> str | None:
    """onnxruntime-gpu installed, its CUDA provider listed, and a GPU for it."""
    from importlib import metadata

    try:
        metadata.version("onnxruntime-gpu")
    except metadata.PackageNotFoundError:
        return f"needs onnxruntime-gpu: only the CPU build of ONNX Runtime (or none) ({GPU_STACK})"
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        return "needs ONNX Runtime's CUDA provider: onnxruntime-gpu lists none"
    return _torch_cuda()


@cache
def _numba() -> str | None:
    if importlib.util.find_spec("numba") is None:
        return "needs numba (the compiled CPU kernels)"
    return None


@cache
def _ray() -> str | None:
    if importlib.util.find_spec("ray") is None:
        return "needs Ray Data: Ray is not installed (pip install '.[ray]')"
    return None


def _env_flag(name: str) -> Callable[[], bool]:
    return lambda: os.environ.get(name) == "1"


@cache
def _openvino() -> str | None:
    if importlib.util.find_spec("openvino") is None:
        return "needs OpenVINO (pip install -e '.[dev,openvino]')"
    return None


def _openvino_required() -> bool:
    return os.environ.get("MCLX_REQUIRE_OPENVINO") == "1"


@cache
def _timm() -> str | None:
    if importlib.util.find_spec("timm") is None:
        return "needs timm (pip install -e '.[dev,timm]')"
    return None


@dataclass(frozen=True)
class Need:
    """What a test may need: ``missing()`` says why it cannot have it (None: it can);
    ``marker`` is the pyproject marker of its kind; ``required`` says when a missing
    one is a failure rather than a skip, ``required_by`` the variable that says so."""

    missing: Callable[[], str | None]
    marker: str | None = None
    required: Callable[[], bool] = lambda: False
    required_by: str = "MCLX_REQUIRE_DATA"


NEEDS: dict[str, Need] = {
    "her2st": Need(her2st_missing, "data", data_required),
    "gpu": Need(_torch_cuda, "gpu"),
    "cupy": Need(_cupy, "gpu"),
    "tensorrt": Need(_tensorrt, "gpu"),
    "onnxruntime-cuda": Need(_onnxruntime_cuda, "gpu"),
    "numba": Need(_numba),
    "openvino": Need(_openvino, None, _openvino_required, "MCLX_REQUIRE_OPENVINO"),
    "browser": Need(cache(browser_missing), "browser", viewer_required),
    "openseadragon": Need(cache(openseadragon_missing), None, viewer_required),
    "spatialdata": Need(cache(spatialdata_missing), None, spatialdata_required),
    "ray": Need(_ray, None, _env_flag("MCLX_REQUIRE_RAY"), "MCLX_REQUIRE_RAY"),
    "timm": Need(_timm, None, _env_flag("MCLX_REQUIRE_TIMM"), "MCLX_REQUIRE_TIMM"),
    **{
        name: Need(lambda name=name: shared_missing(name), "data", data_required) for name in SHARED
    },
}


def needs(*what: str) -> pytest.MarkDecorator:
    """A mark saying the test needs ``what`` (keys of :data:`NEEDS`); usable as a
    decorator and in ``pytest.param(..., marks=needs(...))``."""
    unknown = [w for w in what if w not in NEEDS]
    if not what or unknown:
        msg = f"needs({', '.join(what)}): unknown need(s) {unknown} (known: {sorted(NEEDS)})"
        raise ValueError(msg)
    return pytest.mark.needs(*what)


_REQUIRED = pytest.StashKey[str]()


def item_needs(item: pytest.Item) -> list[str]:
    """Everything ``item`` needs: its ``needs`` marks (parametrised ones too), and
    her2st when it takes the ``her2st`` fixture."""
    found = [w for mark in item.iter_markers("needs") for w in mark.args]
    if "her2st" in getattr(item, "fixturenames", ()):
        found.append("her2st")
    return list(dict.fromkeys(found))


def resolve(item: pytest.Item) -> None:
    """Add ``item``'s kind markers, and a skip with its reason for the first missing
    need (or remember a failure, when that need is required)."""
    what = item_needs(item)
    for w in what:
        marker = NEEDS[w].marker
        if marker and not item.get_closest_marker(marker):
            item.add_marker(marker)
    for w in what:
        reason = NEEDS[w].missing()
        if reason is None:
            continue
        if NEEDS[w].required():
            item.stash[_REQUIRED] = f"{reason} and {NEEDS[w].required_by}=1"
        else:
            item.add_marker(pytest.mark.skip(reason=reason))
        return


def fail_if_required(item: pytest.Item) -> None:
    """Fail ``item`` before its fixtures run when a required need is missing."""
    reason = item.stash.get(_REQUIRED, None)
    if reason is not None:
        pytest.fail(reason, pytrace=False)
