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
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from mclx.write_errors import write_failure

# pending (temporary, destination) renames of the innermost all_or_nothing block
_PENDING: contextvars.ContextVar[list[tuple[Path, Path]] | None] = contextvars.ContextVar(
    "mclx_atomic_pending", default=None
)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
    when anything in the block fails, none of its outputs appears (nor any temp file).
    The renames at the end commit together: when one fails, the ones before it are
    undone (what they replaced is restored, what they added is removed)."""
    pending: list[tuple[Path, Path]] = []
    token = _PENDING.set(pending)
    try:
        yield
    except BaseException:
        _discard(tmp for tmp, _ in pending)
        raise
    finally:
        _PENDING.reset(token)
    _commit(pending)


def _discard(paths) -> None:
    """Remove temporary files and folders."""
    for tmp in paths:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        with contextlib.suppress(OSError):
            tmp.unlink()


def _commit(pending: list[tuple[Path, Path]]) -> None:
    """Move every (temporary, destination) into place, or none: on a failure, undo the
    moves made, restore what they replaced and remove every temporary file."""
    done: list[tuple[Path, Path | None]] = []  # (destination, its previous content aside)
    try:
        for i, (tmp, path) in enumerate(pending):
            done.append((path, _install(tmp, path, keep=True)))
            pending[i] = (path, path)  # installed: nothing left to discard
    except BaseException:
        for path, aside in reversed(done):
            _undo(path, aside)
        _discard(tmp for tmp, path in pending if tmp != path)
        raise
    for path, aside in done:
        if aside is not None:
            _discard([aside.parent if aside.parent != path.parent else aside])
    for folder in {path.parent for path, _ in done}:
        _fsync_folder(folder)


def _undo(path: Path, aside: Path | None) -> None:
    """Put back what ``path`` held before (``aside``), or remove what was added."""
    with contextlib.suppress(OSError):
        if aside is None:
            _discard([path])
            return
        if aside.is_dir():  # a folder: the new one out of the way first
            _discard([path])
        os.replace(aside, path)
        if aside.parent != path.parent:  # the folder it was moved aside into
            os.rmdir(aside.parent)


def _install(tmp: Path, path: Path, *, keep: bool = False) -> Path | None:
    """Rename ``tmp`` onto ``path``. A folder replaces the folder there (moved aside, then
    removed once the new one is in place: a rename cannot replace a non-empty folder),
    only while that folder holds nothing but what mclx wrote (:mod:`mclx.folders`).
    With ``keep``, what ``path`` held is kept aside and its path returned (the caller
    removes it, or puts it back: :func:`_undo`), else removed; None when nothing was
    there (or no hard link nor copy of it could be made)."""
    from mclx.folders import check_replaceable

    if path.exists() and tmp.is_dir() != path.is_dir():
        kind = ("a folder", "a file") if path.is_dir() else ("a file", "a folder")
        msg = f"{path}: is {kind[0]}; another output of this command, {kind[1]}, goes there"
        raise FileExistsError(msg)
    if tmp.is_dir() and path.is_dir():
        check_replaceable(path, what="an mclx output folder")  # again: it may have changed
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
        os.replace(path, old / path.name)
        try:
            os.replace(tmp, path)
        except BaseException:
            os.replace(old / path.name, path)
            os.rmdir(old)
            raise
        if keep:
            return old / path.name
        shutil.rmtree(old, ignore_errors=True)
        return None
    aside = _keep_aside(path) if keep else None
    try:
        os.replace(tmp, path)
    except BaseException:
        _discard([aside] if aside is not None else [])
        raise
    return aside


def _keep_aside(path: Path) -> Path | None:
    """A hard link (else a copy) of the file ``path`` beside it, to put back with
    :func:`_undo`; None when ``path`` is no file, or not even a copy could be made."""
    if not path.is_file():
        return None
    aside = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.old")
    try:
        os.link(path, aside)  # the old file stays in place until it is replaced
    except OSError:
        try:  # no hard links on this file system: a copy, then
            shutil.copy2(path, aside)
        except OSError:
            _discard([aside])
            return None
    return aside


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


@contextlib.contextmanager
def undone_on_failure(paths: Iterable[str | os.PathLike]) -> Iterator[None]:
    """For a command that puts its output files in place one after the other (each is
    checked, then later ones are made from it, so :func:`all_or_nothing` cannot defer
    them): when the block fails, each of ``paths`` is as it was before the block, what
    was replaced put back and what appeared removed. A file there before whose content
    could not be kept aside (no room for a copy) is left as the block left it: never
    removed."""
    kept: list[tuple[Path, bool, Path | None]] = []  # (path, was there, its content aside)
    try:
        for path in map(Path, paths):
            kept.append((path, path.exists() or path.is_symlink(), _keep_aside(path)))
        yield
    except BaseException:
        for path, existed, aside in reversed(kept):
            if aside is not None and _same_file(path, aside):  # not replaced: the link goes
                _discard([aside])  # (a rename onto another link of its file does nothing)
            elif aside is not None or not existed:
                _undo(path, aside)
        raise
    _discard([aside for _, _, aside in kept if aside is not None])


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it takes the place of
    ``path`` (a folder already there is replaced, when it holds only what mclx wrote),
    else it is removed. Its manifest lists the files written (:mod:`mclx.folders`). Joins
    an enclosing :func:`all_or_nothing` block like :func:`atomic_path`. The caller checks
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
        from mclx.folders import write_manifest

        write_manifest(tmp)  # what mclx wrote there: a later run may replace only that
        if pending is not None:
            pending.append((tmp, path))
        else:
            _install(tmp, path)
            _fsync_folder(folder)
    except BaseException as exc:
        reason = None
        if isinstance(exc, Exception):  # not for Ctrl-C
            written = [p for p in tmp.rglob("*") if p.is_file()] if tmp.is_dir() else []
            reason = write_failure(exc, folder, written)
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
    folder is there that mclx may not replace: one that holds anything but what mclx
    wrote there (:func:`mclx.folders.check_replaceable`; ``marker``, a file every such
    output has, is named when the folder lacks it)."""
    from mclx.folders import check_replaceable

    path = check_output(path, folder_ok=True)
    markers = (marker,) if isinstance(marker, str) else marker
    if path.exists() and not path.is_dir():
        msg = f"{path}: exists and is a file, not {what}"
        raise FileExistsError(msg)
    check_replaceable(path, what=what, markers=markers)
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def record_written(folder: str | os.PathLike, paths: Iterable[str | os.PathLike]) -> None:
    """Add ``paths`` (files just written into ``folder``) to its manifest
    (:mod:`mclx.folders`), atomically: a later run may replace them."""
    from mclx.folders import MANIFEST, manifest_text, read_manifest

    folder = Path(folder)
    listed = read_manifest(folder)
    for p in map(Path, paths):
        listed[os.path.relpath(p, folder)] = p.stat().st_size
    write_text_atomic(folder / MANIFEST, manifest_text(listed))
