"""Atomic file output: write to a temporary file beside the target, fsync, rename.

A failed or interrupted write leaves no partial file and never replaces a good one.
Inside :func:`all_or_nothing`, the renames of every :func:`atomic_path` wait for the
block to succeed, so a command that writes several files leaves all or none of them.
A write that fails because the disk is full, the file size limit is reached or the
folder is read-only is reported as one ``OSError`` naming the destination.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
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

# pending (temporary, destination) renames of the innermost all_or_nothing block
_PENDING: contextvars.ContextVar[list[tuple[Path, Path]] | None] = contextvars.ContextVar(
    "mclx_atomic_pending", default=None
)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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


def _companions(tmp: Path) -> list[Path]:
    """The temporary file and the helper files a writer put beside it: any file whose
    name starts with the temporary file's (``tmp`` + ``.raw.onnx``, ...)."""
    with contextlib.suppress(OSError):
        return [p for p in tmp.parent.iterdir() if p.name.startswith(tmp.name)]
    return [tmp]


def _remove(paths: list[Path], keep: Path | None = None) -> None:
    for p in paths:
        if p != keep:
            with contextlib.suppress(OSError):
                p.unlink()


def _write_error(path: Path, reason: str, exc: BaseException) -> OSError:
    err = OSError(f"{path}: cannot write it: {reason}")
    err.errno = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EIO
    return err


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success rename it onto ``path``.

    Helper files named after the temporary file (its name + any suffix) are removed when
    the block ends, and are looked at when it fails (their size against ``ulimit -f``).

    Args:
        path: final destination.
        suffix: suffix of the temporary file (some writers choose the format from it);
            defaults to the destination's own suffix.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        msg = f"{path}: output folder {folder} does not exist"
        raise FileNotFoundError(msg)
    try:
        fd, tmp = tempfile.mkstemp(
            prefix=f".{path.name}.",
            suffix=".tmp" + (path.suffix if suffix is None else suffix),
            dir=folder,
        )
    except OSError as exc:
        reason = exc.strerror.lower() if exc.strerror else str(exc)
        raise _write_error(path, f"cannot create a file in {folder} ({reason})", exc) from exc
    os.close(fd)
    tmp_path = Path(tmp)
    pending = _PENDING.get()
    try:
        yield tmp_path
        _remove(_companions(tmp_path), keep=tmp_path)
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; behave like open()
        if pending is not None:
            pending.append((tmp_path, path))
        else:
            os.replace(tmp_path, path)
            _fsync_folder(folder)
    except BaseException as exc:
        reason = None
        written = _companions(tmp_path)
        if isinstance(exc, Exception):  # not for Ctrl-C
            reason = write_failure(exc, folder, written)
        _remove([*written, tmp_path])
        if reason is not None:
            raise _write_error(path, reason, exc) from exc
        raise


@contextlib.contextmanager
def all_or_nothing() -> Iterator[None]:
    """Defer the renames of the :func:`atomic_path` writes inside the block to its end:
    when anything in the block fails, none of its outputs appears (nor any temp file)."""
    pending: list[tuple[Path, Path]] = []
    token = _PENDING.set(pending)
    try:
        yield
    except BaseException:
        for tmp, _ in pending:
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            with contextlib.suppress(OSError):
                tmp.unlink()
        raise
    finally:
        _PENDING.reset(token)
    for tmp, path in pending:
        _install(tmp, path)
    for folder in {path.parent for _, path in pending}:
        _fsync_folder(folder)


