"""A registry of named builders, as in timm: ``@register`` fills a dict, ``create`` builds.

A builder may carry metadata (a model's published defaults, say), read with :meth:`meta`.
An unknown name raises ``KeyError`` listing the close matches.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any


class Registry:
    """Name -> builder callable."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._builders: dict[str, Callable[..., Any]] = {}
        self._meta: dict[str, dict[str, Any]] = {}

    def register(
        self, fn: Callable[..., Any] | None = None, *, name: str | None = None, **meta: Any
    ):
        """Decorator: register ``fn`` under ``name`` (default: the function's name), with
        keyword metadata."""

        def deco(f: Callable[..., Any]) -> Callable[..., Any]:
            key = name or f.__name__
            if key in self._builders:
                msg = f"{self.kind} {key!r} is registered twice"
                raise ValueError(msg)
            self._builders[key] = f
            self._meta[key] = meta
            return f

        return deco(fn) if fn is not None else deco

    def names(self) -> list[str]:
        return sorted(self._builders)

    def get(self, name: str) -> Callable[..., Any]:
        try:
            return self._builders[name]
        except KeyError:
            close = difflib.get_close_matches(name, self.names(), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            msg = f"unknown {self.kind} {name!r} (known: {', '.join(self.names())}){hint}"
            raise KeyError(msg) from None

    def meta(self, name: str) -> dict[str, Any]:
        """The metadata ``name`` was registered with."""
        self.get(name)  # unknown names: the KeyError with close matches
        return dict(self._meta[name])

    def create(self, name: str, /, **kwargs: Any) -> Any:
        return self.get(name)(**kwargs)

    def __contains__(self, name: object) -> bool:
        return name in self._builders
