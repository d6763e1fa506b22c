"""Nothing a user has is ever destroyed (issue 25, SPEC 8), and the wrong answers and
messages found beside it.

- a folder mclx replaces (viewer, SpatialData store) or writes into (cohort --out-dir)
  holds only what mclx wrote there, by its manifest; anything else makes it the user's;
- several outputs commit together: a move that fails undoes the ones before it;
- ``mclx view --slide`` refuses a slide that is not the predictions' own (``--force``);
- ``mclx analyze --markers`` with no or some unknown markers; a JSON another tool wrote;
  no empty ``--out`` left behind;
- a legacy-ST image not named after its section; ``--backend tensorrt`` without a GPU;
  ``mclx view`` on a full disk.

The collision rule (an output that is an input or another output) has its own
property test; the manifest rule here must hold without it.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from helpers import assert_one_line_error, mclx, needs, run_cli

from mclx.files import all_or_nothing, atomic_folder, atomic_path, write_text_atomic
from mclx.folders import MANIFEST

PREVIOUS = b"previous good output\n"


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every file (hidden ones too) under ``folder`` with its bytes (None for folders)."""
    return {
        str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes()
        for p in sorted(folder.rglob("*"))
    }


# --------------------------------------------------------------------------- commit


def fail_at_move(monkeypatch, n: int, *, onto: Path | None = None) -> list:
    """``os.replace`` fails (ENOSPC) at its ``n``-th call (counting from 1), or at the
    first move onto ``onto``; the moves that an undo makes after it succeed."""
    real, calls = os.replace, []

    def replace(src, dst, *a, **kw):
        calls.append((Path(src), Path(dst)))
        hit = Path(dst) == onto if onto is not None else len(calls) == n
        if hit and not any(c[-1] == "failed" for c in calls):
            calls.append("failed")
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        return real(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", replace)
    return calls


def test_second_move_fails_first_is_undone(tmp_path, monkeypatch):
    """Two files, the first replacing a good one: the second move fails, and the first
    file is back to its previous bytes, the second absent, no temporary file left."""
    (tmp_path / "a.txt").write_bytes(PREVIOUS)
    calls = fail_at_move(monkeypatch, 2)
    with pytest.raises(OSError, match="injected"), all_or_nothing():
        write_text_atomic(tmp_path / "a.txt", "new a")
        write_text_atomic(tmp_path / "b.txt", "new b")
    assert "failed" in calls
    assert snapshot(tmp_path) == {"a.txt": PREVIOUS}
    monkeypatch.undo()  # and the same block commits whole when nothing fails
    with all_or_nothing():
        write_text_atomic(tmp_path / "a.txt", "new a")
        write_text_atomic(tmp_path / "b.txt", "new b")
    assert snapshot(tmp_path) == {"a.txt": b"new a", "b.txt": b"new b"}


def test_failed_move_after_a_folder_restores_the_folder(tmp_path, monkeypatch):
    """A folder output (replacing mclx's earlier one) then a file whose move fails: the
    earlier folder comes back whole, the new file is not there."""
    dest = tmp_path / "view"
    with atomic_folder(dest) as tmp:
        (tmp / "old.txt").write_bytes(PREVIOUS)
    before = snapshot(tmp_path)
    fail_at_move(monkeypatch, 0, onto=tmp_path / "p.h5ad")
    with pytest.raises(OSError, match="injected"), all_or_nothing():
        with atomic_folder(dest) as tmp:
            (tmp / "new.txt").write_text("new")
        with atomic_path(tmp_path / "p.h5ad") as tmp:
            tmp.write_bytes(b"predictions")
    assert snapshot(tmp_path) == before


def test_a_folder_output_onto_a_file_output_leaves_neither(tmp_path):
    """Today's ``--spatialdata`` equal to ``--out``: the store cannot replace the file
    moved there just before; the command leaves the previous file and no store."""
    (tmp_path / "p.h5ad").write_bytes(PREVIOUS)
    with pytest.raises(FileExistsError, match=r"p.h5ad: is a file"), all_or_nothing():
        with atomic_path(tmp_path / "p.h5ad") as tmp:
            tmp.write_bytes(b"predictions")
        with atomic_folder(tmp_path / "p.h5ad") as tmp:
            (tmp / "zarr.json").write_text("{}")
    assert snapshot(tmp_path) == {"p.h5ad": PREVIOUS}


# --------------------------------------------------------------------------- manifest


def test_folder_is_replaceable_only_while_it_holds_what_mclx_wrote(tmp_path):
    from mclx.folders import check_replaceable

    dest = tmp_path / "out"
    with atomic_folder(dest) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "t.jpeg").write_bytes(b"tile")
        (tmp / "index.html").write_text("page")
    listed = json.loads((dest / MANIFEST).read_text())["files"]
    assert listed == {"index.html": 4, "sub/t.jpeg": 4}
    check_replaceable(dest, what="a view")  # as written: mclx's
    (dest / "notes.txt").write_text("mine")  # a user's file beside: the user's folder
    with pytest.raises(FileExistsError, match=r"out: holds notes.txt, which mclx did not"):
        check_replaceable(dest, what="a view")
    (dest / "notes.txt").unlink()
    (dest / "index.html").write_text("edited by hand")  # a file mclx wrote, changed
    with pytest.raises(FileExistsError, match="holds index.html"):
        check_replaceable(dest, what="a view")
    with pytest.raises(FileExistsError, match="holds index.html"), atomic_folder(dest) as tmp:
        (tmp / "index.html").write_text("new page")  # refused at the move too
    assert (dest / "index.html").read_text() == "edited by hand"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing left beside


