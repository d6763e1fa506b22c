"""The bad-input catalogue (SPEC 8): every command, run as a user runs it, on bad files.

Each case builds one bad input in its own folder, runs one ``mclx`` command in a
subprocess and checks that

- it fails with exactly one stderr line ``mclx: error: ...`` naming the file (or the
  option) and the problem, a non-zero exit and no traceback;
- its output folder is unchanged: no partial output, no temporary file, and outputs that
  existed before keep their bytes (every case that writes pre-creates its output).

Cases are registered with ``@case(id, *needles)``; the catalogue is ``CASES``. Full-disk
cases use ``RLIMIT_FSIZE`` (writes fail with EFBIG, SIGXFSZ ignored), and a small tmpfs
where this process may mount one (ENOSPC); read-only cases drop CAP_DAC_OVERRIDE when
run as root, so that a mode-555 folder is really read-only.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import gzip
import os
import resource
import shutil
import signal
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_one_line_error, mclx, tiny_model, tiny_train_args

from mclx.bank import FORMAT_VERSION as BANK_VERSION
from mclx.checkpoint import FORMAT_VERSION as CKPT_VERSION

PREVIOUS = b"previous good output\n"  # bytes of outputs that existed before a failing run
FSIZE_LIMIT = 8 * 1024  # bytes: every output below is larger


@dataclass
class Env:
    """Good artifacts shared by every case (built once per module)."""

    data: Path  # synthetic her2st folder
    ck: Path  # checkpoint (tiny CNN, untrained: only its format matters here)
    other: Path  # another checkpoint (other fingerprint, same genes)
    bank: Path  # bank of ck over S1, S2 and S4
    onnx: Path  # ck's image encoder as ONNX (beside ck)
    other_onnx: Path

    @property
    def root(self) -> Path:
        return self.data / "data"

    @property
    def image(self) -> Path:
        return self.root / "ST-imgs" / "S" / "S1" / "S1.jpg"

    @property
    def spots(self) -> Path:
        return self.root / "ST-spotfiles" / "S1_selection.tsv"

    @property
    def genes(self) -> Path:
        return self.data / "genes.txt"

    def counts_text(self, section: str = "S1") -> str:
        with gzip.open(self.root / "ST-cnts" / f"{section}.tsv.gz", "rt") as fh:
            return fh.read()

    def her2st(self, work: Path, changes: dict[str, bytes | str | None] | None = None) -> Path:
        """A her2st folder with section S1 (and S2) linked from the good one, then
        ``changes``: path under data/ -> new content, or None to remove the file."""
        top = work / "her2st"
        for sec in ("S1", "S2"):
            for rel in (
                f"ST-cnts/{sec}.tsv.gz",
                f"ST-spotfiles/{sec}_selection.tsv",
                f"ST-imgs/S/{sec}/{sec}.jpg",
            ):
                dst = top / "data" / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.symlink_to(self.root / rel)
        for rel, content in (changes or {}).items():
            dst = top / "data" / rel
            dst.unlink(missing_ok=True)
            if content is not None:
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_bytes(content.encode() if isinstance(content, str) else content)
        return top


@pytest.fixture(scope="module")
def env(synthetic, tmp_path_factory) -> Env:
    from mclx.bank import build_bank, save_bank
    from mclx.checkpoint import load_checkpoint
    from mclx.export.onnx_export import export_onnx

    d = tmp_path_factory.mktemp("bad_inputs_env")
    paths = {}
    for name, seed in (("m", 0), ("other", 7)):  # untrained: only the formats matter
        paths[name] = tiny_model(synthetic, train=False, seed=seed).save(d / f"{name}.pt")
        export_onnx(load_checkpoint(paths[name]), d / f"{name}.onnx")
    bank = save_bank(build_bank(paths["m"], synthetic, sections=["S1", "S2", "S4"]), d / "bank.npz")
    return Env(synthetic, paths["m"], paths["other"], bank, d / "m.onnx", d / "other.onnx")


# --------------------------------------------------------------------------- harness


@dataclass(frozen=True)
class Case:
    id: str
    make: Callable[[Env, Path, Path], list]  # (env, work folder, output folder) -> argv
    needles: tuple[str, ...]
    # "fsize": ulimit -f; "tmpfs": output on a nearly full tmpfs; "readonly": output folder
    # mode 555; "nocaps": root without CAP_DAC_OVERRIDE (file modes apply, as for users)
    limit: str | None = None


CASES: list[Case] = []


def case(id: str, *needles: str, limit: str | None = None):
    def register(make):
        CASES.append(Case(id, make, needles, limit))
        return make

    return register


def previous(path: Path) -> Path:
    """An output that existed before the run: it must keep these bytes."""
    path.write_bytes(PREVIOUS)
    return path


def bank_build(e: Env, o: Path, *, data: Path | None = None, ckpt=None, sections="S1"):
    out = previous(o / "b.npz")
    return ["bank", "build", "--ckpt", ckpt or e.ck, "--data", data or e.data,
            "--sections", sections, "--out", out, "-q"]  # fmt: skip


def train(e: Env, o: Path, data: Path, *extra):
    out = previous(o / "m.pt")
    return tiny_train_args(data, out, *extra, sections="S1", epochs=1, genes_file=e.genes)


def infer(e: Env, o: Path, slide=None, *extra, bank=None, spots=True):
    out = previous(o / "p.h5ad")
    args = ["infer", slide or e.image, "--bank", bank or e.bank, "--out", out, "-q", *extra]
    return args + (["--spots", e.spots] if spots is True else [])


def evaluate(e: Env, o: Path, *extra, ckpt=None, bank=None):
    out = previous(o / "r.json")
    return ["evaluate", "--data", e.data, "--ckpt", ckpt or e.ck, "--bank", bank or e.bank,
            "--sections", "S3", "--out", out, *extra]  # fmt: skip


def export(ckpt: Path, *extra):
    """``mclx export``: its outputs go beside ``ckpt`` (keep it in the output folder)."""
    return ["export", "--ckpt", ckpt, "-q", *extra]


def copy(src: Path, dst: Path) -> Path:
    shutil.copyfile(src, dst)
    return dst


def text(path: Path, content: str = "this is not what you think\n") -> Path:
    path.write_text(content)
    return path


def flip(data: bytes, start: int, n: int = 64) -> bytes:
    return data[:start] + bytes(b ^ 0xFF for b in data[start : start + n]) + data[start + n :]


def set_cell(tsv: str, row: int, col: int, value: str) -> str:
    """``tsv`` with the cell at data row ``row``, column ``col`` (0 = index) replaced."""
    lines = tsv.splitlines()
    cells = lines[row + 1].split("\t")
    cells[col] = value
    lines[row + 1] = "\t".join(cells)
    return "\n".join(lines) + "\n"


def rewrite_bank(src: Path, dst: Path, **changes) -> Path:
    with np.load(src) as z:
        arrays = {k: z[k] for k in z.files}
    np.savez(dst, **(arrays | changes))
    return dst


def rewrite_ckpt(src: Path, dst: Path, **changes) -> Path:
    import torch

    payload = torch.load(src, weights_only=True)
    torch.save(payload | changes, dst)
    return dst


# --------------------------------------------------------------------------- data folders


@case("data-folder-missing", "nowhere", "does not exist")
def _(e, w, o):
    return bank_build(e, o, data=w / "nowhere")


@case("unknown-section", "Q7", "does not exist", "known: S1, S2")
def _(e, w, o):
    return bank_build(e, o, data=e.her2st(w), sections="S1,Q7")


@case("data-folder-of-no-layout", "plain", "no known data layout", "her2st: ST-cnts/", "hest: st/")
def _(e, w, o):
    (w / "plain").mkdir()
    return bank_build(e, o, data=w / "plain")


# --------------------------------------------------------------------------- counts TSV


@case("counts-empty", "S1.tsv", "cannot read counts table")
def _(e, w, o):
    return bank_build(e, o, data=e.her2st(w, {"ST-cnts/S1.tsv.gz": None, "ST-cnts/S1.tsv": ""}))


@case("counts-truncated-gzip", "S1.tsv.gz", "cannot read counts table")
def _(e, w, o):
    raw = (e.root / "ST-cnts" / "S1.tsv.gz").read_bytes()
    return bank_build(e, o, data=e.her2st(w, {"ST-cnts/S1.tsv.gz": raw[: len(raw) // 2]}))


@case("counts-corrupt-gzip", "S1.tsv.gz", "cannot read counts table")
def _(e, w, o):
    raw = (e.root / "ST-cnts" / "S1.tsv.gz").read_bytes()
    return bank_build(e, o, data=e.her2st(w, {"ST-cnts/S1.tsv.gz": flip(raw, 200)}))


@case("counts-unreadable", "S1.tsv.gz", "Permission denied", limit="nocaps")
def _(e, w, o):
    raw = (e.root / "ST-cnts" / "S1.tsv.gz").read_bytes()
    data = e.her2st(w, {"ST-cnts/S1.tsv.gz": raw})
    (data / "data" / "ST-cnts" / "S1.tsv.gz").chmod(0)
    return bank_build(e, o, data=data)


@case("counts-nan", "S1.tsv", "NaN", "spot 1x4, gene GENE001")
def _(e, w, o):
    bad = set_cell(e.counts_text(), 3, 2, "nan")
    return bank_build(e, o, data=e.her2st(w, {"ST-cnts/S1.tsv.gz": None, "ST-cnts/S1.tsv": bad}))


@case("counts-inf", "S1.tsv", "infinite")
def _(e, w, o):
    bad = set_cell(e.counts_text(), 5, 7, "inf")
    return bank_build(e, o, data=e.her2st(w, {"ST-cnts/S1.tsv.gz": None, "ST-cnts/S1.tsv": bad}))


@case("counts-negative", "S1.tsv", "negative")
def _(e, w, o):
    bad = set_cell(e.counts_text(), 0, 1, "-3")
    return bank_build(e, o, data=e.her2st(w, {"ST-cnts/S1.tsv.gz": None, "ST-cnts/S1.tsv": bad}))


@case("counts-non-numeric", "S1.tsv", "non-numeric")
def _(e, w, o):
    bad = set_cell(e.counts_text(), 2, 4, "lots")
    return bank_build(e, o, data=e.her2st(w, {"ST-cnts/S1.tsv.gz": None, "ST-cnts/S1.tsv": bad}))


@case("counts-duplicate-spots", "S1.tsv", "duplicate spots", "1x1")
def _(e, w, o):
    bad = set_cell(e.counts_text(), 1, 0, "1x1")
    return bank_build(e, o, data=e.her2st(w, {"ST-cnts/S1.tsv.gz": None, "ST-cnts/S1.tsv": bad}))


@case("counts-no-gene-in-common", "S1.tsv", "40 of 40 genes are missing")
def _(e, w, o):
    lines = e.counts_text().splitlines()
    lines[0] = lines[0].replace("GENE", "OTHER")
    bad = "\n".join(lines) + "\n"
    return bank_build(e, o, data=e.her2st(w, {"ST-cnts/S1.tsv.gz": None, "ST-cnts/S1.tsv": bad}))


@case("counts-no-spot-in-common", "S1.tsv", "no spot in common", "S1_selection.tsv")
def _(e, w, o):
    lines = e.counts_text().splitlines()
    lines[1:] = ["q" + ln for ln in lines[1:]]
    bad = "\n".join(lines) + "\n"
    return bank_build(e, o, data=e.her2st(w, {"ST-cnts/S1.tsv.gz": None, "ST-cnts/S1.tsv": bad}))


@case("gene-list-corrupt", "genes.npy", "cannot read gene list")
def _(e, w, o):
    np.save(w / "genes.npy", np.array([f"GENE{i:03d}" for i in range(40)]))
    raw = (w / "genes.npy").read_bytes()
    (w / "genes.npy").write_bytes(raw[:100])
    return train(e, o, e.data, "--genes", w / "genes.npy")


# --------------------------------------------------------------------------- spot files


@case("spots-missing", "S1_selection.tsv", "does not exist")
def _(e, w, o):
    return bank_build(e, o, data=e.her2st(w, {"ST-spotfiles/S1_selection.tsv": None}))


@case("spots-empty", "S1_selection.tsv", "cannot read spot file")
def _(e, w, o):
    return bank_build(e, o, data=e.her2st(w, {"ST-spotfiles/S1_selection.tsv": ""}))


@case("spots-missing-column", "S1_selection.tsv", "lacks columns", "pixel_y")
def _(e, w, o):
    bad = e.spots.read_text().replace("pixel_y", "pixel_why", 1)
    return bank_build(e, o, data=e.her2st(w, {"ST-spotfiles/S1_selection.tsv": bad}))


@case("spots-non-numeric", "S1_selection.tsv", "non-numeric coordinates", "line 4")
def _(e, w, o):
    bad = set_cell(e.spots.read_text(), 2, 4, "left")
    return bank_build(e, o, data=e.her2st(w, {"ST-spotfiles/S1_selection.tsv": bad}))


@case("spots-duplicate", "S1_selection.tsv", "duplicate spots")
def _(e, w, o):
    lines = e.spots.read_text().splitlines()
    bad = "\n".join([*lines, lines[5]]) + "\n"
    return bank_build(e, o, data=e.her2st(w, {"ST-spotfiles/S1_selection.tsv": bad}))


@case("spots-outside-image", "S1.jpg", "outside", "S1_1x1")
def _(e, w, o):
    bad = set_cell(e.spots.read_text(), 0, 4, "99999")
    return train(e, o, e.her2st(w, {"ST-spotfiles/S1_selection.tsv": bad}))


# --------------------------------------------------------------------------- training images


@case("image-truncated", "S1.jpg", "truncated or corrupt image")
def _(e, w, o):
    raw = e.image.read_bytes()
    return train(e, o, e.her2st(w, {"ST-imgs/S/S1/S1.jpg": raw[: len(raw) // 3]}))


@case("image-not-an-image", "S1.jpg", "not an image", "text file")
def _(e, w, o):
    return train(e, o, e.her2st(w, {"ST-imgs/S/S1/S1.jpg": "an H&E image, honestly\n"}))


@case("image-empty", "S1.jpg", "empty (0 bytes)")
def _(e, w, o):
    return train(e, o, e.her2st(w, {"ST-imgs/S/S1/S1.jpg": b""}))


# --------------------------------------------------------------------------- slides (infer)


@case("slide-missing", "missing.svs", "does not exist")
def _(e, w, o):
    return infer(e, o, w / "missing.svs", spots=False)


@case("slide-empty", "empty.jpg", "empty (0 bytes)")
def _(e, w, o):
    (w / "empty.jpg").write_bytes(b"")
    return infer(e, o, w / "empty.jpg")


@case("slide-text-as-svs", "notes.svs", "neither OpenSlide nor PIL can read it", "text file")
def _(e, w, o):
    return infer(e, o, text(w / "notes.svs"), spots=False)


@case("slide-text-as-png", "notes.png", "neither OpenSlide nor PIL can read it")
def _(e, w, o):
    return infer(e, o, text(w / "notes.png"))


@case("slide-truncated-jpeg", "trunc.jpg", "truncated or corrupt image")
def _(e, w, o):
    (w / "trunc.jpg").write_bytes(e.image.read_bytes()[:3000])
    return infer(e, o, w / "trunc.jpg")


@case("slide-truncated-tiff", "trunc.tif")
def _(e, w, o):
    from mclx.data.slide import load_image, write_pyramidal_tiff

    tif = write_pyramidal_tiff(load_image(e.image)[:1024, :1024], w / "t.tif", mpp=0.9, tile=256)
    raw = tif.read_bytes()
    (w / "trunc.tif").write_bytes(raw[: len(raw) // 3])
    return infer(e, o, w / "trunc.tif", spots=False)


@case("slide-unreadable", "secret.jpg", "is not readable", limit="nocaps")
def _(e, w, o):
    copy(e.image, w / "secret.jpg").chmod(0)
    return infer(e, o, w / "secret.jpg")


@case("slide-is-a-folder", "folder.svs", "none of its 0 files is DICOM")
def _(e, w, o):
    (w / "folder.svs").mkdir()
    return infer(e, o, w / "folder.svs", spots=False)


@case("slide-without-tissue", "blank.png", "no tissue")
def _(e, w, o):
    from PIL import Image

    Image.fromarray(np.full((1200, 1200, 3), 243, np.uint8)).save(w / "blank.png")
    return infer(e, o, w / "blank.png", "--mpp", "1.0", spots=False)


def dpi_image(path: Path, e: Env, dpi: float, **kw) -> Path:
    """The synthetic slide saved with a screen/print density in its header."""
    from PIL import Image

    Image.open(e.image).save(path, dpi=(dpi, dpi), **kw)
    return path


@case("slide-tiff-72-dpi", "s72.tif", "µm/px unknown", "72 dpi = 352.8 µm/px", "--mpp")
def _(e, w, o):
    return infer(e, o, dpi_image(w / "s72.tif", e, 72), spots=False)


@case("slide-png-96-dpi", "s96.png", "µm/px unknown", "96 dpi", "--mpp")
def _(e, w, o):
    return infer(e, o, dpi_image(w / "s96.png", e, 96), spots=False)


@case("slide-tiff-300-dpi-pyramid", "s300.tif", "300 dpi", "--mpp")
def _(e, w, o):
    from mclx.data.slide import load_image, write_pyramidal_tiff

    tif = write_pyramidal_tiff(load_image(e.image), w / "s300.tif", mpp=25400 / 300, tile=256)
    return infer(e, o, tif, spots=False)


@case("slide-mpp-absurd", "S1.jpg", "resampled", "x up", "--mpp")
def _(e, w, o):
    return infer(e, o, None, "--mpp", "352.8", spots=False)


@case("slide-more-tiles-than-max", "S1.jpg", "more than --max-tiles 5 tiles", "grid places")
def _(e, w, o):
    return infer(e, o, None, "--mpp", "0.9", "--max-tiles", "5", spots=False)


@case("spots-more-than-max-tiles", "--max-tiles 5")
def _(e, w, o):
    return infer(e, o, None, "--max-tiles", "5")


@case("slide-openslide-unopenable", "unopenable.tiff", "OpenSlide cannot read it")
def _(e, w, o):
    return infer(e, o, fixture_slide(w, "unopenable.tiff"), "--mpp", "0.5", spots=False)


@case("slide-openslide-corrupt-pixels", "unreadable.svs", "cannot read")
def _(e, w, o):
    return infer(e, o, fixture_slide(w, "unreadable.svs"), spots=False)


def fixture_slide(w: Path, name: str) -> Path:
    """One of OpenSlide's test slides (../shared/data/slide-fixtures), copied to ``w``."""
    from helpers.data import ROOT

    src = ROOT.parent / "shared" / "data" / "slide-fixtures" / name
    if not src.is_file():
        pytest.skip(f"needs OpenSlide's test slides: {src} not found")
    return copy(src, w / name)


