"""Why a write failed, in words a user can act on: the disk is full, the file size
limit is reached, the file system is read-only (used by :mod:`mclx.files`)."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path

# errno values that mean "this destination cannot be written", whatever the writer
_WRITE_ERRNOS = {
    errno.ENOSPC,
    errno.EFBIG,
    errno.EDQUOT,
    errno.EROFS,
    errno.EIO,
    errno.EACCES,
    errno.EPERM,
}
_REASONS = {
    errno.ENOSPC: "no space left on device",
    errno.EFBIG: "file too large (file size limit reached, see ulimit -f)",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
}
_LOW_SPACE = 1 << 20  # bytes left on a file system that a failed write has just filled


def _file_size_limit() -> int | None:
    try:
        import resource
    except ImportError:  # pragma: no cover - not Unix
        return None
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return None if soft == resource.RLIM_INFINITY else int(soft)


def write_failure(exc: BaseException, folder: Path, written: list[Path]) -> str | None:
    """Why a write into ``folder`` failed, when the system says so; else None.

    Libraries that write through C code (PyTorch, HDF5, ONNX Runtime) often lose the
    errno, so beyond it look at the file system's free space and the process's file size
    limit against the files this write produced (``written``).
    """
    if isinstance(exc, OSError) and exc.errno in _WRITE_ERRNOS:
        return _REASONS.get(exc.errno, os.strerror(exc.errno).lower())
    for code in _copy_errnos(exc):  # shutil.copytree: a list of (src, dst, why) in args
        if code in _WRITE_ERRNOS:
            return _REASONS.get(code, os.strerror(code).lower())
    with contextlib.suppress(OSError):
        st = os.statvfs(folder)
        if st.f_bavail * st.f_frsize < _LOW_SPACE:
            return "no space left on device"
    limit = _file_size_limit()
    if limit is not None:
        for p in written:
            with contextlib.suppress(OSError):
                if p.stat().st_size >= limit:
                    return f"file size limit of {limit} bytes reached (ulimit -f)"
    return None


def _copy_errnos(exc: BaseException) -> list[int]:
    """The errno of each failed copy that a :class:`shutil.Error` lists as text."""
    import re

    if not isinstance(exc, shutil.Error) or not exc.args or not isinstance(exc.args[0], list):
        return []
    found = (re.search(r"\[Errno (\d+)\]", str(row[-1])) for row in exc.args[0] if row)
    return [int(m[1]) for m in found if m]