def test_a_folder_with_a_marker_but_no_manifest_is_not_mclx_s(tmp_path):
    from mclx.files import check_output_folder

    old = tmp_path / "v"
    old.mkdir()
    (old / "mclx-view.json").write_text("{}")  # the marker alone made it replaceable
    (old / "a.h5ad").write_bytes(PREVIOUS)
    with pytest.raises(FileExistsError, match=r"v: a folder that is not an mclx view"):
        check_output_folder(old, marker="mclx-view.json", what="an mclx view")


def test_cohort_out_dir_keeps_a_user_file_of_an_output_s_name(tmp_path):
    """A file in --out-dir named like a slide's output, that mclx did not write there,
    is refused before any work; once mclx wrote it (manifest), a rerun may replace it."""
    from mclx.files import record_written
    from mclx.wsi.cohort_jobs import check_own_outputs, cohort_jobs

    out = tmp_path / "out"
    out.mkdir()
    (out / "S1.pred.h5ad").write_bytes(PREVIOUS)
    jobs = cohort_jobs([tmp_path / "S1.tif"], manifest=None, out_dir=out)
    with pytest.raises(FileExistsError, match=r"S1.pred.h5ad: exists and mclx did not"):
        check_own_outputs(jobs)
    assert (out / "S1.pred.h5ad").read_bytes() == PREVIOUS
    record_written(out, [out / "S1.pred.h5ad"])  # as a cohort run records what it wrote
    check_own_outputs(jobs)
    assert jobs[0].folder == out


def test_cohort_summary_of_the_user_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.csv").write_bytes(PREVIOUS)
    res = run_cli(capsys, ["infer", tmp_path / "a.tif", tmp_path / "b.tif", "--bank",
                           tmp_path / "bank.npz", "--out-dir", out])  # fmt: skip
    assert_one_line_error(res, "summary.csv", "mclx did not write it")
    assert snapshot(out) == {"summary.csv": PREVIOUS}


# --------------------------------------------------------------------------- view


def limit_file_size(nbytes: int):
    def preexec() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, resource.RLIM_INFINITY))

    return preexec


@needs("openseadragon")
def test_view_into_the_folder_of_its_input_keeps_the_input(slide_predictions, tmp_path):
    """``mclx view v/a.h5ad --out v`` deleted a.h5ad and everything else in ``v``."""
    v = tmp_path / "v"
    v.mkdir()
    a = shutil.copyfile(slide_predictions["h5ad"], v / "a.h5ad")
    (v / "mclx-view.json").write_text("{}")  # even with the viewer's marker
    before = snapshot(tmp_path)
    res = mclx("view", a, "--slide", slide_predictions["slide"], "--out", v, "-q")
    assert_one_line_error(res, str(v))
    assert snapshot(tmp_path) == before


