"""Compile mclx's CUDA sources with NVRTC alone: no GPU, no driver, no CuPy.

CuPy compiles a ``RawModule`` for the device it runs on, so a typo in a kernel would
surface only on a GPU. :func:`compile_source` runs the same NVRTC (through the
``cuda-bindings`` package, which loads ``libnvrtc`` from the ``nvidia-cuda-nvrtc``
wheel and never touches ``libcuda``) with the options CuPy uses, for a named
architecture; ``make test`` compiles every source under ``kernels/cuda`` this way for
each architecture in :data:`ARCHS` (tests/test_cuda_kernels.py).
"""

from __future__ import annotations

from pathlib import Path

SOURCES = Path(__file__).resolve().parent / "cuda"
OPTIONS = ("-std=c++17",)  # CuPy 14's RawModule default
# Turing (the oldest CUDA 13 targets), Ampere, Ada, Hopper (H100 / H200), Blackwell
ARCHS = ("sm_75", "sm_80", "sm_89", "sm_90", "sm_100")


class CudaCompileError(RuntimeError):
    """NVRTC refused a CUDA source; the message carries its log (file:line: error)."""


def sources() -> dict[str, str]:
    """Every CUDA source of mclx.kernels: file name -> text."""
    return {p.name: p.read_text() for p in sorted(SOURCES.glob("*.cu"))}


def source(name: str) -> str:
    return (SOURCES / name).read_text()


def _check(result, what: str) -> None:
    from cuda.bindings import nvrtc

    err = result[0] if isinstance(result, tuple) else result
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        msg = f"NVRTC {what} failed ({err.name})"
        raise CudaCompileError(msg)


def _log(nvrtc, prog) -> str:
    err, size = nvrtc.nvrtcGetProgramLogSize(prog)
    _check(err, "log size")
    log = bytearray(size)  # never bytes: NVRTC writes into the buffer, and b" " * 1 is
    _check(nvrtc.nvrtcGetProgramLog(prog, log), "log")  # CPython's shared b" " object
    return bytes(log).rstrip(b"\x00 ").decode(errors="replace")


def compile_source(text: str, name: str, arch: str = "sm_90", options=OPTIONS) -> bytes:
    """Compile ``text`` (file ``name``) for ``arch`` (``sm_XX``: to a cubin, which also
    runs the assembler; ``compute_XX``: to PTX); return the binary, or raise
    :class:`CudaCompileError` with NVRTC's log."""
    from cuda.bindings import nvrtc

    err, prog = nvrtc.nvrtcCreateProgram(text.encode(), name.encode(), 0, [], [])
    _check(err, "create program")
    try:
        opts = [f"--gpu-architecture={arch}".encode(), *(o.encode() for o in options)]
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        log = _log(nvrtc, prog)
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            msg = f"{name} ({arch}): NVRTC compilation failed:\n{log}"
            raise CudaCompileError(msg)
        cubin = arch.startswith("sm_")
        size_of = nvrtc.nvrtcGetCUBINSize if cubin else nvrtc.nvrtcGetPTXSize
        get = nvrtc.nvrtcGetCUBIN if cubin else nvrtc.nvrtcGetPTX
        err, size = size_of(prog)
        _check(err, "binary size")
        out = bytearray(size)
        _check(get(prog, out), "binary")
        return bytes(out)
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def version() -> tuple[int, int]:
    """NVRTC's (major, minor)."""
    from cuda.bindings import nvrtc

    err, major, minor = nvrtc.nvrtcVersion()
    _check(err, "version")
    return major, minor
