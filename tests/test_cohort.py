"""`mclx infer` over a cohort: Ray Data against local runs, failures, skipping done slides.

The reference is ``mclx infer`` of each slide alone (the one-slide runtime, itself checked
against a float64 oracle in test_runtime.py). Ray starts once for the module (2 CPUs, no
dashboard, a small object store); tests that need it (``needs("ray")``) skip without Ray,
and fail instead with ``MCLX_REQUIRE_RAY=1`` (CI).
"""

from __future__ import annotations

import json
import os
import sys
import time

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from helpers import assert_one_line_error, needs, run_cli, tiny_model

from mclx.bank import build_bank, save_bank
from mclx.data.her2st import find_data_root

SHRINK = (
    3  # her2st images at 1/3 size, read as if at the model's µm/px: ~50 tiles each at --stride 112
)


@pytest.fixture(scope="module")
def ray_session():
    """Ray, started once for the module (for tests marked ``needs("ray")``)."""
    os.environ["RAY_AUTH_MODE"] = "disabled"
    import ray

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=96 << 20,
             log_to_driver=False, logging_level="WARNING")  # fmt: skip
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def cohort(synthetic, her2st, tmp_path_factory):
    """A tiny checkpoint and bank (synthetic sections), two her2st images shrunk (tissue
    and glass), a corrupt JPEG, and a manifest of the three (µm/px: the model's)."""
    from PIL import Image

    from mclx.data.her2st import read_section

    d = tmp_path_factory.mktemp("cohort")
    ck = tiny_model(synthetic, epochs=1).save(d / "m.pt")
    bank = save_bank(build_bank(ck, synthetic, sections=["S1", "S2", "S4"]), d / "bank.npz")
    from mclx.checkpoint import load_checkpoint

    mpp = load_checkpoint(ck).preprocess.mpp
    root = find_data_root(her2st)
    slides = []
    for s in ("C2", "C3"):
        with Image.open(read_section(root, s).uns["image_path"]) as im:
            size = (im.width // SHRINK, im.height // SHRINK)
            im.draft("RGB", size)  # the JPEG decoded at a reduced scale: fast
            im.convert("RGB").resize(size, Image.Resampling.BOX).save(d / f"{s}.png")
        slides.append(d / f"{s}.png")
    src = read_section(root, "C2").uns["image_path"]
    (d / "broken.jpg").write_bytes(open(src, "rb").read(4096))  # a truncated JPEG
    slides.append(d / "broken.jpg")
    manifest = d / "slides.csv"
    pd.DataFrame({"slide": [p.name for p in slides], "mpp": mpp}).to_csv(manifest, index=False)
    return {"ck": ck, "bank": bank, "slides": slides, "manifest": manifest, "mpp": mpp, "dir": d}


@pytest.fixture(scope="module")
def local_runs(cohort):
    """``mclx infer`` of each slide alone (in process): predictions and seconds."""
    d = cohort["dir"] / "local"
    d.mkdir()
    out, t0 = {}, time.perf_counter()
    for slide in cohort["slides"]:
        res = run_cli(
            _Capsys(),
            ["infer", slide, "--bank", cohort["bank"], "--mpp", cohort["mpp"], "-q",
             "--stride", 112, "--out", d / f"{slide.stem}.h5ad"],
        )  # fmt: skip
        out[slide.stem] = res
    out["seconds"] = time.perf_counter() - t0
    return out


class _Capsys:
    """Stand-in for pytest's capsys in module fixtures: the CLI's output to the console."""

    def readouterr(self):
        return "", ""


@needs("ray")
def test_ray_cohort_matches_local_runs_reports_the_corrupt_slide_and_skips_done_ones(
    ray_session, cohort, local_runs, capsys, tmp_path
):
    out_dir = tmp_path / "preds"
    args = ["infer", "--manifest", cohort["manifest"], "--bank", cohort["bank"],
            "--out-dir", out_dir, "--engine", "ray", "--batch-size", 16,
            "--stride", 112]  # fmt: skip
    t0 = time.perf_counter()
    res = run_cli(capsys, args)
    ray_s = time.perf_counter() - t0
    with capsys.disabled():
        print(f"\nray cohort {ray_s:.1f} s; three local runs {local_runs['seconds']:.1f} s")
    assert res.returncode == 1, res
    assert_one_line_error(res, "1 of 3 slides failed", "broken.jpg", "summary.csv")
    summary = pd.read_csv(out_dir / "summary.csv", keep_default_na=False)
    assert summary["status"].tolist() == ["done", "done", "failed"]
    assert "broken.jpg" in summary["error"][2]
    assert not (out_dir / "broken.pred.h5ad").exists()
    assert sorted(p.name for p in out_dir.iterdir()) == [
        ".mclx-manifest.json",  # what mclx wrote there: a rerun may replace only that
        "C2.pred.h5ad",
        "C3.pred.h5ad",
        "summary.csv",
    ]  # fmt: skip: no temporary file left
    listed = json.loads((out_dir / ".mclx-manifest.json").read_text())["files"]
    assert sorted(listed) == ["C2.pred.h5ad", "C3.pred.h5ad", "summary.csv"]
    for stem in ("C2", "C3"):
        local = ad.read_h5ad(cohort["dir"] / "local" / f"{stem}.h5ad")
        got = ad.read_h5ad(out_dir / f"{stem}.pred.h5ad")
        assert local.n_obs > 30 and got.n_obs == local.n_obs
        assert summary.set_index("slide").loc[str(cohort["dir"] / f"{stem}.png"), "tiles"] == (
            local.n_obs
        )
        np.testing.assert_array_equal(got.obsm["spatial"], local.obsm["spatial"])
        assert list(got.obs_names) == list(local.obs_names)
        assert list(got.var_names) == list(local.var_names)
        np.testing.assert_allclose(got.X, local.X, rtol=1e-5, atol=1e-6)
        lib = got.uns["spatial"][stem]
        np.testing.assert_array_equal(
            lib["images"]["hires"], local.uns["spatial"][stem]["images"]["hires"]
        )  # noqa: E501
        u, v = got.uns["mclx"], local.uns["mclx"]
        assert u["engine"] == "ray"
        for key in ("checkpoint_fingerprint", "bank_fingerprint", "k", "distance", "slide",
                    "tiles", "tile_size_level0", "slide_mpp"):  # fmt: skip
            assert u[key] == v[key], key
    # the local engine agrees with Ray on what a slide is: the corrupt one fails locally too
    assert local_runs["broken"].returncode == 1
    # a second run skips the done slides (and tries the failed one again)
    before = {p: p.stat().st_mtime_ns for p in out_dir.glob("*.h5ad")}
    res = run_cli(capsys, args)
    summary = pd.read_csv(out_dir / "summary.csv", keep_default_na=False)
    assert summary["status"].tolist() == ["skipped", "skipped", "failed"], res.stdout
    assert {p: p.stat().st_mtime_ns for p in out_dir.glob("*.h5ad")} == before
    assert "2 slide(s) already done, skipped" in res.stdout


def test_local_cohort_writes_what_infer_writes_and_force_redoes(cohort, local_runs, capsys,
                                                                tmp_path):  # fmt: skip
    """The local engine (one slide with --out-dir): the one-slide run's predictions;
    --force redoes a slide that is done."""
    out_dir = tmp_path / "preds"
    slides = cohort["slides"][:1]
    args = ["infer", *slides, "--bank", cohort["bank"], "--mpp", cohort["mpp"],
            "--stride", 112, "--out-dir", out_dir]  # fmt: skip
    res = run_cli(capsys, args)
    assert res.returncode == 0, res.stderr
    got = ad.read_h5ad(out_dir / "C2.pred.h5ad")
    assert got.uns["mclx"]["engine"] == "local"
    np.testing.assert_array_equal(got.X, ad.read_h5ad(cohort["dir"] / "local" / "C2.h5ad").X)
    before = (out_dir / "C2.pred.h5ad").stat().st_mtime_ns
    res = run_cli(capsys, [*args, "--force"])
    assert res.returncode == 0
    assert (out_dir / "C2.pred.h5ad").stat().st_mtime_ns != before
    assert pd.read_csv(out_dir / "summary.csv")["status"].tolist() == ["done"]


def test_engine_ray_without_ray_is_one_line_naming_the_extra(cohort, capsys, monkeypatch, tmp_path):  # noqa: E501
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    res = run_cli(capsys, ["infer", cohort["slides"][0], "--bank", cohort["bank"],
                           "--out-dir", tmp_path, "--engine", "ray"])  # fmt: skip
    assert_one_line_error(res, "mclx[ray]")
    assert list(tmp_path.iterdir()) == []


def test_cohort_refuses_one_slide_options_and_bad_manifests(cohort, capsys, tmp_path):
    res = run_cli(capsys, ["infer", *cohort["slides"][:2], "--bank", cohort["bank"],
                           "--out-dir", tmp_path, "--out", tmp_path / "x.h5ad"])  # fmt: skip
    assert_one_line_error(res, "--out", "--manifest")
    res = run_cli(capsys, ["infer", *cohort["slides"][:2], "--bank", cohort["bank"],
                           "--out-dir", tmp_path, "--engine", "ray", "--resume"])  # fmt: skip
    assert_one_line_error(res, "--resume", "local cohorts")
    bad = tmp_path / "m.csv"
    bad.write_text("path\nC2.png\n")
    res = run_cli(capsys, ["infer", "--manifest", bad, "--bank", cohort["bank"],
                           "--out-dir", tmp_path])  # fmt: skip
    assert_one_line_error(res, "m.csv", "no 'slide' column")


def test_local_cohort_resumes_and_writes_every_output_as_one_slide_does(
    cohort, local_runs, capsys, tmp_path, monkeypatch
):
    """Cohorts run through the one-slide engine: a stopped cohort continues from each
    slide's saved predictions with --resume (bit for bit the one-slide run), and writes
    --plot maps, --geojson and --spatialdata per slide."""
    import json

    import mclx.wsi.runtime as runtime

    out_dir = tmp_path / "preds"
    args = ["infer", cohort["slides"][0], "--bank", cohort["bank"], "--mpp", cohort["mpp"],
            "--stride", 112, "--out-dir", out_dir, "--save-every", 1, "--batch-size", 8,
            "-q"]  # fmt: skip
    ref = [a if a != out_dir else tmp_path / "ref" for a in args]  # uninterrupted
    assert run_cli(capsys, ref).returncode == 0
    real = runtime.predictions

    def stop(*args, **kw):  # Ctrl-C once every tile is predicted and saved
        raise KeyboardInterrupt

    monkeypatch.setattr(runtime, "predictions", stop)
    res = run_cli(capsys, args)
    assert res.returncode == 130, res.stderr
    state = out_dir / "C2.pred.h5ad.state"
    assert state.exists() and not (out_dir / "C2.pred.h5ad").exists()
    monkeypatch.setattr(runtime, "predictions", real)
    extra = ["--resume", "--plot", "GENE001", "--geojson", tmp_path / "gj"]
    if with_sdata := _installed("spatialdata"):
        extra += ["--spatialdata", tmp_path / "sd"]
    res = run_cli(capsys, [*args, *extra])
    assert res.returncode == 0, res.stderr
    got = ad.read_h5ad(out_dir / "C2.pred.h5ad")
    assert got.uns["mclx"]["resumed_from_tile"] > 0
    np.testing.assert_array_equal(got.X, ad.read_h5ad(tmp_path / "ref" / "C2.pred.h5ad").X)
    assert not state.exists()
    assert (out_dir / "C2.pred.GENE001.png").stat().st_size > 0
    features = json.loads((tmp_path / "gj" / "C2.geojson").read_text())["features"]
    assert len(features) == got.n_obs
    if with_sdata:
        assert (tmp_path / "sd" / "C2.zarr").is_dir()


def test_one_slide_and_a_two_slide_cohort_predict_the_same(cohort, local_runs, capsys, tmp_path):
    """The same slide through `mclx infer SLIDE` and through a two-slide local cohort."""
    out_dir = tmp_path / "preds"
    args = ["infer", *cohort["slides"][:2], "--bank", cohort["bank"], "--mpp", cohort["mpp"],
            "--stride", 112, "--out-dir", out_dir, "-q"]  # fmt: skip
    res = run_cli(capsys, args)
    assert res.returncode == 0, res.stderr
    for stem in ("C2", "C3"):
        one = ad.read_h5ad(cohort["dir"] / "local" / f"{stem}.h5ad")
        got = ad.read_h5ad(out_dir / f"{stem}.pred.h5ad")
        np.testing.assert_array_equal(got.X, one.X)
        np.testing.assert_array_equal(got.obsm["spatial"], one.obsm["spatial"])
        np.testing.assert_array_equal(
            got.uns["spatial"][stem]["images"]["hires"], one.uns["spatial"][stem]["images"]["hires"]
        )


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None