@case("plot-gene-not-in-bank", "--plot", "NOPE", "bank.npz")
def _(e, w, o):
    return infer(e, o, None, "--plot", "NOPE")


# --------------------------------------------------------------------------- spots (infer)


@case("infer-spots-outside-slide", "far.csv", "outside", "S1.jpg")
def _(e, w, o):
    text(w / "far.csv", "x,y\n100,100\n99999,5\n")
    return infer(e, o, None, "--spots", w / "far.csv", "--mpp", "0.9", spots=False)


@case("infer-spots-missing", "nope.csv", "does not exist")
def _(e, w, o):
    return infer(e, o, None, "--spots", w / "nope.csv", spots=False)


@case("infer-spots-not-numbers", "abc.csv", "not numbers")
def _(e, w, o):
    text(w / "abc.csv", "x,y\n100,100\nleft,5\n")
    return infer(e, o, None, "--spots", w / "abc.csv", "--mpp", "0.9", spots=False)


@case("infer-spots-no-columns", "cols.csv", "not a spot file")
def _(e, w, o):
    text(w / "cols.csv", "a,b,c\n1,2,3\n")
    return infer(e, o, None, "--spots", w / "cols.csv", spots=False)


# --------------------------------------------------------------------------- checkpoints


@case("ckpt-missing", "missing.pt", "does not exist")
def _(e, w, o):
    return bank_build(e, o, ckpt=w / "missing.pt")