@needs("openseadragon")
def test_view_never_removes_a_user_file_dropped_into_a_view(
    view_folder, slide_predictions, tmp_path
):  # noqa: E501
    v = tmp_path / "v"
    shutil.copytree(view_folder, v)
    (v / "slide_files" / "my_notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    res = mclx("view", slide_predictions["h5ad"], "--out", v, "-q")
    assert_one_line_error(res, str(v), "slide_files/my_notes.txt", "mclx did not write")
    assert snapshot(tmp_path) == before
    (v / "slide_files" / "my_notes.txt").unlink()  # as mclx wrote it: replaced
    res = mclx("view", slide_predictions["h5ad"], "--genes", "GENE003", "--out", v, "-q")
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v"]


@needs("openseadragon")
def test_view_refuses_another_slide_unless_forced(slide_predictions, tmp_path):
    from PIL import Image

    from mclx.data.slide import load_image

    h5ad = slide_predictions["h5ad"]
    u = ad.read_h5ad(h5ad).uns["mclx"]
    img = load_image(slide_predictions["jpeg"])
    assert list(u["slide_size"]) == [img.shape[1], img.shape[0]] and u["slide_name"] == "S3.tif"
    other = tmp_path / "other.png"  # same size, another picture: the section upside down
    Image.fromarray(np.ascontiguousarray(img[::-1, ::-1])).save(other)
    res = mclx("view", h5ad, "--slide", other, "--out", tmp_path / "v", "-q")
    assert_one_line_error(res, "other.png", "not the slide", "S3.tif", "--force")
    smaller = tmp_path / "smaller.png"
    Image.fromarray(img[: img.shape[0] - 8]).save(smaller)
    res = mclx("view", h5ad, "--slide", smaller, "--out", tmp_path / "v", "-q")
    assert_one_line_error(res, "smaller.png", f"{img.shape[0] - 8} px are not")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.png", "smaller.png"]
    res = mclx("view", h5ad, "--slide", other, "--out", tmp_path / "v", "-q", "--force")
    assert res.returncode == 0, res.stderr
    # the JPEG the pyramidal TIFF was made from is the same slide
    res = mclx("view", h5ad, "--slide", slide_predictions["jpeg"], "--out", tmp_path / "w", "-q")
    assert res.returncode == 0, res.stderr


@needs("openseadragon")
def test_view_on_a_full_disk_says_so_in_one_line(slide_predictions, tmp_path):
    out = tmp_path / "v"
    res = mclx(
        "view", slide_predictions["h5ad"], "--out", out, "-q",
        preexec_fn=limit_file_size(64 * 1024),
    )  # fmt: skip
    assert_one_line_error(res, str(out), "cannot write it")
    assert "file size limit" in res.stderr or "file too large" in res.stderr
    assert "[" not in res.stderr.split("cannot write it")[1]  # no Python list of paths
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- infer


@needs("spatialdata")
def test_spatialdata_at_the_predictions_path_leaves_nothing(slide_predictions, tmp_path):
    """--spatialdata equal to --out failed after moving the .h5ad into place, and left
    it there with a temporary store: now nothing appears."""
    folder = slide_predictions["h5ad"].parent
    out = tmp_path / "p.h5ad"
    res = mclx("infer", slide_predictions["slide"], "--bank", folder / "bank.npz",
               "--k", 20, "--out", out, "--spatialdata", out, "-q")  # fmt: skip
    assert_one_line_error(res, "p.h5ad")
    assert snapshot(tmp_path) == {}


@needs("spatialdata")
def test_failed_spatialdata_store_leaves_no_predictions(
    slide_predictions, tmp_path, capsys, monkeypatch
):  # noqa: E501
    import spatialdata

    folder = slide_predictions["h5ad"].parent

    def full(self, path, *a, **kw):
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "zarr.json").write_text("{")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spatialdata.SpatialData, "write", full)
    res = run_cli(capsys, ["infer", slide_predictions["slide"], "--bank", folder / "bank.npz",
                           "--k", 20, "--out", tmp_path / "p.h5ad", "--spatialdata",
                           tmp_path / "p.zarr", "-q"])  # fmt: skip
    assert_one_line_error(res, "p.zarr", "no space left")
    assert list(tmp_path.iterdir()) == []


