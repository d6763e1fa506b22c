"""Stage timers of the compiled CPU retrieval path (``bench/retrieval_stages.py``).

:func:`stage_times` opens a profile; the path marks its stages with :func:`stage` and
its counters with :func:`count`. Outside an open profile a marker costs one global read.
"""

from __future__ import annotations

import contextlib
import time

_STAGES: dict[str, float] | None = None  # seconds per stage while stage_times() is open


@contextlib.contextmanager
def stage_times():
    """Collect seconds per stage of the compiled CPU path into the yielded dict
    (``bench/retrieval_stages.py``); stages of nested redo calls add to the same names.
    Outside this context the stage markers cost one global read."""
    global _STAGES
    prev, _STAGES = _STAGES, {}
    try:
        yield _STAGES
    finally:
        _STAGES = prev


@contextlib.contextmanager
def stage(name: str):
    stages = _STAGES
    if stages is None:
        yield
        return
    t0 = time.perf_counter()
    try:
        yield
    finally:
        stages[name] = stages.get(name, 0.0) + time.perf_counter() - t0


def count(name: str, n: int) -> None:
    """Add ``n`` to a counter of the open profile (see :func:`stage_times`)."""
    if _STAGES is not None:
        _STAGES[name] = _STAGES.get(name, 0) + n


def active() -> bool:
    """Whether a profile is open (the selection thread is then timed as well)."""
    return _STAGES is not None