@case("ckpt-empty", "empty.pt", "empty (0 bytes)")
def _(e, w, o):
    (o / "empty.pt").write_bytes(b"")
    return export(o / "empty.pt")


@case("ckpt-truncated", "trunc.pt", "not a readable mclx checkpoint", "truncated")
def _(e, w, o):
    (o / "trunc.pt").write_bytes(e.ck.read_bytes()[:5000])
    return export(o / "trunc.pt")


@case("ckpt-corrupt-weights", "flipped.pt")
def _(e, w, o):
    raw = e.ck.read_bytes()
    (o / "flipped.pt").write_bytes(flip(raw, len(raw) // 2, 256))
    return export(o / "flipped.pt")


@case("ckpt-newer-format", "newer.pt", f"format version {CKPT_VERSION + 1} is newer")
def _(e, w, o):
    return export(rewrite_ckpt(e.ck, o / "newer.pt", format_version=CKPT_VERSION + 1))


@case("ckpt-not-mclx", "foreign.pt", "not an mclx checkpoint")
def _(e, w, o):
    import torch

    torch.save({"weights": torch.zeros(3)}, o / "foreign.pt")
    return export(o / "foreign.pt")


@case("ckpt-weights-do-not-fit", "mismatch.pt", "does not match its model config")
def _(e, w, o):
    import torch

    payload = torch.load(e.ck, weights_only=True)
    payload["model"]["embed_dim"] = 128
    torch.save(payload, o / "mismatch.pt")
    return export(o / "mismatch.pt")


@case("ckpt-is-a-bank", "bank.npz", "not a readable mclx checkpoint", ".npz archive")
def _(e, w, o):
    return bank_build(e, o, ckpt=e.bank)


@case("ckpt-is-onnx", "m.onnx", "not a readable mclx checkpoint")
def _(e, w, o):  # --onnx elsewhere: the default, m.onnx beside it, is the input (refused)
    return export(copy(e.onnx, o / "m.onnx"), "--onnx", o / "x.onnx")


@case("export-over-its-checkpoint", "m.onnx", "would write over an input", "--ckpt")
def _(e, w, o):
    return export(copy(e.onnx, o / "m.onnx"))


@case("ckpt-is-text", "notes.pt", "text file")
def _(e, w, o):
    return export(text(o / "notes.pt"))


@case("infer-model-missing", "missing.pt", "does not exist")
def _(e, w, o):
    return infer(e, o, None, "--model", w / "missing.pt")


# --------------------------------------------------------------------------- banks


@case("bank-missing", "none.npz", "does not exist")
def _(e, w, o):
    return ["bank", "info", w / "none.npz"]


@case("bank-unreadable", "secret.npz", "is not readable", limit="nocaps")
def _(e, w, o):
    copy(e.bank, w / "secret.npz").chmod(0)
    return ["bank", "info", w / "secret.npz"]


@case("bank-empty-file", "empty.npz", "empty (0 bytes)")
def _(e, w, o):
    (w / "empty.npz").write_bytes(b"")
    return ["bank", "info", w / "empty.npz"]


@case("bank-truncated", "trunc.npz", "truncated or corrupt ZIP")
def _(e, w, o):
    (w / "trunc.npz").write_bytes(e.bank.read_bytes()[:2000])
    return infer(e, o, None, bank=w / "trunc.npz")


@case("bank-is-a-checkpoint", "m.pt", "not an mclx bank")
def _(e, w, o):
    return ["bank", "info", e.ck]


@case("bank-is-text", "notes.npz", "text file")
def _(e, w, o):
    return infer(e, o, None, bank=text(w / "notes.npz"))


@case("bank-newer-format", "newer.npz", f"format version {BANK_VERSION + 1} is newer")
def _(e, w, o):
    newer = rewrite_bank(e.bank, w / "newer.npz", format_version=BANK_VERSION + 1)
    return infer(e, o, None, bank=newer)


@case("bank-without-spots", "nospots.npz", "empty (0 spots)")
def _(e, w, o):
    empty = dict(
        embeddings=np.zeros((0, 256), np.float32),
        expressions=np.zeros((0, 40), np.float32),
        sections=np.array([], str),
        spot_ids=np.array([], str),
        coords=np.zeros((0, 2)),
        positions=np.zeros((0, 2), np.int64),
    )
    return infer(e, o, None, bank=rewrite_bank(e.bank, w / "nospots.npz", **empty))


@case("bank-nan", "nan.npz", "NaN")
def _(e, w, o):
    with np.load(e.bank) as z:
        emb = z["embeddings"].copy()
    emb[3, 7] = np.nan
    return infer(e, o, None, bank=rewrite_bank(e.bank, w / "nan.npz", embeddings=emb))


@case("bank-from-other-checkpoint", "bank.npz", "rebuild the bank")
def _(e, w, o):
    return infer(e, o, None, "--model", e.other)


@case("bank-checkpoint-gone", "moved.npz", "does not exist", "pass --model")
def _(e, w, o):
    return infer(
        e, o, None, bank=rewrite_bank(e.bank, w / "moved.npz", checkpoint=str(w / "gone.pt"))
    )


@case("evaluate-bank-from-other-checkpoint", "bank.npz", "rebuild the bank")
def _(e, w, o):
    return evaluate(e, o, ckpt=e.other)


# --------------------------------------------------------------------------- k


@case("k-zero", "--k", "0 is not in the range")
def _(e, w, o):
    return infer(e, o, None, "--k", "0")


@case("k-larger-than-bank", "bank.npz", "k=100000 is larger than the bank")
def _(e, w, o):
    return infer(e, o, None, "--k", "100000")


@case("evaluate-k-larger-than-bank", "bank.npz", "k=100000 is larger than the bank")
def _(e, w, o):
    return evaluate(e, o, "--k", "100000")


# --------------------------------------------------------------------------- ONNX, engines


@case("onnx-missing", "missing.onnx", "does not exist")
def _(e, w, o):
    return infer(e, o, None, "--model", w / "missing.onnx")


@case("onnx-empty", "empty.onnx", "empty (0 bytes)")
def _(e, w, o):
    (w / "empty.onnx").write_bytes(b"")
    return infer(e, o, None, "--model", w / "empty.onnx")


@case("onnx-truncated", "trunc.onnx", "not a readable ONNX file")
def _(e, w, o):
    (w / "trunc.onnx").write_bytes(e.onnx.read_bytes()[:20000])
    return infer(e, o, None, "--model", w / "trunc.onnx")


@case("onnx-without-mclx-metadata", "foreign.onnx", "no valid mclx metadata")
def _(e, w, o):
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, [None, 3, 224, 224])
    y = helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, [None, 3, 224, 224])
    graph = helper.make_graph(
        [helper.make_node("Identity", ["images"], ["embeddings"])], "g", [x], [y]
    )
    onnx.save(helper.make_model(graph), w / "foreign.onnx")
    return infer(e, o, None, "--model", w / "foreign.onnx")


