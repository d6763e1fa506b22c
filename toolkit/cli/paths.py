"""Every command's input and output paths, declared to one place that refuses, before
any work, an output that resolves to an input or to another output (SPEC section 8).

Options and arguments that name files are made by :func:`path_option` and
:func:`path_argument` with a ``role``: ``input``, ``output`` (a file the command writes)
or ``output_folder`` (a folder it writes or replaces, so nothing of the user's may lie
inside it). A command may add the paths it derives (``--out``'s default name, files
written beside an output, a checkpoint a bank records) with ``derive``. Every command is
an :class:`MclxCommand`, whose :meth:`~MclxCommand.invoke` runs :func:`check_paths`
before the command's body: a collision is one ``mclx: error:`` line and nothing written.

Two paths are the same file when :func:`os.path.samefile` says so (device and inode, as
coreutils' ``cp a a`` refuses: hard links and symlinks included), else when their
resolved paths are equal after :func:`os.path.normcase` (files not written yet).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import click

from mclx.errors import PathCollision

Role = Literal["input", "output", "output_folder"]
ROLES: tuple[Role, ...] = ("input", "output", "output_folder")
# a command's derived paths: (role, what it is, path) from its parsed parameters
Derive = Callable[[dict[str, Any]], Iterable[tuple[Role, str, Path]]]


class RoleOption(click.Option):
    """A path option that says whether the command reads or writes it."""

    def __init__(self, *args: Any, role: Role, **kw: Any) -> None:
        if role not in ROLES:
            msg = f"role must be one of {ROLES}, not {role!r}"
            raise ValueError(msg)
        kw.setdefault("type", click.Path(path_type=Path))
        super().__init__(*args, **kw)
        self.role = role


class RoleArgument(click.Argument):
    """A path argument that says whether the command reads or writes it."""

    def __init__(self, *args: Any, role: Role, **kw: Any) -> None:
        kw.setdefault("type", click.Path(path_type=Path))
        super().__init__(*args, **kw)
        self.role = role


def path_option(*decls: str, role: Role, **kw: Any):
    """``click.option`` for a path the command reads (``role="input"``) or writes."""
    return click.option(*decls, cls=RoleOption, role=role, **kw)


def path_argument(*decls: str, role: Role, **kw: Any):
    """``click.argument`` for a path the command reads or writes."""
    return click.argument(*decls, cls=RoleArgument, role=role, **kw)


@dataclass(frozen=True)
class Declared:
    """One path of a command: its role, what the user calls it (``--out``) and where."""

    role: Role
    what: str
    path: Path


def declared(command: click.Command, params: dict[str, Any]) -> list[Declared]:
    """The paths the parameters of ``command`` name."""
    out = []
    for p in command.params:
        role = getattr(p, "role", None)
        value = params.get(p.name)
        if role is None or value is None:
            continue
        what = p.opts[0] if isinstance(p, click.Option) else p.human_readable_name
        values = value if isinstance(value, list | tuple) else [value]
        out += [Declared(role, what, Path(v)) for v in values]
    return out


def derived(command: click.Command, params: dict[str, Any]) -> list[Declared]:
    """The paths ``command`` derives from its parameters (its ``derive``)."""
    derive = getattr(command, "derive", None)
    if derive is None:
        return []
    return [Declared(role, what, Path(path)) for role, what, path in derive(params)]


def same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` are one file: by device and inode when both exist (hard
    links, symlinks, case-insensitive names), else by resolved, case-normalised path."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        pass
    return os.path.normcase(os.path.realpath(a)) == os.path.normcase(os.path.realpath(b))


def inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` lies in ``folder`` (at any depth), symlinks resolved."""
    return any(same_file(parent, folder) for parent in Path(os.path.realpath(path)).parents)


def collisions(paths: list[Declared]) -> Iterator[str]:
    """What is wrong with these paths, one sentence each: an output that is an input or
    another output, or an output folder that holds an input."""
    outputs = [d for d in paths if d.role != "input"]
    inputs = [d for d in paths if d.role == "input"]
    for i, out in enumerate(outputs):
        for other in outputs[:i]:
            if same_file(out.path, other.path):
                yield (
                    f"{out.path}: {out.what} and {other.what} would write the same file; "
                    "give each its own path"
                )
        for src in inputs:
            if same_file(out.path, src.path):
                yield (
                    f"{out.path}: {out.what} would write over an input, {src.what} "
                    f"({src.path}); choose another output"
                )
            elif out.role == "output_folder" and inside(src.path, out.path):
                yield (
                    f"{out.path}: {out.what} would replace a folder that holds an input, "
                    f"{src.what} ({src.path}); choose another output folder"
                )


def check_paths(command: click.Command, params: dict[str, Any]) -> None:
    """Refuse the run (:class:`~mclx.errors.PathCollision`) when one of the command's
    outputs resolves to one of its inputs or to another output; before any work. The
    paths the user typed are checked first, then with those the command derives."""
    given = declared(command, params)
    for problem in collisions(given):  # before deriving: that may read an input
        raise PathCollision(problem)
    typed = {(d.role, d.path.absolute()) for d in given}
    # a derived path the user typed as it is (export's --onnx) is that path, not another
    more = [d for d in derived(command, params) if (d.role, d.path.absolute()) not in typed]
    for problem in collisions(given + more):
        raise PathCollision(problem)


class MclxCommand(click.Command):
    """A command whose declared paths are checked before its body runs.

    Args:
        derive: the paths the command derives from its parameters (see :data:`Derive`).
    """

    def __init__(self, *args: Any, derive: Derive | None = None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.derive = derive

    def invoke(self, ctx: click.Context) -> Any:
        check_paths(self, ctx.params)
        return super().invoke(ctx)


class MclxGroup(click.Group):
    """A group whose commands are :class:`MclxCommand` unless they say otherwise, so
    that a command added to it cannot skip the check of its paths."""

    command_class = MclxCommand
