"""``mclx evaluate``: leave-one-section-out cross-validation, or one checkpoint scored
(:mod:`mclx.evaluation.evaluate`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from mclx.cli.model_options import ModelOptions, model_options
from mclx.cli.options import (
    CONTEXT,
    DataOptions,
    ckpt_option,
    data_option,
    distance_option,
    feature_cache,
    feature_cache_option,
    k_option,
    out_option,
    sections_option,
    split_names,
)
from mclx.cli.paths import MclxCommand, path_option


def results_path(out: Path | None, model: str) -> Path:
    """The results JSON: ``--out``, else ``evaluate_MODEL.json``."""
    return out or Path(f"evaluate_{model}.json")


def table_path(out: Path | None) -> Path:
    """The comparison table of several models: ``--out``, else ``evaluate_compare.csv``
    (its CSV and Markdown take ``--out``'s name with their own suffixes)."""
    return out or Path("evaluate_compare.csv")


def _derived(params: dict[str, Any]):
    """The default results JSON and the files written beside it."""
    from mclx.evaluation.evaluate import result_paths

    models = (params.get("model") or "mclstexp").split(",")
    if len(models) > 1:
        from mclx.evaluation.compare import output_paths

        for path in output_paths(table_path(params.get("out")), models):
            if path != params.get("out"):
                yield "output", "a file of the comparison table", path
        return
    out = results_path(params.get("out"), models[0])
    json_path, csv, predictions = result_paths(out)
    if params.get("out") is None:
        yield "output", "the default --out", json_path
    yield "output", "the per-gene CSV beside --out", csv
    yield "output", "the predictions beside --out", predictions


@click.command(cls=MclxCommand, derive=_derived, context_settings=CONTEXT)
@data_option()
@sections_option("Sections to cross-validate (default: all with images).")
@click.option(
    "--bank-sections",
    multiple=True,
    help="Extra sections (image not needed) whose spots join every fold's bank; 'all' for "
    "every section of the folder (the held-out section is always left out).",
)
@k_option("Neighbours retrieved (default: 200 mclSTExp, 50 BLEEP).")
@distance_option()
@out_option(
    "Results JSON (per-gene PCC CSV beside it). Default: evaluate_MODEL.json. With several "
    "--model: the table's name (OUT.csv, OUT.md, each model's OUT.MODEL.json beside); "
    "default evaluate_compare.csv."
)
@ckpt_option(
    "Score this trained checkpoint with --bank on --sections (no training).", required=False
)
@path_option(
    "--bank",
    "bank_path",
    role="input",
    default=None,
    help="Bank for --ckpt (not for models that predict directly: stnet, histogene, his2st, "
    "thitogene).",
)
@feature_cache_option()
@model_options(several=True)
def evaluate(  # long: its help and its three modes (one model, a table, a checkpoint)
    data: DataOptions, sections, bank_sections, k, distance, out, ckpt, bank_path,
    no_feature_cache: bool, opts: ModelOptions, quiet: bool,
) -> None:  # fmt: skip
    """Leave-one-section-out cross-validation: the paper's Table 1.

    \b
    Prints PCC over all genes (ACG), PCC over the 50 most expressed genes of the test
    section (HEG), MSE and MAE per section and mean +- std.
    \b
    Examples:
      mclx evaluate --data ../shared/data/her2st --freeze-encoder --epochs 90
      mclx evaluate --model bleep --freeze-encoder --out bleep.json
      mclx evaluate --freeze-encoder --bank-sections A1,A2,B1 --distance l1
      mclx evaluate --ckpt model.pt --bank her2.npz --sections C2 --out c2.json
      mclx evaluate --data ../shared/data/stutility-mob --freeze-encoder --n-hvg 500 --k 100
      mclx evaluate --model mclstexp,bleep,stnet,knn,ridge --freeze-encoder --out table.csv
        (several models: one table, CSV and Markdown; each patch encoded once)
    \b
    With --n-hvg N each fold chooses its genes on its training sections only (the
    held-out section's counts never enter the panel); the results JSON says so.
    """
    from mclx.evaluation.evaluate import (
        cross_validate,
        format_table,
        score_checkpoint,
        write_results,
    )
    from mclx.files import check_output

    usage = feature_cache(no_feature_cache)
    if len(opts.models()) > 1:
        where = (data, sections, bank_sections)
        return _compare(*where, k, distance, out, opts, quiet, ckpt or bank_path, usage)
    out = check_output(results_path(out, opts.model))
    reader = data.open()
    if ckpt is not None or bank_path is not None:
        if ckpt is None or not sections:
            msg = "evaluate: --ckpt needs --sections (the sections to score) and --bank"
            raise click.UsageError(msg)
        res = score_checkpoint(
            ckpt, bank_path, reader, split_names(sections), k=k, distance=distance
        )
        title = f"{ckpt} with {bank_path}"
    else:
        extra = split_names(bank_sections)
        res = cross_validate(
            reader,
            opts.recipe(),
            sections=split_names(sections) or None,
            bank_sections=reader.sections() if extra == ["all"] else extra,
            k=k,
            distance=distance,
            progress=not quiet,
        )
        title = _title(opts.model, res["config"])
    click.echo(format_table(res, title=title))
    json_path, csv_path = write_results(res, out)
    preds = json_path.with_name(json_path.stem + ".predictions.h5ad")
    click.echo(
        f"mclx: wrote {json_path} and {csv_path}"
        + (f" and {preds} (for mclx analyze)" if res.get("predictions") else "")
        + usage.suffix()
    )


def _title(model: str, c: dict[str, Any]) -> str:
    """The table's title line of a cross-validation."""
    return (
        f"{model}: k={c['k']} distance={c['distance']} genes={c['n_genes']} "
        f"epochs={c['train']['epochs']} ({c['seconds']} s)"
    )


def _compare(
    data, sections, bank_sections, k, distance, out, opts: ModelOptions, quiet, ckpt, usage
) -> None:
    """Cross-validate each model of ``--model a,b,...`` and write the comparison table;
    ``usage`` is the command's feature-cache session (for the summary line)."""
    if ckpt is not None:
        raise click.UsageError("evaluate: --ckpt scores one model; name one --model")
    from mclx.evaluation.compare import compare, output_paths, rows, to_markdown, write_comparison
    from mclx.files import check_output

    out = table_path(out)
    for path in output_paths(out, opts.models()):
        check_output(path)
    reader = data.open()
    extra = split_names(bank_sections)
    results = compare(
        reader,
        [opts.for_model(m).recipe() for m in opts.models()],
        echo=None if quiet else click.echo,
        sections=split_names(sections) or None,
        bank_sections=reader.sections() if extra == ["all"] else extra,
        k=k,
        distance=distance,
        progress=not quiet,
    )
    held = list(next(iter(results.values()))["sections"])
    title = (
        f"Leave-one-section-out on {', '.join(held)} (recipe {opts.recipe_name}, seed "
        f"{opts.seed}; time in seconds, features a model found cached not counted again)"
    )
    click.echo(to_markdown(rows(results), title))
    csv, md = write_comparison(results, out, title)
    click.echo(f"mclx: wrote {csv} and {md}, and each model's results beside them{usage.suffix()}")