@case("onnx-broken-graph", "broken.onnx", "ONNX Runtime cannot load the model")
def _(e, w, o):
    import onnx

    proto = onnx.load(e.onnx)
    proto.graph.node[0].op_type = "NoSuchOperator"
    onnx.save(proto, w / "broken.onnx")
    return infer(e, o, None, "--model", w / "broken.onnx")


@case("onnx-from-other-checkpoint", "bank.npz", "rebuild the bank")
def _(e, w, o):
    return infer(e, o, None, "--model", e.other_onnx)


@case("engine-corrupt", "bad.engine")
def _(e, w, o):
    (w / "bad.engine").write_bytes(os.urandom(4096))
    text(w / "bad.engine.json", "{}")
    return infer(e, o, None, "--model", w / "bad.engine")


@case("engine-not-exported", "m.engine", "not exported yet")
def _(e, w, o):
    if not _have_cuda():
        pytest.skip("no CUDA GPU here: tensorrt-without-gpu is the case")
    return infer(e, o, None, "--backend", "tensorrt")


@case("tensorrt-without-gpu", "m.engine", "needs an NVIDIA GPU", "onnxruntime")
def _(e, w, o):
    if _have_cuda():
        pytest.skip("a CUDA GPU is here: engine-not-exported is the case")
    return infer(e, o, None, "--backend", "tensorrt")  # not "run mclx export": it cannot


