"""``mclx view``: a folder that shows predictions over their slide (:mod:`mclx.viewer`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from mclx.cli.options import CONTEXT, force_option, out_option, quiet_option, split_names
from mclx.cli.paths import MclxCommand, path_argument, path_option


def _derived(params: dict[str, Any]):
    """The slide the predictions record, an input when --slide is not given."""
    if params.get("slide") is None and params.get("predictions") is not None:
        recorded = recorded_slide(params["predictions"])
        if recorded is not None:
            yield "input", "the slide the predictions record", recorded


def recorded_slide(predictions: Path) -> Path | None:
    """``uns["mclx"]["slide"]`` of a predictions file, read without loading it (None
    when it cannot be read: the run itself then says why)."""
    import h5py

    try:
        with h5py.File(predictions, "r") as f:
            value = f["uns/mclx/slide"][()]
    except Exception:  # any unreadable file (not HDF5, no record): the run says why
        return None
    return Path(value.decode() if isinstance(value, bytes) else str(value))


@click.command(cls=MclxCommand, derive=_derived, context_settings=CONTEXT)
@path_argument("predictions", role="input")
@path_option(
    "--slide",
    role="input",
    help="The slide the predictions were made on (default: the path they record).",
)
@out_option(
    "Folder to write: index.html, the slide's tile pyramid, OpenSeadragon.",
    required=True,
    folder=True,
)
@click.option("--gene", default=None, help="Gene coloured first (default: the most variable).")
@click.option(
    "--genes",
    multiple=True,
    help="Only these genes in the page (comma-separated or repeated; default: all).",
)
@click.option("--workers", type=click.IntRange(1), default=2, help="Threads writing tiles.")
@force_option("Draw over --slide even when it is not the slide the predictions recorded.")
@quiet_option("No progress bar.")
def view(
    predictions: Path, slide, out: Path, gene, genes, workers: int, force: bool, quiet: bool
) -> None:
    """Write a folder that shows predictions over their slide in any web browser.

    \b
    Pan and zoom the slide (OpenSeadragon, Deep Zoom tiles); tiles or spots coloured by a
    gene (search over all genes, colour bar with its range, opacity slider); a click on a
    tile lists its top genes; the header shows the slide, checkpoint, bank, backend and
    timings. Open OUT/index.html from disk (file://) or serve OUT with any web server.
    \b
    Examples:
      mclx view S3.h5ad --out S3_view && xdg-open S3_view/index.html
      mclx view C2.h5ad --slide C2.jpg --gene FASN --out C2_view
      python -m http.server -d C2_view 8000    # then http://localhost:8000
    """
    from mclx.viewer import write_view

    s = write_view(
        predictions,
        out,
        slide=slide,
        gene=gene,
        genes=split_names(genes),
        workers=workers,
        progress=not quiet,
        force=force,
    )
    w, h = s["slide_size"]
    click.echo(
        f"mclx: wrote {out}/index.html: {s['n_obs']} tiles x {s['n_genes']} genes over "
        f"{Path(s['slide']).name} ({w} x {h} px), first gene {s['gene']}; open it in a browser"
    )
