"""Optional extras (``pip install 'mclx[EXTRA]'``): whether one is installed, and the one
error a command gives when it needs a module that is not. Every "is it installed?" in
mclx asks here, so that the question is answered one way."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from mclx.errors import MclxError


class MissingExtra(MclxError, RuntimeError):
    """A command needs an optional module that is not installed."""


def installed(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it; a dotted name whose
    parent is missing, or a module set to None in ``sys.modules``, is not installed)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(*modules: str, message: str) -> ModuleType:
    """Import ``modules`` in order and return the first; :class:`MissingExtra` with
    ``message`` (what needs it and how to install it) when one is missing."""
    try:
        loaded = [importlib.import_module(m) for m in modules]
    except ImportError as exc:
        raise MissingExtra(message) from exc
    return loaded[0]


def need(*modules: str, message: str) -> None:
    """:class:`MissingExtra` with ``message`` unless every module of ``modules`` is
    installed: the check a command makes before any work (nothing is imported)."""
    missing = [m for m in modules if not installed(m)]
    if missing:
        raise MissingExtra(message)