@case("export-trt-without-gpu", "m.engine", "TensorRT")
def _(e, w, o):
    if _have_tensorrt():
        pytest.skip("TensorRT is installed: --trt can succeed here")
    return export(copy(e.ck, o / "m.pt"), "--trt")


@case("export-calibration-data-missing", "nocalib", "does not exist")
def _(e, w, o):
    return export(copy(e.ck, o / "m.pt"), "--calib-data", w / "nocalib")


@case("export-calibration-image-corrupt", "bad.png", "not an image")
def _(e, w, o):
    (w / "calib").mkdir()
    text(w / "calib" / "bad.png")
    return export(copy(e.ck, o / "m.pt"), "--calib-data", w / "calib")


# --------------------------------------------------------------------------- outputs


@case("out-folder-missing", "b.npz", "output folder", "does not exist")
def _(e, w, o):
    return ["bank", "build", "--ckpt", e.ck, "--data", e.data, "--out", o / "sub" / "b.npz"]


@case("out-is-a-folder", "p.h5ad", "is a folder")
def _(e, w, o):
    (o / "p.h5ad").mkdir()
    return ["infer", e.image, "--bank", e.bank, "--spots", e.spots, "--out", o / "p.h5ad"]


@case("out-folder-read-only", "b.npz", "not writable", limit="readonly")
def _(e, w, o):
    return bank_build(e, o)


