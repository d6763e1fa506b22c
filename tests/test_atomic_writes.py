"""Atomic outputs (SPEC 8): every writer goes through a temporary file and a rename, so a
write that fails (here: the file size limit, as on a full disk) raises one ``OSError``
naming the destination, leaves no temporary file, and keeps the previous output's bytes."""

from __future__ import annotations

import contextlib
import json
import resource
import signal

import numpy as np
import pytest
from helpers import tiny_model

from mclx.files import all_or_nothing, atomic_path, undone_on_failure, write_text_atomic

PREVIOUS = b"previous good output\n"


@contextlib.contextmanager
def file_size_limit(nbytes: int):
    """Writes past ``nbytes`` fail with EFBIG in this process (SIGXFSZ ignored)."""
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, old_handler)


def listing(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def artifacts(synthetic, tmp_path_factory):
    """A checkpoint, its bank and predictions for S1, built in-process (no training)."""
    import anndata as ad
    import pandas as pd

    from mclx.bank import build_bank
    from mclx.checkpoint import load_checkpoint
    from mclx.export.onnx_export import export_onnx

    d = tmp_path_factory.mktemp("atomic")
    tiny = tiny_model(synthetic, train=False)
    net, pre, adatas = tiny.net, tiny.pre, tiny.adatas
    tiny.save(d / "m.pt")
    ck = load_checkpoint(d / "m.pt")
    bank = build_bank(d / "m.pt", synthetic, sections=["S1"])
    s1 = adatas["S1"]
    pred = ad.AnnData(
        X=np.asarray(bank.expressions),
        obs=pd.DataFrame(index=pd.Index(s1.obs_names, dtype=str)),
        var=pd.DataFrame(index=pd.Index(bank.genes, dtype=str)),
    )
    pred.obsm["spatial"] = np.asarray(s1.obsm["spatial"])
    pred.uns["mclx"] = {"tile_size_level0": 224, "timings": {"read": 0.0}}
    return {
        "net": net,
        "pre": pre,
        "ck": ck,
        "onnx": export_onnx(ck, d / "m.onnx"),
        "bank": bank,
        "pred": pred,
        "image": s1.uns["image_path"],
    }


def _checkpoint(a, path):
    from mclx.checkpoint import save_checkpoint

    save_checkpoint(path, a["net"], preprocess=a["pre"])


def _bank(a, path):
    from mclx.bank import save_bank

    save_bank(a["bank"], path)


def _predictions(a, path):
    from mclx.wsi.writer import write_predictions

    write_predictions(a["pred"], path)


def _plot(a, path):
    from mclx.wsi.writer import plot_genes

    plot_genes(a["pred"], a["image"], ["GENE001"], path.parent / path.name.split(".")[0])


def _geojson(a, path):
    from mclx.wsi.geojson import write_geojson

    write_geojson(a["pred"], path)


def _onnx(a, path):
    from mclx.export.onnx_export import export_onnx

    export_onnx(a["ck"], path)


def _int8(a, path):
    from mclx.export.onnx_export import quantize_int8

    calib = np.random.default_rng(0).random((4, 3, 224, 224), dtype=np.float32)
    quantize_int8(a["onnx"], path, calib)


def _tiff(a, path):
    from mclx.data.slide import write_pyramidal_tiff

    img = np.random.default_rng(0).integers(0, 255, (600, 600, 3), dtype=np.uint8)
    write_pyramidal_tiff(img, path, mpp=0.5)


def _results(a, path):
    from mclx.evaluation.evaluate import write_results

    write_results(_result(n_genes=2000), path.with_name("r.json"))  # path: r.genes.csv


def _text(a, path):
    write_text_atomic(path, json.dumps({"numbers": list(range(5000))}))


def _result(n_genes: int) -> dict:
    row = {"pcc_acg": 0.5, "pcc_heg": 0.6, "mse": 0.1, "mae": 0.2}
    genes = {"S1": {f"GENE{i:05d}": 0.123456789 for i in range(n_genes)}}
    return {"sections": {"S1": row}, "mean": row, "std": row, "config": {}, "genes": genes}


WRITERS = {
    "checkpoint": (_checkpoint, "m.pt"),
    "bank": (_bank, "b.npz"),
    "predictions-h5ad": (_predictions, "p.h5ad"),
    "plot-png": (_plot, "p.GENE001.png"),
    "qupath-geojson": (_geojson, "p.geojson"),
    "onnx": (_onnx, "m.onnx"),
    "onnx-int8": (_int8, "m.int8.onnx"),
    "pyramidal-tiff": (_tiff, "s.tif"),
    "evaluation-csv": (_results, "r.genes.csv"),
    "json-text": (_text, "r.json"),
}


@pytest.mark.parametrize("name", list(WRITERS))
def test_a_failed_write_keeps_the_previous_output(name, artifacts, tmp_path):
    write, target = WRITERS[name]
    out = tmp_path / "out"
    out.mkdir()
    dest = out / target
    dest.write_bytes(PREVIOUS)
    before = listing(out)
    with file_size_limit(4096), pytest.raises(OSError, match=f"{dest.name}: cannot write it"):
        write(artifacts, dest)
    assert listing(out) == before  # same bytes, no temporary file
    write(artifacts, dest)  # and without the limit the same writer succeeds
    assert dest.read_bytes() != PREVIOUS
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


def test_evaluation_writes_both_files_or_neither(tmp_path):
    from mclx.evaluation.evaluate import write_results

    out = tmp_path / "r.json"
    with file_size_limit(4096), pytest.raises(OSError, match="r.genes.csv"):
        write_results(_result(n_genes=2000), out)  # JSON fits, the CSV does not
    assert list(tmp_path.iterdir()) == []
    json_path, csv_path = write_results(_result(n_genes=3), out)
    assert json.loads(json_path.read_text())["sections"]["S1"]["mse"] == 0.1
    assert csv_path.read_text().startswith("gene,S1")


def test_all_or_nothing_discards_every_output_of_a_failed_block(tmp_path):
    (tmp_path / "a.txt").write_bytes(PREVIOUS)
    with pytest.raises(RuntimeError, match="later step"), all_or_nothing():
        write_text_atomic(tmp_path / "a.txt", "new a")
        with atomic_path(tmp_path / "b.png") as tmp:
            tmp.write_bytes(b"png")
        assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["a.txt"]
        raise RuntimeError("a later step failed")
    assert listing(tmp_path) == {"a.txt": PREVIOUS}
    with all_or_nothing():
        write_text_atomic(tmp_path / "a.txt", "new a")
        write_text_atomic(tmp_path / "b.txt", "new b")
    assert listing(tmp_path) == {"a.txt": b"new a", "b.txt": b"new b"}


def test_undone_on_failure_puts_back_what_was_there(tmp_path):
    """Outputs put in place one by one (later ones made from earlier ones): a failure
    restores what they replaced and removes what they added; a success keeps them all,
    with nothing kept aside left behind."""
    (tmp_path / "a.txt").write_bytes(PREVIOUS)
    (tmp_path / "c.txt").write_bytes(PREVIOUS)  # not written by the block: left alone
    paths = [tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "c.txt"]
    with pytest.raises(RuntimeError, match="later step"), undone_on_failure(paths):
        write_text_atomic(tmp_path / "a.txt", "new a")
        write_text_atomic(tmp_path / "b.txt", "new b")
        raise RuntimeError("a later step failed")
    assert listing(tmp_path) == {"a.txt": PREVIOUS, "c.txt": PREVIOUS}
    with undone_on_failure(paths):
        write_text_atomic(tmp_path / "a.txt", "new a")
        write_text_atomic(tmp_path / "b.txt", "new b")
    assert listing(tmp_path) == {"a.txt": b"new a", "b.txt": b"new b", "c.txt": PREVIOUS}


def test_unwritable_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="output folder .* does not exist"):
        write_text_atomic(tmp_path / "missing" / "r.json", "{}")


def test_a_folder_output_replaces_the_previous_one_whole_or_not_at_all(tmp_path):
    from mclx.files import atomic_folder
    from mclx.folders import MANIFEST

    dest = tmp_path / "view"
    with atomic_folder(dest) as tmp:  # a folder mclx wrote (its manifest lists old.txt)
        (tmp / "old.txt").write_bytes(PREVIOUS)
    manifest = (dest / MANIFEST).read_bytes()
    with pytest.raises(RuntimeError, match="later step"), all_or_nothing():
        with atomic_folder(dest) as tmp:
            (tmp / "new.txt").write_text("new")
        write_text_atomic(tmp_path / "a.txt", "new a")
        raise RuntimeError("a later step failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["view"]  # no temporary folder
    assert listing(dest) == {MANIFEST: manifest, "old.txt": PREVIOUS}
    with atomic_folder(dest) as tmp:
        (tmp / "new.txt").write_text("new")
    assert listing(dest).keys() == {MANIFEST, "new.txt"} and (dest / "new.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["view"]  # the old one removed
