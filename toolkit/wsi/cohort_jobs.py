"""A cohort's jobs and results: the slides (from the command line or a manifest CSV with a
``slide`` column and optional ``spots``, ``mpp``, ``out``), where each one's predictions
go, the summary rows, and how a finished slide is written. Both engines
(:mod:`mclx.wsi.cohort` on this process, :mod:`mclx.wsi.cohort_ray` on Ray Data) use
these."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from mclx.errors import USER_ERRORS, DataError, one_line

Engine = Literal["local", "ray"]
SUMMARY = "summary.csv"
# what a failing slide may raise: reported in its row, the other slides go on
SLIDE_ERRORS = USER_ERRORS


@dataclass(frozen=True)
class Job:
    """One slide of the cohort and where its predictions go."""

    slide: Path
    out: Path
    spots: Path | None = None
    mpp: float | None = None
    folder: Path | None = None  # the --out-dir that holds ``out`` (its manifest lists it)


@dataclass
class Result:
    """One row of the summary: ``status`` is ``done``, ``skipped`` or ``failed``."""

    slide: str
    tiles: int
    seconds: float
    status: str
    error: str = ""
    out: str = ""


@dataclass
class Options:
    """The per-slide settings shared by every slide (as ``mclx infer`` takes them), and
    the outputs each slide writes besides its ``.h5ad``: PNG maps of ``plot`` beside it,
    ``geojson`` / ``spatialdata`` folders holding ``STEM.geojson`` / ``STEM.zarr`` per
    slide, and with ``resume`` each slide continues from its own ``OUT.state``."""

    # the tiling and reading fields of InferConfig, repeated (duplicates D2): Ray's read
    # tasks take these plain settings; config() hands them to the one engine
    batch_size: int = 64
    stride: int | None = None
    workers: int = 2
    max_tiles: int | None = None
    reader_pool: str = "threads"
    plot: tuple[str, ...] = ()
    geojson: Path | None = None
    geojson_genes: int | None = None
    spatialdata: Path | None = None
    resume: bool = False
    save_every: int | None = None
    plan: dict[str, Any] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.plan = {"stride": self.stride, "max_tiles": self.max_tiles,
                     "batch_size": self.batch_size, "workers": self.workers}  # fmt: skip

    def config(self):
        """The run's :class:`~mclx.wsi.engine.InferConfig` (its tiling and reading)."""
        from mclx.wsi.engine import InferConfig

        return InferConfig(batch_size=self.batch_size, stride=self.stride, workers=self.workers,
                           reader_pool=self.reader_pool, max_tiles=self.max_tiles)  # fmt: skip

    def task(self, job: Job):
        """``job`` as a :class:`~mclx.wsi.engine.SlideTask` with these outputs."""
        from mclx.wsi.engine import SlideTask

        stem = Path(job.slide).stem
        return SlideTask(
            job.slide, job.out, spots=job.spots, mpp=job.mpp, plot=tuple(self.plot),
            geojson=self.geojson / f"{stem}.geojson" if self.geojson else None,
            geojson_genes=self.geojson_genes,
            spatialdata=self.spatialdata / f"{stem}.zarr" if self.spatialdata else None,
            resume=self.resume, save_every=self.save_every,
        )  # fmt: skip


