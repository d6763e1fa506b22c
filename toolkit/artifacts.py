"""Reading mclx's own files: the checks that checkpoints, banks and training states share.

Each artifact is a file carrying a format tag (``"mclx-checkpoint"``, ...) and a format
version. Reading one goes: :func:`require_file` (a file, not a folder, that exists), read
the payload (:func:`load_torch` for the torch ones; a failure names what the file really
is, see :func:`unreadable`), :func:`check_header` (the tag, then a version this mclx
supports), then :func:`require_keys`. :func:`read_torch_artifact` does all but the last
for a torch payload. Every error names the file and is one line.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from mclx.errors import FormatError, short

TORCH_ARCHIVE = "a PyTorch archive"  # how describe_file starts on a torch.save file


def brief_repr(value: Any, limit: int = 40) -> str:
    """``repr(value)`` cut to ``limit`` characters, for quoting a value in an error line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def require_file(
    path: str | os.PathLike,
    what: str,
    *,
    missing: str | None = None,
    nonempty: bool = False,
    error: type[Exception] = FormatError,
) -> Path:
    """``path`` as a Path, refused with one line naming it: FileNotFoundError ("{path}:
    {what} does not exist", or ``missing`` when given) when there is nothing, ``error``
    when it is a folder or (with ``nonempty``) an empty file."""
    path = Path(path)
    if path.is_dir():
        msg = f"{path}: {what} is a folder, not a file"
        raise error(msg)
    if not path.is_file():
        msg = missing or f"{path}: {what} does not exist"
        raise FileNotFoundError(msg)
    if nonempty and path.stat().st_size == 0:
        msg = f"{path}: {what} is empty (0 bytes)"
        raise error(msg)
    return path


def unreadable(
    path: Path,
    heading: str,
    exc: BaseException,
    *,
    container: str,
    kind: str,
    detail: str | None = None,
    hint: str = "",
) -> FormatError:
    """The error for a payload the reader refused: "{path}: {heading}: the file is WHAT{hint}".

    WHAT is :func:`describe_file`'s answer ("a text file", "empty (0 bytes)", ...),
    except when that starts with ``container``, the expected kind of file as describe_file
    words it ("a PyTorch archive", "a numpy .npz"): the damage is then inside, and WHAT is
    "a corrupt {kind} (detail)", ``detail`` defaulting to the exception's message.
    """

    what = describe_file(path)
    if what.startswith(container):
        what = f"a corrupt {kind} ({short(exc) if detail is None else detail})"
    return FormatError(f"{path}: {heading}: the file is {what}{hint}")


def load_torch(path: Path, heading: str, *, hint: str = "") -> Any:
    """``torch.load`` of ``path`` (tensors only, onto the CPU); :func:`unreadable`'s error
    with ``heading`` and ``hint`` when torch refuses the file."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # RuntimeError, UnpicklingError, EOFError, ...
        raise unreadable(
            path, heading, exc, container=TORCH_ARCHIVE, kind="PyTorch archive", hint=hint
        ) from exc


def check_header(
    path: Path,
    what: str,
    payload_format: Any,
    payload_version: Any,
    *,
    expected: str,
    supported: int,
) -> int:
    """Refuse a file without the ``expected`` format tag, without a valid format version
    (an int >= 1) or with a version newer than ``supported``; return the version."""
    if not isinstance(payload_format, str) or payload_format != expected:
        msg = f"{path}: not an mclx {what} (no '{expected}' format tag)"
        raise FormatError(msg)
    version = payload_version
    if version is None:
        msg = f"{path}: {what} format version is missing"
        raise FormatError(msg)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        msg = f"{path}: {what} format version {brief_repr(version)} is not valid"
        raise FormatError(msg)
    if version > supported:
        msg = (
            f"{path}: {what} format version {version} is newer than this mclx "
            f"supports ({supported}); upgrade mclx"
        )
        raise FormatError(msg)
    return version


def require_keys(path: Path, what: str, payload: Mapping[str, Any], keys: Iterable[str]) -> None:
    """Refuse a payload that lacks any of ``keys``, naming them all."""
    missing = [k for k in keys if k not in payload]
    if missing:
        msg = f"{path}: {what} lacks {', '.join(missing)} (corrupt file?)"
        raise FormatError(msg)


def read_torch_artifact(
    path: str | os.PathLike,
    what: str,
    *,
    expected: str,
    supported: int,
    heading: str | None = None,
    missing: str | None = None,
    hint: str = "",
) -> dict[str, Any]:
    """The dict of a torch-saved artifact after :func:`require_file`, :func:`load_torch`
    (``heading`` defaults to "not a readable mclx {what}") and :func:`check_header`."""
    path = require_file(path, what, missing=missing)
    payload = load_torch(path, heading or f"not a readable mclx {what}", hint=hint)
    if not isinstance(payload, dict):
        payload = {}  # no format tag: refused as "not an mclx {what}"
    check_header(
        path,
        what,
        payload.get("format"),
        payload.get("format_version"),
        expected=expected,
        supported=supported,
    )
    return payload


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
