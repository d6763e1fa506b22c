"""Fuzzing the readers (hypothesis): random bytes and mutated real files must either read
into valid output or raise an error the command line prints as one line naming the file.

Targets: the her2st counts and spot readers, the slide-time spot reader (her2st, CSV and
Visium layouts), the bank loader and the checkpoint loaders. Mutations: truncation,
flipped bytes, inserted tokens (NaN, inf, negatives, separators, garbage), at the text
level and (for gzip, zip and torch files) at the byte level; and for banks and
checkpoints, fields replaced by values of the wrong type or shape.
"""

from __future__ import annotations

import gzip
import io
import os

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import her2st_available, her2st_path
from helpers.data import data_required, her2st_missing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mclx.bank import load_bank, save_bank
from mclx.checkpoint import load_checkpoint, read_checkpoint_dict
from mclx.data import her2st, spotfiles
from mclx.data.readers import read_spots
from mclx.errors import MclxError, one_line

# what cli.main turns into one "mclx: error:" line
CLEAN = (MclxError, OSError, ValueError, KeyError, RuntimeError, MemoryError)


def fuzz(examples: int):
    """Settings for ``examples`` cases (times $MCLX_FUZZ_SCALE for a longer hunt)."""
    return settings(
        max_examples=int(examples * float(os.environ.get("MCLX_FUZZ_SCALE", "1"))),
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )


TOKENS = [
    b"nan", b"NaN", b"inf", b"-inf", b"-1", b"-0.5", b"1e309", b"abc", b"", b"\t", b"\n",
    b"\t\t", b",", b'"', b"\x00", b"\xff\xfe", b"1x1", b"10x13", b"None", b"#", b" ",
    b"99999999999999999999999", b"0x1F", b"1,5", b"\r",
]  # fmt: skip


@st.composite
def mutated(draw, base: bytes, max_ops: int = 4):
    """``base`` after up to ``max_ops`` edits: truncate, flip a byte, insert a token,
    delete a span, or duplicate a line."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, max_ops))):
        op = draw(st.sampled_from(["truncate", "flip", "insert", "delete", "dup_line"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "truncate":
            del data[pos:]
        elif op == "flip" and data:
            data[pos] ^= draw(st.integers(1, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.sampled_from(TOKENS) | st.binary(max_size=8))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 16))]
        elif op == "dup_line":
            lines = bytes(data).split(b"\n")
            i = draw(st.integers(0, len(lines) - 1))
            data = bytearray(b"\n".join([*lines[: i + 1], lines[i], *lines[i + 1 :]]))
    return bytes(data)


def check(read, path, data: bytes):
    """Write ``data`` to ``path`` and read it: valid output or a clean, named error."""
    path.write_bytes(data)
    try:
        return read(path)
    except CLEAN as exc:
        msg = one_line(exc)
        assert path.name in msg, f"{type(exc).__name__} does not name the file: {msg}"
        return None


# --------------------------------------------------------------------------- sample files


@pytest.fixture(scope="module")
def samples(synthetic):
    """Small counts and spot files: cut from the real her2st data when present, else
    the synthetic data's."""
    if her2st_available():
        root, section = her2st.find_data_root(her2st_path()), "A1"
    elif data_required():
        pytest.fail(f"{her2st_missing()} and MCLX_REQUIRE_DATA=1")
    else:
        root, section = her2st.find_data_root(synthetic), "S1"
    counts = her2st.read_counts(root / "ST-cnts" / f"{section}.tsv.gz").iloc[:15, :25]
    spots_text = (root / "ST-spotfiles" / f"{section}_selection.tsv").read_text()
    spots_text = "\n".join(spots_text.splitlines()[:25]) + "\n"
    buf = io.StringIO()
    counts.to_csv(buf, sep="\t")
    return {"counts": buf.getvalue().encode(), "spots": spots_text.encode()}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def _counts_valid(df: pd.DataFrame) -> None:
    values = df.to_numpy(np.float64)
    assert df.shape[0] > 0 and df.shape[1] > 0
    assert np.isfinite(values).all() and (values >= 0).all()
    assert df.index.is_unique and df.columns.is_unique


def _spots_valid(df: pd.DataFrame) -> None:
    assert df.index.is_unique
    assert np.isfinite(df[["pixel_x", "pixel_y"]].to_numpy(np.float64)).all()
    assert df["x"].dtype.kind == "i" and df["y"].dtype.kind == "i"


