"""Running the real command line the way a user does, and checking its errors."""

from __future__ import annotations

import subprocess
import sys


def mclx(*args, timeout: int = 900, preexec_fn=None) -> subprocess.CompletedProcess:
    """``python -m mclx ARGS`` in a subprocess, output captured as text; ``preexec_fn``
    runs in the child before it starts (resource limits, dropped capabilities)."""
    return subprocess.run(
        [sys.executable, "-m", "mclx", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=preexec_fn,
    )


def run_cli(capsys, args) -> subprocess.CompletedProcess:
    """``mclx ARGS`` in this process (no interpreter start-up), output captured with
    pytest's ``capsys``; the exit status as a subprocess's."""
    from mclx.cli import main

    capsys.readouterr()
    try:
        main(list(map(str, args)))
        rc = 0
    except SystemExit as exc:
        rc = exc.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, rc, out, err)


def assert_one_line_error(res: subprocess.CompletedProcess, *needles: str) -> None:
    """Non-zero exit, exactly one stderr line ``mclx: error: ...`` containing ``needles``."""
    lines = res.stderr.strip().splitlines()
    assert res.returncode != 0, res
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("mclx: error: "), lines[0]
    assert "Traceback" not in res.stderr
    for n in needles:
        assert n in lines[0], lines[0]
