"""``mclx bank build`` and ``mclx bank info`` (:mod:`mclx.bank`)."""

from __future__ import annotations

from pathlib import Path

import click

from mclx.cli.options import (
    CONTEXT,
    DataOptions,
    ckpt_option,
    data_option,
    feature_cache,
    feature_cache_option,
    out_option,
    quiet_option,
    sections_option,
    split_names,
)
from mclx.cli.paths import MclxCommand, MclxGroup, path_argument


@click.group(cls=MclxGroup, context_settings=CONTEXT)
def bank() -> None:
    """Build and inspect spot banks (embeddings + expressions for retrieval)."""


@bank.command("build", cls=MclxCommand, context_settings=CONTEXT)
@ckpt_option()
@data_option()
@sections_option("Sections to embed (default: every section with counts, image or not).")
@out_option("Bank (.npz).", required=True)
@feature_cache_option()
@quiet_option()
def bank_build(
    ckpt: Path, data: DataOptions, sections, out: Path, no_feature_cache: bool, quiet: bool
) -> None:
    """Embed spots with a checkpoint's spot encoder and write a bank.

    \b
    Examples:
      mclx bank build --ckpt model.pt --data ../shared/data/her2st --out her2.npz
      mclx bank build --ckpt model.pt --sections C3,C4,C5,C6 --out images_only.npz
      mclx bank build --ckpt mob.pt --data ../shared/data/stutility-mob --out mob.npz
    """
    from mclx.bank import build_bank, save_bank
    from mclx.files import check_output

    check_output(out)
    usage = feature_cache(no_feature_cache)
    names = split_names(sections) or None
    b = build_bank(ckpt, data.open(), sections=names, progress=not quiet)
    save_bank(b, out)
    click.echo(
        f"mclx: wrote {out}: {len(b)} spots from {len(set(b.sections.tolist()))} sections, "
        f"{len(b.genes)} genes, fingerprint {b.fingerprint}{usage.suffix()}"
    )


@bank.command("info", cls=MclxCommand, context_settings=CONTEXT)
@path_argument("path", role="input")
def bank_info(path: Path) -> None:
    """Describe a bank: size, sections, genes, the checkpoint it came from."""
    from mclx.bank import load_bank

    b = load_bank(path)
    secs = sorted(set(b.sections.tolist()))
    click.echo(
        f"{path}: {len(b)} spots x {b.embeddings.shape[1]}-d embeddings, {len(b.genes)} genes"
    )
    click.echo(f"sections ({len(secs)}): {', '.join(secs)}")
    # every gene, on one line a user can grep for a marker (ERBB2, MKI67, ...)
    click.echo(f"genes ({len(b.genes)}): {', '.join(b.genes)}")
    click.echo(f"checkpoint: {b.checkpoint} (fingerprint {b.fingerprint}, model {b.model})")
    click.echo(f"defaults: k={b.k} distance={b.distance} weighting={b.weighting}")
