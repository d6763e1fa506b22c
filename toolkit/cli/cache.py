"""``mclx cache info`` and ``mclx cache clear``: the frozen-feature cache
(:mod:`mclx.training.feature_store`) that ``train``, ``evaluate`` and ``bank build`` share."""

from __future__ import annotations

import click

from mclx.cli.options import CONTEXT
from mclx.cli.paths import MclxCommand, MclxGroup


@click.group(cls=MclxGroup, context_settings=CONTEXT)
def cache() -> None:
    """Inspect or empty the cache of frozen-encoder features.

    \b
    train, evaluate and bank build encode each section's spot patches once per encoder
    and keep the features in $MCLX_CACHE_DIR/features (default ~/.cache/mclx/features),
    least recently used first out above $MCLX_FEATURE_CACHE_GB (default 4). A later
    command on the same sections, encoder and patch geometry reads them instead of
    encoding again. --no-feature-cache (or MCLX_FEATURE_CACHE=0) turns it off.
    """


@cache.command("info", cls=MclxCommand, context_settings=CONTEXT)
def cache_info() -> None:
    """Where the feature cache is, how many entries and bytes it holds, its limit."""
    from mclx.training import feature_store as store

    rows = store.entries()
    size = sum(r[1] for r in rows)
    state = "on" if store.enabled() else "off (MCLX_FEATURE_CACHE)"
    click.echo(
        f"{store.folder()}: {len(rows)} section feature entries, {_gb(size)} of "
        f"{_gb(store.limit_bytes())} (MCLX_FEATURE_CACHE_GB); cache {state}"
    )


@cache.command("clear", cls=MclxCommand, context_settings=CONTEXT)
def cache_clear() -> None:
    """Delete every cached feature entry (later commands encode again)."""
    from mclx.training import feature_store as store

    n, size = store.clear()
    click.echo(f"mclx: removed {n} feature entries ({_gb(size)}) from {store.folder()}")


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e7 else f"{n / 1e6:.1f} MB"
