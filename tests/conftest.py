"""Shared fixtures and the ``needs`` marks (:mod:`helpers.marks`): the real her2st folder
(skipped when absent, a failure with ``MCLX_REQUIRE_DATA=1``) and synthetic data."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:  # `import helpers` under any import mode
    sys.path.insert(0, str(TESTS))

from helpers import marks  # noqa: E402
from helpers.data import data_required, her2st_missing, her2st_path  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "needs(*what): skip (with the reason) unless what the test needs is here: "
        f"{', '.join(sorted(marks.NEEDS))}; resolved at collection",
    )


def pytest_ignore_collect(collection_path, config):
    """``pytest --benchmark-only`` runs the benchmarks (bench/), not these tests."""
    return True if config.getoption("benchmark_only", default=False) else None


@pytest.hookimpl(tryfirst=True)  # before -m selects on the data / gpu markers it adds
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        marks.resolve(item)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    marks.fail_if_required(item)


@pytest.fixture(scope="session", autouse=True)
def _own_cache_folder(tmp_path_factory):
    """mclx's cache (frozen TorchScript models) in a folder of this session, not the
    user's ~/.cache/mclx; subprocesses inherit it. The frozen-feature cache is off: a
    test that counts or interrupts encoding must not depend on what ran before it
    (tests/test_feature_store.py turns it on in a folder of its own)."""
    import os

    saved = os.environ.get("MCLX_CACHE_DIR")
    saved_features = os.environ.get("MCLX_FEATURE_CACHE")
    os.environ["MCLX_CACHE_DIR"] = str(tmp_path_factory.mktemp("mclx-cache"))
    os.environ["MCLX_FEATURE_CACHE"] = "0"
    yield
    if saved_features is None:
        os.environ.pop("MCLX_FEATURE_CACHE", None)
    else:
        os.environ["MCLX_FEATURE_CACHE"] = saved_features
    if saved is None:
        os.environ.pop("MCLX_CACHE_DIR", None)
    else:
        os.environ["MCLX_CACHE_DIR"] = saved


@pytest.fixture(scope="session")
def her2st() -> Path:
    """The real HER2+ data (a test taking it needs("her2st"), resolved at collection)."""
    reason = her2st_missing()
    if reason is not None:  # only reached through request.getfixturevalue
        if data_required():
            pytest.fail(reason + " and MCLX_REQUIRE_DATA=1")
        pytest.skip(reason)
    return her2st_path()


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory) -> Path:
    """A small her2st-layout dataset with a learnable image -> expression relation."""
    from mclx.data.synthetic import write_synthetic_her2st

    return write_synthetic_her2st(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture(scope="session")
def slide_predictions(synthetic, tmp_path_factory) -> dict[str, Path]:
    """``mclx infer`` of a tiny model over a pyramidal TIFF of synthetic section S3: the
    ``.h5ad``, its GeoJSON and (spatialdata installed) SpatialData store, the slide and
    the JPEG it was made from (:func:`helpers.viewer.predict_slide`)."""
    from helpers.viewer import predict_slide, spatialdata_missing

    folder = tmp_path_factory.mktemp("slide_predictions")
    return predict_slide(synthetic, folder, spatialdata=spatialdata_missing() is None)


@pytest.fixture(scope="session")
def view_folder(slide_predictions, tmp_path_factory) -> Path:
    """``mclx view`` of ``slide_predictions``: the folder a browser opens."""
    from helpers.cli import mclx

    out = tmp_path_factory.mktemp("view") / "S3_view"
    res = mclx("view", slide_predictions["h5ad"], "--out", out, "-q")
    assert res.returncode == 0, res.stderr
    assert f"wrote {out}/index.html" in res.stdout
    return out