# --------------------------------------------------------------------------- counts TSV


@fuzz(60)
@given(data=st.binary(max_size=600))
def test_counts_random_bytes(folder, data):
    for name in ("r.tsv", "r.tsv.gz"):
        df = check(her2st.read_counts, folder / name, data)
        if df is not None:
            _counts_valid(df)


@fuzz(150)
@given(st.data())
def test_counts_mutated_text(folder, samples, data):
    df = check(her2st.read_counts, folder / "m.tsv", data.draw(mutated(samples["counts"])))
    if df is not None:
        _counts_valid(df)


@fuzz(80)
@given(st.data())
def test_counts_mutated_gzip(folder, samples, data):
    raw = gzip.compress(samples["counts"], mtime=0)
    df = check(her2st.read_counts, folder / "m.tsv.gz", data.draw(mutated(raw, max_ops=2)))
    if df is not None:
        _counts_valid(df)


# --------------------------------------------------------------------------- spot files


@fuzz(60)
@given(data=st.binary(max_size=600))
def test_her2st_spots_random_bytes(folder, data):
    df = check(spotfiles.read_selection, folder / "r_selection.tsv", data)
    if df is not None:
        _spots_valid(df)


@fuzz(150)
@given(st.data())
def test_her2st_spots_mutated(folder, samples, data):
    df = check(
        spotfiles.read_selection, folder / "m_selection.tsv", data.draw(mutated(samples["spots"]))
    )
    if df is not None:
        _spots_valid(df)


def _slide_spots_valid(result) -> None:
    df, kind = result
    assert kind in ("her2st", "visium", "csv") and len(df) > 0
    assert np.isfinite(df[["x", "y"]].to_numpy(np.float64)).all()
    assert df["id"].is_unique


VISIUM = b"".join(  # tissue_positions_list.csv: no header, six columns
    b"AAAC%04d-1,%d,%d,%d,%d.5,%d.25\n" % (i, i % 3 > 0, i // 8, i % 8 * 2, 300 + 7 * i, 5 * i)
    for i in range(30)
)
CSV = b"x,y,id\n" + b"".join(b"%d.5,%d,s%d\n" % (10 * i, 20 * i, i) for i in range(30))


@fuzz(150)
@given(st.data())
def test_slide_spots_mutated(folder, samples, data):
    name, base = data.draw(
        st.sampled_from(
            [("s.tsv", samples["spots"]), ("v.csv", VISIUM), ("c.csv", CSV), ("b.csv", b"")]
        )
    )
    if not base:  # random bytes
        raw = data.draw(st.binary(max_size=400))
    else:
        raw = data.draw(mutated(base))
    result = check(read_spots, folder / name, raw)
    if result is not None:
        _slide_spots_valid(result)


# --------------------------------------------------------------------------- banks


@pytest.fixture(scope="module")
def small_bank(folder):
    from mclx.bank import Bank

    rng = np.random.default_rng(0)
    n, g = 12, 5
    bank = Bank(
        embeddings=rng.normal(size=(n, 8)).astype(np.float32),
        expressions=rng.random((n, g), dtype=np.float32),
        genes=[f"G{i}" for i in range(g)],
        sections=np.array(["S1"] * n),
        spot_ids=np.array([f"S1_{i}x1" for i in range(n)]),
        coords=rng.random((n, 2)) * 100,
        positions=np.stack([np.arange(n), np.ones(n, int)], 1),
        fingerprint="0123456789abcdef",
        checkpoint="/nowhere/m.pt",
        model="mclstexp",
        k=3,
        distance="l2",
        weighting="inverse_square",
    )
    path = save_bank(bank, folder / "good.npz")
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    return path.read_bytes(), arrays


def _bank_valid(bank) -> None:
    n = len(bank)
    assert n > 0 and bank.embeddings.ndim == 2 and bank.expressions.shape == (n, len(bank.genes))
    assert np.isfinite(bank.embeddings).all() and np.isfinite(bank.expressions).all()
    assert bank.coords.shape == (n, 2) and bank.positions.shape == (n, 2)
    assert bank.k >= 1 and isinstance(bank.fingerprint, str)


@fuzz(100)
@given(st.data())
def test_bank_mutated_bytes(folder, small_bank, data):
    raw, _ = small_bank
    bank = check(load_bank, folder / "m.npz", data.draw(mutated(raw, max_ops=3)))
    if bank is not None:
        _bank_valid(bank)


ODD_ARRAYS = st.sampled_from(
    [
        np.array(3),
        np.array("text"),
        np.array([]),
        np.zeros((0, 8), np.float32),
        np.zeros((12,), np.float32),
        np.zeros((12, 8, 2), np.float32),
        np.full((12, 8), np.nan, np.float32),
        np.full((12, 5), np.inf, np.float32),
        np.array(["a"] * 12),
        np.zeros((12, 2), bool),
        np.zeros((3, 2), np.int64),
        np.array([1 + 2j] * 12),
        np.array(-5),
        np.array(2**40),
        np.array("l3"),
    ]
)


@fuzz(150)
@given(st.data())
def test_bank_fields_of_the_wrong_kind(folder, small_bank, data):
    _, arrays = small_bank
    arrays = dict(arrays)
    for key in data.draw(
        st.lists(st.sampled_from(sorted(arrays)), min_size=1, max_size=3, unique=True)
    ):
        if data.draw(st.booleans()):
            arrays[key] = data.draw(ODD_ARRAYS)
        else:
            del arrays[key]
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    bank = check(load_bank, folder / "f.npz", buf.getvalue())
    if bank is not None:
        _bank_valid(bank)


# --------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def small_ckpt(folder):
    from mclx.checkpoint import save_checkpoint
    from mclx.config import ModelCfg, PreprocessCfg
    from mclx.models import create_model

    torch.manual_seed(0)
    net = create_model(
        ModelCfg(encoder="tiny_cnn", n_genes=6, pos_size=(3, 3), depth=1, embed_dim=16)
    )
    pre = PreprocessCfg(genes=tuple(f"G{i}" for i in range(6)), mpp=0.9)
    path = folder / "good.pt"
    save_checkpoint(path, net, preprocess=pre, provenance={"epochs": 1})
    return path.read_bytes(), torch.load(path, weights_only=True)


@fuzz(60)
@given(st.data())
def test_checkpoint_mutated_bytes(folder, small_ckpt, data):
    raw, _ = small_ckpt
    ck = check(load_checkpoint, folder / "m.pt", data.draw(mutated(raw, max_ops=2)))
    if ck is not None:
        assert ck.fingerprint and len(ck.preprocess.genes) == 6


ODD_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.floats(allow_nan=True),
    st.text(max_size=5),
    st.lists(st.integers(0, 3), max_size=3),
    st.dictionaries(st.sampled_from(["n_genes", "encoder", "genes", "zzz"]), st.integers(0, 3)),
    st.just(torch.zeros(2)),
)


