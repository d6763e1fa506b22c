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
