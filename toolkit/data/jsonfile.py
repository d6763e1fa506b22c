"""The JSON files of the data layouts (Space Ranger's scale factors, HEST's sample
metadata): one object each, or a one-line :class:`~mclx.errors.DataError` naming the file."""

from __future__ import annotations

import json
from pathlib import Path

from mclx.errors import DataError, short

_JSON_TYPES = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}


def json_object(path: Path, what: str) -> dict:
    """The JSON object in ``path`` ({} when there is no such file), ``what`` it holds
    naming it in the :class:`DataError` for a file that cannot be read or parsed, or holds
    something else (an array, a number...)."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        msg = f"{path}: cannot read {what} ({short(exc)})"
        raise DataError(msg) from exc
    if not isinstance(data, dict):
        got = _JSON_TYPES.get(type(data), "a number")
        msg = f"{path}: {what} must be a JSON object, not {got}"
        raise DataError(msg)
    return data