@case("export-folder-read-only", "m.onnx", "not writable", limit="readonly")
def _(e, w, o):
    return export(copy(e.ck, o / "m.pt"))


@case("full-disk-bank", "b.npz", "cannot write it", "file size limit", limit="fsize")
def _(e, w, o):
    args = bank_build(e, o)
    copy(e.bank, o / "b.npz")  # a real, good bank this failed run must not replace
    return args


@case("full-disk-predictions", "p.h5ad", "cannot write it", "file size limit", limit="fsize")
def _(e, w, o):
    return infer(e, o)


@case("full-disk-export", "m.onnx", "cannot write it", "file size limit", limit="fsize")
def _(e, w, o):
    return export(copy(e.ck, o / "m.pt"))


@case("full-disk-tmpfs-bank", "b.npz", "cannot write it", "no space left", limit="tmpfs")
def _(e, w, o):
    return bank_build(e, o, sections="S1,S2")


# --------------------------------------------------------------------------- issue 25


@case("analyze-json-of-another-tool", "other.json", "names no predictions file")
def _(e, w, o):
    text(w / "other.json", '{"predictions": 5, "tool": "not mclx"}')
    return ["analyze", w / "other.json", "--out", o / "an"]


@case("analyze-markers-none-predicted", "markers.txt", "none of its 2 marker genes")
def _(e, w, o):
    import anndata as ad

    a = ad.AnnData(np.ones((6, 3), np.float32))
    a.var_names = ["G0", "G1", "G2"]
    a.layers["measured"] = a.X.copy()
    a.obs["section"] = "S1"
    a.write_h5ad(w / "p.h5ad")
    return ["analyze", w / "p.h5ad", "--out", o / "an", "--markers",
            text(w / "markers.txt", "ERBB2\nESR1\n")]  # fmt: skip