def _install(tmp: Path, path: Path) -> None:
    """Rename ``tmp`` onto ``path``; a folder replaces the folder there (moved aside, then
    removed once the new one is in place: a rename cannot replace a non-empty folder)."""
    if not tmp.is_dir() or not path.is_dir():
        os.replace(tmp, path)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
    os.replace(path, old / path.name)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it takes the place of
    ``path`` (a folder already there is replaced), else it is removed. Joins an
    enclosing :func:`all_or_nothing` block like :func:`atomic_path`. The caller decides
    beforehand whether a folder at ``path`` may be replaced (:func:`check_output_folder`).
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    check_output(path, folder_ok=True)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder))
    except OSError as exc:
        reason = exc.strerror.lower() if exc.strerror else str(exc)
        raise _write_error(path, f"cannot create a folder in {folder} ({reason})", exc) from exc
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; behave like mkdir()
    pending = _PENDING.get()
    try:
        yield tmp
        if pending is not None:
            pending.append((tmp, path))
        else:
            _install(tmp, path)
            _fsync_folder(folder)
    except BaseException as exc:
        reason = write_failure(exc, folder, []) if isinstance(exc, Exception) else None
        shutil.rmtree(tmp, ignore_errors=True)
        if reason is not None:
            raise _write_error(path, reason, exc) from exc
        raise


def _fsync_folder(folder: Path) -> None:
    """Make a rename durable (the folder's entry), where the system allows it."""
    with contextlib.suppress(OSError):
        fd = os.open(folder if str(folder) else ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def check_output(path: str | os.PathLike, *, folder_ok: bool = False) -> Path:
    """Fail before any work when ``path`` cannot be written (missing or read-only folder);
    ``path`` may be an existing folder only with ``folder_ok`` (a folder output)."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        msg = f"{path}: output folder {folder} does not exist"
        raise FileNotFoundError(msg)
    if not os.access(folder, os.W_OK | os.X_OK):
        msg = f"{path}: output folder {folder} is not writable"
        raise PermissionError(msg)
    if path.is_dir() and not folder_ok:
        msg = f"{path}: output path is a folder"
        raise IsADirectoryError(msg)
    return path


def check_output_folder(
    path: str | os.PathLike, *, marker: str | tuple[str, ...], what: str
) -> Path:
    """Fail before any work when the folder output ``path`` cannot be written, or when a
    folder is there that this kind of output did not write: one that is not empty and
    has no ``marker`` (a file every such output has) is never replaced."""
    path = check_output(path, folder_ok=True)
    markers = (marker,) if isinstance(marker, str) else marker
    if path.exists() and not path.is_dir():
        msg = f"{path}: exists and is a file, not {what}"
        raise FileExistsError(msg)
    if path.is_dir() and any(path.iterdir()) and not any((path / m).exists() for m in markers):
        msg = (
            f"{path}: a folder that is not {what} (no {' or '.join(markers)}) is there; "
            "remove it or choose another output"
        )
        raise FileExistsError(msg)
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def describe_file(path: str | os.PathLike) -> str:
    """What a file looks like from its first bytes, for messages about a wrong file:
    "empty (0 bytes)", "a numpy .npz archive (an mclx bank?)", "a text file", ..."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(4096)
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    if size == 0:
        return "empty (0 bytes)"
    if head.startswith(b"PK\x03\x04"):
        return _describe_zip(path)
    magic = {
        b"\x89PNG": "a PNG image",
        b"\xff\xd8\xff": "a JPEG image",
        b"II*\x00": "a TIFF file",
        b"MM\x00*": "a TIFF file",
        b"\x1f\x8b": "a gzip file",
        b"\x93NUMPY": "a numpy .npy array",
        b"\x89HDF": "an HDF5 file (.h5ad?)",
        b"\x80\x02": "a pickle",
    }
    for m, what in magic.items():
        if head.startswith(m):
            return what
    if b"\x00" not in head:
        with contextlib.suppress(UnicodeDecodeError):
            head.decode("utf-8")
            return "a text file"
    if head[:1] == b"\x08":  # protobuf field 1 (ir_version), as ONNX files start
        return "binary data (an ONNX model?)"
    return "binary data"


def _describe_zip(path: Path) -> str:
    import zipfile

    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return "a truncated or corrupt ZIP archive"
    if any(n.endswith("data.pkl") for n in names):
        return "a PyTorch archive (an mclx checkpoint?)"
    if names and all(n.endswith(".npy") for n in names):
        tag = "an mclx bank?" if "format.npy" in names else "not an mclx bank"
        return f"a numpy .npz archive ({tag})"
    return "a ZIP archive"