@fuzz(100)
@given(st.data())
def test_checkpoint_fields_of_the_wrong_kind(folder, small_ckpt, data):
    _, payload = small_ckpt
    payload = {k: (dict(v) if isinstance(v, dict) else v) for k, v in payload.items()}
    where = data.draw(st.sampled_from(["top", "model", "preprocess", "state_dict"]))
    target = payload if where == "top" else payload[where]
    key = data.draw(st.sampled_from(sorted(target)))
    if data.draw(st.booleans()):
        target[key] = data.draw(ODD_VALUES)
    else:
        del target[key]
    buf = io.BytesIO()
    torch.save(payload, buf)
    path = folder / "f.pt"
    for read in (read_checkpoint_dict, load_checkpoint):
        check(read, path, buf.getvalue())


# --------------------------------------------------------------------------- images


@pytest.fixture(scope="module")
def small_images():
    from PIL import Image

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8))
    out = {}
    for fmt, suffix in (("PNG", ".png"), ("JPEG", ".jpg"), ("TIFF", ".tif")):
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        out[suffix] = buf.getvalue()
    return out


@fuzz(120)
@given(st.data())
def test_images_mutated(folder, small_images, data):
    from mclx.data.slide import load_image, open_slide

    suffix = data.draw(st.sampled_from(sorted(small_images)))
    raw = data.draw(mutated(small_images[suffix], max_ops=2))
    img = check(load_image, folder / f"i{suffix}", raw)
    if img is not None:
        assert img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.uint8
    # the reader is chosen by content (OpenSlide if it detects the format, else PIL);
    # opening reads the header only, so a corrupt body may fail at the first read
    patch = check(lambda p: open_slide(p).read(0, 0, 16, 8), folder / f"s{suffix}", raw)
    if patch is not None:
        assert patch.shape == (8, 8, 3) and patch.dtype == np.uint8