@case("legacy-st-image-not-named-after-section", "no section has an image", "MOB1.jpg")
def _(e, w, o):
    src = Path(__file__).resolve().parents[2] / "shared" / "data" / "stutility-mob"
    if not (src / "MOB1.tsv").is_file():
        pytest.skip(f"needs the STUtility MOB data: {src} not found")
    for name in ("MOB1.tsv", "alignment_table_MOB1.tsv"):
        (w / name).symlink_to(src / name)
    (w / "HE_scan_MOB1.jpg").symlink_to(src / "MOB1.jpg")
    out = previous(o / "m.pt")  # every section: the error is not about --holdout
    return tiny_train_args(w, out, sections=None, epochs=1, genes_file=e.genes)


@case("cohort-out-dir-with-a-user-summary", "summary.csv", "mclx did not write it")
def _(e, w, o):
    previous(o / "summary.csv")
    return ["infer", e.image, copy(e.image, w / "b.jpg"), "--bank", e.bank, "--out-dir", o]


# --------------------------------------------------------------------------- running


def _have_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _have_tensorrt() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorrt") is not None


def _limit_file_size_to(nbytes: int):
    """A preexec function: in the child, writes past ``nbytes`` fail with EFBIG."""

    def preexec() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, resource.RLIM_INFINITY))

    return preexec