def read_manifest(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a manifest CSV: ``slide`` (required), ``spots``, ``mpp``, ``out``; paths
    relative to the manifest's folder."""
    import pandas as pd

    from mclx.artifacts import require_file

    path = require_file(Path(path), "manifest", nonempty=True, error=DataError)
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as exc:  # pandas raises several types for a file that is not a CSV
        msg = f"{path}: not a CSV manifest ({exc.__class__.__name__})"
        raise DataError(msg) from exc
    if "slide" not in df.columns:
        msg = f"{path}: no 'slide' column (columns: {', '.join(df.columns[:6])})"
        raise DataError(msg)
    unknown = set(df.columns) - {"slide", "spots", "mpp", "out"}
    if unknown:
        msg = f"{path}: unknown column(s) {sorted(unknown)} (known: slide, spots, mpp, out)"
        raise DataError(msg)
    rows = []
    for i, r in enumerate(df.to_dict("records"), start=2):
        if not r["slide"].strip():
            msg = f"{path}: line {i}: empty slide"
            raise DataError(msg)
        row: dict[str, Any] = {"slide": path.parent / r["slide"].strip()}
        for key in ("spots", "out"):
            if r.get(key, "").strip():
                row[key] = path.parent / r[key].strip()
        if r.get("mpp", "").strip():
            try:
                row["mpp"] = float(r["mpp"])
            except ValueError:
                msg = f"{path}: line {i}: mpp {r['mpp']!r} is not a number"
                raise DataError(msg) from None
            if not row["mpp"] > 0:
                msg = f"{path}: line {i}: mpp must be positive, not {r['mpp']}"
                raise DataError(msg)
        rows.append(row)
    if not rows:
        msg = f"{path}: no slides"
        raise DataError(msg)
    return rows


def cohort_jobs(
    slides: Sequence[str | os.PathLike],
    *,
    manifest: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    mpp: float | None = None,
) -> list[Job]:
    """The jobs of ``slides`` and the ``manifest``'s rows; outputs ``OUT_DIR/STEM.pred.h5ad``
    unless the manifest says; two slides writing one output are refused (an output in
    ``out_dir`` that mclx did not write: :func:`check_own_outputs`)."""
    rows = [{"slide": Path(s)} for s in slides]
    if manifest is not None:
        rows += read_manifest(manifest)
    jobs, seen = [], {}
    for r in rows:
        out = Path(r.get("out") or Path(out_dir) / f"{Path(r['slide']).stem}.pred.h5ad")
        key = out.resolve()
        if key in seen:
            msg = f"{r['slide']} and {seen[key]} would both write {out}; give one an 'out'"
            raise DataError(msg)
        seen[key] = r["slide"]
        folder = None if r.get("out") else Path(out_dir)
        jobs.append(Job(Path(r["slide"]), out, r.get("spots"), r.get("mpp", mpp), folder))
    return jobs


def check_own_outputs(jobs: Sequence[Job]) -> None:
    """Refuse an output in a cohort's ``--out-dir`` that is there and that mclx did not
    write (not in the folder's manifest): it is the user's file, never replaced."""
    from mclx.folders import check_own_file

    for job in jobs:
        if job.folder is not None:
            check_own_file(job.out, folder=job.folder)


def record_outputs(job: Job, written: Sequence[str | os.PathLike] = ()) -> None:
    """List ``job.out`` and the files among ``written`` that lie in the cohort's
    ``--out-dir`` in its manifest: mclx's, so a later run may replace them."""
    if job.folder is None:
        return
    from mclx.files import record_written

    ours = [job.out, *(p for p in map(Path, written) if p.is_file())]
    record_written(
        job.folder, [p for p in ours if p.resolve().is_relative_to(job.folder.resolve())]
    )


def already_done(job: Job, run) -> bool:
    """Whether ``job.out`` holds predictions for this slide by this run's checkpoint,
    bank, k and distance (read from ``uns/mclx`` without loading the predictions)."""
    import h5py

    if not job.out.is_file():
        return False
    want = {
        "slide": str(job.slide.resolve()),
        "checkpoint_fingerprint": run.encoder.fingerprint,
        "bank_fingerprint": run.bank.fingerprint if run.bank is not None else "",
        "k": int(run.k),
        "distance": (run.distance or run.bank.distance) if run.bank is not None else "",
    }
    try:
        with h5py.File(job.out, "r") as f:
            got = {key: f[f"uns/mclx/{key}"][()] for key in want}
    except (OSError, KeyError):
        return False
    got = {k: v.decode() if isinstance(v, bytes) else v for k, v in got.items()}
    return all(got[k] == (int(v) if k == "k" else v) for k, v in want.items())


def write_slide(adata, job: Job, engine: str, opts: Options | None = None) -> list[Path]:
    """``job``'s predictions and outputs as ``mclx infer`` writes them (the slide image in
    ``uns["spatial"]``), all or nothing; ``uns["mclx"]["engine"]`` says which engine."""
    from mclx.wsi.engine import SlideEngine

    opts = opts or Options()
    written = SlideEngine(opts.config(), label=engine).write(adata, opts.task(job))
    record_outputs(job, written)
    return written


def failure(job: Job, exc: BaseException, seconds: float = 0.0) -> Result:
    """The summary row of a slide that failed, with its error in one line."""
    text = one_line(exc)
    if str(job.slide) not in text and job.slide.name not in text:
        text = f"{job.slide}: {text}"
    return Result(str(job.slide), 0, round(seconds, 3), "failed", text, str(job.out))


def progress_line(n: int, total: int, r: Result) -> str:
    """``[n/total] slide: ...`` once a slide is finished."""
    if r.status == "failed":
        return f"mclx: [{n}/{total}] failed: {r.error}"
    rate = r.tiles / r.seconds if r.seconds else 0.0
    return (
        f"mclx: [{n}/{total}] {r.slide}: {r.tiles} tiles in {r.seconds:.1f} s ({rate:.1f} tiles/s)"  # noqa: E501
    )


def write_summary(results: Sequence[Result], path: str | os.PathLike) -> Path:
    """The summary table as CSV, written atomically."""
    import pandas as pd

    from mclx.files import atomic_path, record_written

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame([asdict(r) for r in results], columns=list(Result.__dataclass_fields__))
    with atomic_path(path, suffix=".csv") as tmp:
        df.to_csv(tmp, index=False)
    record_written(path.parent, [path])
    return path


def format_summary(results: Sequence[Result]) -> str:
    """The summary as an aligned text table."""
    import pandas as pd

    df = pd.DataFrame([asdict(r) for r in results]).drop(columns=["out"])
    return df.to_string(index=False)
