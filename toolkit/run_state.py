"""What resumable runs share (``mclx train --resume``, ``mclx infer --resume``): the
state file's name beside the output, the temporary files a killed write leaves, and the
refusal to resume a run whose arguments or data changed."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

SUFFIX = ".state"


def state_path(out: str | os.PathLike) -> Path:
    """The state file of output ``out``: ``model.pt`` -> ``model.pt.state``."""
    out = Path(out)
    return out.with_name(out.name + SUFFIX)


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Delete temporary files that an atomic write of ``path`` left when it was killed.

    ``mclx.files.atomic_path`` writes ``.NAME.XXXXXXXX.tmp*`` beside ``path`` and renames it
    at the end; only SIGKILL (or a power cut) can leave one behind. Two runs writing the
    same output at once are not supported, so any such file is stale.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}\.tmp")
    removed = []
    with contextlib.suppress(OSError):
        for p in folder.iterdir():
            if pattern.match(p.name) and p.is_file():
                with contextlib.suppress(OSError):
                    p.unlink()
                    removed.append(p)
    return removed


def differences(saved: Mapping[str, Any], now: Mapping[str, Any], prefix: str = "") -> list:
    """(name, saved value, current value) of each difference, in the record's order."""
    out = []
    for key in [*saved, *(k for k in now if k not in saved)]:
        a, b = saved.get(key), now.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append((f"{prefix}{key}", a, b))
    return out


def refuse_differences(path: Path, saved: Mapping[str, Any], now: Mapping[str, Any], command: str):
    """Refuse to resume from the state at ``path`` when its record differs from ``now``,
    naming the first difference (and the next few): the training options' first, since
    a recipe derives model and preprocessing fields from them (``--freeze-encoder``
    changes the default recipe's temperature, standardisation and field of view)."""
    from mclx.artifacts import brief_repr

    diffs = differences(saved, now)
    diffs.sort(key=lambda d: not d[0].startswith("train."))  # stable: record order within
    if not diffs:
        return
    name, a, b = diffs[0]
    also = ", ".join(d[0] for d in diffs[1:4]) + (", ..." if len(diffs) > 4 else "")
    also = f"; also {also}" if also else ""
    msg = (
        f"{path}: saved by a run with different arguments or data ({name}: "
        f"{brief_repr(a)} in the state, {brief_repr(b)} now{also})"
        f"; resume with the same arguments, or {command} without --resume to start over"
    )
    raise ValueError(msg)


def ready_state(state, out: str | os.PathLike, resume: bool, what: str, log) -> Any:
    """A run's state file, ready: loaded (and checked) now with ``resume``, before any
    work; otherwise a warning (``log``) that an interrupted run's ``what`` will be
    replaced; and the temporary files that a killed write of ``out`` or the state left,
    removed."""
    if resume:
        state.load()  # fails now, before any work, when missing or corrupt
    elif state.path.exists():
        log(
            f"mclx: warning: {state.path}: an interrupted run's {what} will be replaced "
            "(use --resume to continue it)"
        )
    for p in (Path(out), state.path):
        remove_stale_temps(p)  # left by a killed write
    return state