_limit_file_size = _limit_file_size_to(FSIZE_LIMIT)


def _drop_root_write_override() -> None:  # preexec: root obeys file and folder modes
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
            if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
                os._exit(99)


def run_limited(args: list, preexec=None) -> subprocess.CompletedProcess:
    """``python -m mclx ARGS`` with ``preexec`` run in the child."""
    return mclx(*args, preexec_fn=preexec)


@contextlib.contextmanager
def tmpfs(folder: Path, size_kib: int):
    """A small tmpfs at ``folder``, or skip when this process may not mount one."""
    folder.mkdir()
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(folder)],
        capture_output=True,
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.decode().strip()[:80]})")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every file (hidden ones too) under ``folder`` with its bytes (None for folders)."""
    return {
        str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes()
        for p in sorted(folder.rglob("*"))
    }


def test_catalogue_size():
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)


@dataclass
class Outcome:
    """One case's run, and its output folder before and after."""

    res: subprocess.CompletedProcess | None = None
    before: dict | None = None
    after: dict | None = None
    skip: str | None = None
    error: Exception | None = None


WORKERS = min(4, max(2, os.cpu_count() or 1))


@pytest.fixture(scope="module")
def outcomes(env: Env, request, tmp_path_factory) -> dict[str, Outcome]:
    """Every selected case: its bad input built in turn, then the commands run
    ``WORKERS`` at a time (each is a fresh interpreter that may import torch)."""
    wanted = {
        item.callspec.params["c"].id
        for item in request.session.items
        if getattr(item, "originalname", "") == "test_bad_input"
    }
    results: dict[str, Outcome] = {}
    jobs = []
    preexec = {
        "fsize": _limit_file_size,
        "readonly": _drop_root_write_override,
        "nocaps": _drop_root_write_override,
    }
    with contextlib.ExitStack() as stack:
        for c in (c for c in CASES if c.id in wanted):
            base = tmp_path_factory.mktemp(c.id)
            work, out = base / "work", base / "out"
            work.mkdir()
            try:
                if c.limit == "tmpfs":
                    stack.enter_context(tmpfs(out, 256))
                    (out / "filler").write_bytes(b"\0" * 160 * 1024)  # leave ~96 KiB free
                else:
                    out.mkdir()
                args = c.make(env, work, out)
            except pytest.skip.Exception as exc:
                results[c.id] = Outcome(skip=str(exc))
                continue
            except Exception as exc:  # a bug in the case itself: reported by its test
                results[c.id] = Outcome(error=exc)
                continue
            before = snapshot(out)
            if c.limit == "readonly":
                out.chmod(0o555)
                stack.callback(out.chmod, 0o755)
            jobs.append((c, out, before, args, preexec.get(c.limit)))
        with ThreadPoolExecutor(WORKERS) as pool:
            runs = [pool.submit(run_limited, args, fn) for *_, args, fn in jobs]
            for (c, out, before, *_), run in zip(jobs, runs):
                results[c.id] = Outcome(run.result(), before, snapshot(out))
    return results


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_bad_input(c: Case, outcomes: dict[str, Outcome]):
    o = outcomes[c.id]
    if o.skip is not None:
        pytest.skip(o.skip)
    if o.error is not None:
        raise o.error
    print(o.res.stderr.strip())  # shown with -rP: the catalogue's messages
    assert_one_line_error(o.res, *c.needles)
    assert o.after == o.before, "the failed run changed its output folder"


def test_failed_infer_keeps_good_predictions_and_writes_no_plot(
    env: Env, tmp_path: Path, capsys, monkeypatch
):
    """Real predictions of an earlier run survive a run that fails while writing its
    plot after its predictions (the .h5ad, with the slide image scanpy wants, is larger
    than the plot, so ``ulimit -f`` cannot pick the plot: its write fails as a full
    ``ulimit -f`` makes it fail, EFBIG): the command writes both or neither."""
    import anndata as ad
    import matplotlib.figure
    from helpers import run_cli

    out = tmp_path / "p.h5ad"
    base = ["infer", env.image, "--bank", env.bank, "--spots", env.spots, "--out", out, "-q"]
    assert mclx(*base, "--k", "5").returncode == 0
    good, before = out.read_bytes(), snapshot(tmp_path)

    def too_large(self, fname, *args, **kwargs):
        Path(fname).write_bytes(b"\x89PNG partial")
        raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", too_large)
    res = run_cli(capsys, [*base, "--plot", "GENE001"])
    assert_one_line_error(res, "p.GENE001.png", "file too large")
    assert snapshot(tmp_path) == before and out.read_bytes() == good
    assert ad.read_h5ad(out).uns["mclx"]["k"] == 5
