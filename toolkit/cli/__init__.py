"""``mclx`` command line: one click group, one module per command, each mostly option
declarations (:mod:`mclx.cli.options`, spelled once) and one library call.

Every command declares the paths it reads and writes (:mod:`mclx.cli.paths`); an output
that resolves to an input or to another output is refused before any work. Every
failure a user can cause ends as one line, ``mclx: error: ...``, on stderr with a
non-zero exit; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Sequence
from typing import Any

import click

from mclx import __version__
from mclx.cli.analyze import analyze
from mclx.cli.bank import bank
from mclx.cli.cache import cache
from mclx.cli.evaluate import evaluate
from mclx.cli.export import export_cmd
from mclx.cli.infer import infer
from mclx.cli.options import CONTEXT
from mclx.cli.paths import MclxGroup
from mclx.cli.train import train
from mclx.cli.view import view

COMMANDS = (train, evaluate, bank, export_cmd, infer, view, analyze, cache)


class _Interrupted(Exception):
    """Ctrl-C inside a command (click would print a blank line for KeyboardInterrupt)."""


class _Group(MclxGroup):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as exc:
            raise _Interrupted from exc


@click.group(cls=_Group, context_settings=CONTEXT)
@click.version_option(__version__, "--version", prog_name="mclx")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
def cli(debug: bool) -> None:
    """mclx: spatial gene expression from H&E histology (mclSTExp).

    \b
    Data flow: train -> checkpoint -> evaluate / bank / export -> infer.
    Run `mclx COMMAND --help` for examples.
    """


for _command in COMMANDS:
    cli.add_command(_command)


def _close_progress_bars() -> bool:
    """Close live progress bars, so that each ends its line before the error line
    (an abandoned bar would otherwise redraw itself after it when collected)."""
    tqdm = getattr(sys.modules.get("tqdm"), "tqdm", None)
    bars = list(getattr(tqdm, "_instances", ()))
    for bar in bars:
        with contextlib.suppress(Exception):
            bar.close()
    return bool(bars)


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as ``mclx: warning: ...`` on one line (Python's default adds the file,
    line number and the source line, which reads like a crash)."""
    kind = "" if category is UserWarning else f"{category.__name__}: "
    return f"mclx: warning: {kind}{' '.join(str(message).split())}\n"


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: run the group, turning failures into one ``mclx: error:`` line."""
    from mclx.errors import USER_ERRORS, one_line

    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    if not debug:
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.formatwarning = _one_line_warning
    try:
        cli.main(args=args, prog_name="mclx", standalone_mode=False, obj={"argv": args})
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        click.echo(f"mclx: error: {one_line(Exception(exc.format_message()))}", err=True)
        sys.exit(exc.exit_code)
    except (_Interrupted, click.exceptions.Abort, KeyboardInterrupt):
        if not _close_progress_bars() and sys.stderr.isatty():
            click.echo(err=True)  # end the line the terminal echoed ^C on
        click.echo("mclx: error: interrupted", err=True)
        sys.exit(130)
    except USER_ERRORS as exc:
        if debug:
            raise
        _close_progress_bars()
        click.echo(f"mclx: error: {one_line(exc)}", err=True)
        sys.exit(1)
