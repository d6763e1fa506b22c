"""Exception types that the command line turns into one ``mclx: error: ...`` line.

Library code raises the most specific built-in type that fits (``FileNotFoundError``,
``ValueError``, ``KeyError``) or one of these, always with a message that names the file
or object at fault.
"""

from __future__ import annotations


class MclxError(Exception):
    """Base class for mclx-specific failures."""


class DataError(MclxError, ValueError):
    """Input data is malformed: NaN or negative counts, duplicate spots, missing genes."""


class FormatError(MclxError, ValueError):
    """An artifact (checkpoint, bank, ONNX file) is not what it claims or is too new."""


class FingerprintMismatch(FormatError):
    """Two artifacts were derived from different checkpoints."""


def short(exc: BaseException, limit: int = 160) -> str:
    """One line of an exception's message, cut to ``limit`` characters, for error lines
    that quote a library's complaint (its class name when it says nothing)."""
    detail = " ".join(str(exc).split()) or exc.__class__.__name__
    return detail if len(detail) < limit else detail[: limit - 3] + "..."
