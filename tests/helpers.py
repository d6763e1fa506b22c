"""Running the real command line the way a user does, and checking its errors."""

from __future__ import annotations

import subprocess
import sys


def mclx(*args, timeout: int = 900) -> subprocess.CompletedProcess:
    """``python -m mclx ARGS`` in a subprocess, output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "mclx", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_one_line_error(res: subprocess.CompletedProcess, *needles: str) -> None:
    """Non-zero exit, exactly one stderr line ``mclx: error: ...`` containing ``needles``."""
    lines = res.stderr.strip().splitlines()
    assert res.returncode != 0, res
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("mclx: error: "), lines[0]
    assert "Traceback" not in res.stderr
    for n in needles:
        assert n in lines[0], lines[0]