def test_tensorrt_without_a_gpu_says_an_engine_needs_one(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is here: --backend tensorrt may run")
    from mclx.inference.choose import open_encoder

    ck = tmp_path / "m.pt"
    ck.write_bytes(b"")
    with pytest.raises(RuntimeError, match=r"m.engine: --backend tensorrt needs an NVIDIA GPU"):
        open_encoder(ck, backend="tensorrt")
    with pytest.raises(RuntimeError, match=r"and --device cpu"):
        open_encoder(ck, backend="tensorrt", device="cpu")


# --------------------------------------------------------------------------- analyze


def _predictions(sections=("S1", "S2"), n: int = 40, g: int = 6) -> ad.AnnData:
    rng = np.random.default_rng(0)
    parts = []
    for s in sections:
        true = rng.gamma(2.0, 1.0, size=(n, g))
        a = ad.AnnData(
            X=(true + rng.normal(size=(n, g))).astype(np.float32),
            var=pd.DataFrame(index=[f"G{j}" for j in range(g)]),
        )
        a.layers["measured"] = true.astype(np.float32)
        a.obs_names = [f"{s}_{i}" for i in range(n)]
        a.obs["section"] = s
        a.obsm["spatial"] = rng.uniform(0, 1000, size=(n, 2))
        parts.append(a)
    return ad.concat(parts)


@pytest.fixture
def preds(tmp_path) -> Path:
    path = tmp_path / "p.h5ad"
    _predictions().write_h5ad(path)
    return path


def test_analyze_refuses_markers_none_of_which_are_predicted(preds, tmp_path, capsys):
    markers = tmp_path / "markers.txt"
    markers.write_text("ERBB2\nESR1\n")
    res = run_cli(capsys, ["analyze", preds, "--out", tmp_path / "an", "--markers", markers])
    assert_one_line_error(res, "markers.txt", "none of its 2 marker genes", "ERBB2")
    assert not (tmp_path / "an").exists()


def test_analyze_names_unknown_markers_and_draws_no_nan_panel(preds, tmp_path, capsys):
    markers = tmp_path / "markers.txt"
    markers.write_text("G1\nERBB2\nG3\n")
    res = run_cli(capsys, ["analyze", preds, "--out", tmp_path / "an", "--markers", markers])
    assert res.returncode == 0, res.stderr
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith("mclx: warning: ") and "markers.txt" in line and "ERBB2" in line
    assert "1 of 3" in line
    panels = pd.read_csv(tmp_path / "an" / "panels.csv", index_col=0)
    assert panels["n_markers"].tolist() == [2, 2]
    assert np.isfinite(panels["pcc_markers"]).all()


@pytest.mark.parametrize("value", [5, None, ["p.h5ad"], {"a": 1}, ""])
def test_analyze_on_a_json_another_tool_wrote(preds, tmp_path, capsys, value):
    src = tmp_path / "other.json"
    src.write_text(json.dumps({"predictions": value}))
    res = run_cli(capsys, ["analyze", src, "--out", tmp_path / "an"])
    assert_one_line_error(res, "other.json", "names no predictions file")


def test_analyze_leaves_no_empty_out_folder_when_a_write_fails(
    preds, tmp_path, capsys, monkeypatch
):  # noqa: E501
    import matplotlib.figure

    def full(self, fname, *a, **kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full)
    out = tmp_path / "new" / "an"
    res = run_cli(capsys, ["analyze", preds, "--out", out])
    assert_one_line_error(res, "no space left")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.h5ad"]


# --------------------------------------------------------------------------- legacy ST


@needs("stutility-mob")
def test_legacy_st_image_not_named_after_its_section_is_named(tmp_path, capsys):
    from helpers.data import shared_path

    src = shared_path("stutility-mob")
    for name in ("MOB1.tsv", "alignment_table_MOB1.tsv"):
        (tmp_path / name).symlink_to(src / name)
    (tmp_path / "HE_MOB1_scan.jpg").symlink_to(src / "MOB1.jpg")
    res = run_cli(capsys, ["train", "--data", tmp_path, "--out", tmp_path / "m.pt",
                           "--epochs", 1])  # fmt: skip
    assert_one_line_error(res, "no section has an image", "'MOB1'", "MOB1.jpg", "MOB1.png")
    assert "holdout" not in res.stderr


def test_undo_without_hard_links_restores_a_copy(tmp_path, monkeypatch):
    """A file system without hard links (FAT, some network shares): the replaced file
    is copied aside, and put back when a later move fails."""

    def no_link(*a, **kw):
        raise OSError(errno.EPERM, "Operation not permitted")

    (tmp_path / "a.txt").write_bytes(PREVIOUS)
    monkeypatch.setattr(os, "link", no_link)
    fail_at_move(monkeypatch, 2)
    with pytest.raises(OSError, match="injected"), all_or_nothing():
        write_text_atomic(tmp_path / "a.txt", "new a")
        write_text_atomic(tmp_path / "b.txt", "new b")
    assert snapshot(tmp_path) == {"a.txt": PREVIOUS}
