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


# What a user can cause: each becomes one ``mclx: error:`` line (the command line) or one
# failed row (a cohort's summary); anything else is a bug and keeps its traceback.
USER_ERRORS = (MclxError, OSError, ValueError, KeyError, RuntimeError, MemoryError)


class PathCollision(MclxError, ValueError):
    """An output of a command resolves to one of its inputs or to another output."""


def one_line(exc: BaseException) -> str:
    """An exception as the one line a user reads (a KeyError's message without the
    quotes ``str`` adds; the class name when it says nothing)."""
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    return " ".join(str(text).split()) or exc.__class__.__name__
