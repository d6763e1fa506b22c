"""The frozen-feature cache on disk (#29): a second command on the same sections encodes
nothing, the key follows every input that determines the features, a torn entry is
rebuilt, the folder stays under its limit, and ``mclx cache`` shows and empties it."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import run_cli, tiny_options, tiny_train_args

from mclx.config import PreprocessCfg
from mclx.inference import embed
from mclx.training import feature_store as store


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache folder of this test."""
    monkeypatch.setenv("MCLX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("MCLX_FEATURE_CACHE", "1")  # off for the rest of the suite
    return tmp_path / "cache" / "features"


@pytest.fixture
def encodes(monkeypatch):
    """The sections the encoder ran on (calls of encode_features, by progress label)."""
    calls: list[str] = []
    real = embed.encode_features

    def counting(*args, **kw):
        calls.append(kw.get("desc", "encode"))
        return real(*args, **kw)

    monkeypatch.setattr(embed, "encode_features", counting)
    return calls


def _last_line(res) -> str:
    assert res.returncode == 0, res.stderr
    return res.stdout.strip().splitlines()[-1]


def test_second_train_encodes_nothing(synthetic, tmp_path, cache, encodes, capsys):
    def train(name, *extra, quiet=True):
        # one view a section (the default's wide field is its own entry: test_context_fov)
        extra = ("--context-fov", "0", *extra)
        args = tiny_train_args(synthetic, tmp_path / name, *extra, epochs=1, quiet=quiet)
        return run_cli(capsys, args)

    first = train("a.pt", quiet=False)
    assert "features: 2 sections encoded" in _last_line(first)
    assert "encode S1" in first.stderr and "encode S2" in first.stderr  # bars name sections
    assert sorted(encodes) == ["encode S1", "encode S2"]
    encodes.clear()
    second = train("b.pt")
    assert "features: 2 sections from cache" in _last_line(second)
    assert encodes == []
    fp = [line.rsplit("fingerprint ", 1)[1] for line in (_last_line(first), _last_line(second))]
    assert fp[0] == fp[1]  # the same features: the same checkpoint
    entries = sorted(cache.glob("*.npy"))
    assert len(entries) == 2
    entries[0].write_bytes(entries[0].read_bytes()[:100])  # a torn entry: rebuilt, no error
    torn = train("c.pt")
    assert "1 section from cache, 1 section encoded" in _last_line(torn)
    assert len(encodes) == 1 and "error" not in torn.stderr
    off = train("d.pt", "--no-feature-cache")
    assert "2 sections encoded (feature cache off)" in _last_line(off)
    assert len(encodes) == 3


def test_evaluate_and_bank_build_read_what_train_cached(synthetic, tmp_path, cache, capsys):
    opts = tiny_options(synthetic, model="knn")
    train = ["train", "--data", synthetic, "--sections", "S1,S2", *opts, "-q"]
    assert run_cli(capsys, [*train, "--out", tmp_path / "knn.pt"]).returncode == 0
    bank = ["bank", "build", "--ckpt", tmp_path / "knn.pt", "--data", synthetic]
    res = run_cli(capsys, [*bank, "--sections", "S1,S2", "--out", tmp_path / "b.npz"])
    assert "features: 2 sections from cache" in _last_line(res)
    assert "read sections" in res.stderr  # the bank's progress
    ev = ["evaluate", "--data", synthetic, "--sections", "S1,S2", *opts, "--k", "5"]
    res = run_cli(capsys, [*ev, "--out", tmp_path / "r.json"])
    assert "features: 2 sections from cache" in _last_line(res)
    assert "fold 1/2: held out S1, training on 1 sections" in res.stderr
    assert "fold 2/2: held out S2, training on 1 sections" in res.stderr


def _key(**change):
    args = dict(
        image_digest="a" * 64,
        centers=np.array([[10.2, 20.7], [30.0, 40.0]]),
        source=112,
        patch_size=224,
        encoder="DenseNet:0123",
        pre=PreprocessCfg(),
        kind="pooled",
    )
    return store.entry_key(**(args | change))


def test_key_changes_with_every_input():
    base = _key()
    changed = [
        _key(image_digest="b" * 64),
        _key(centers=np.array([[11.2, 20.7], [30.0, 40.0]])),
        _key(centers=np.array([[10.2, 20.7]])),
        _key(source=113),
        _key(patch_size=112),
        _key(encoder="DenseNet:4567"),
        _key(encoder="ViT:0123"),
        _key(pre=PreprocessCfg(mean=(0.5, 0.5, 0.5))),
        _key(pre=PreprocessCfg(std=(0.5, 0.5, 0.5))),
        _key(kind="tokens"),
        _key(kind="views8"),
    ]
    assert len({base, *changed}) == len(changed) + 1
    assert _key(centers=np.array([[10.9, 20.1], [30.5, 40.5]])) == base  # same pixels cut


def test_image_digest_is_the_content_and_is_remembered(tmp_path, cache, monkeypatch):
    a, b = tmp_path / "a.jpg", tmp_path / "b.jpg"
    a.write_bytes(b"one image")
    b.write_bytes(b"one image")
    assert store.file_digest(a) == store.file_digest(b)  # content, not path
    a.write_bytes(b"another image!")  # rewritten: new size and mtime
    assert store.file_digest(a) != store.file_digest(b)
    opened = []
    real_open = open
    monkeypatch.setattr(
        "builtins.open", lambda p, *a, **k: opened.append(p) or real_open(p, *a, **k)
    )
    store.file_digest(b)
    assert str(b) not in map(str, opened)  # remembered by path, size and mtime: not re-read


def test_least_recently_used_entries_go_above_the_limit(cache, monkeypatch):
    import os

    pre, arr = PreprocessCfg(), np.zeros((1000, 100), np.float32)  # 400 kB each
    keys = [_key(kind=f"k{i}") for i in range(3)]
    for i, k in enumerate(keys):
        store.save(k, arr)
        os.utime(cache / f"{k}.npy", (1000 + i, 1000 + i))
    assert store.load(keys[0]) is not None  # used: now the newest
    monkeypatch.setenv("MCLX_FEATURE_CACHE_GB", "0.001")  # 1 MB: room for two
    store.save(_key(kind="k3"), arr)
    left = {p.stem for p in cache.glob("*.npy")}
    assert left == {keys[0], _key(kind="k3")} and pre is not None


def test_cache_info_and_clear(cache, capsys):
    store.save(_key(), np.ones((10, 4), np.float32))
    res = run_cli(capsys, ["cache", "info"])
    assert res.returncode == 0 and "1 section feature entries" in res.stdout
    assert str(cache) in res.stdout
    res = run_cli(capsys, ["cache", "clear"])
    assert res.returncode == 0 and "removed 1 feature entries" in res.stdout
    assert not list(cache.glob("*.npy"))
    assert "0 section feature entries" in run_cli(capsys, ["cache", "info"]).stdout
