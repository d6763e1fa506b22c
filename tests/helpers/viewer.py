"""The viewer's and the outputs' test helpers: what they need (a real browser,
OpenSeadragon, spatialdata), predictions over a real slide file to look at, and the
colour an observation must have on the page (computed here, not by the page's code).

``MCLX_REQUIRE_VIEWER=1`` (CI) turns a missing browser or OpenSeadragon into a failure,
``MCLX_REQUIRE_SPATIALDATA=1`` a missing spatialdata.
"""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
from pathlib import Path

import numpy as np

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")
DRIVER = "chromedriver"
APT = "apt-get install chromium chromium-driver"


def viewer_required() -> bool:
    return os.environ.get("MCLX_REQUIRE_VIEWER") == "1"


def spatialdata_required() -> bool:
    return os.environ.get("MCLX_REQUIRE_SPATIALDATA") == "1"


def chromium_binaries() -> tuple[str | None, str | None]:
    """The system Chromium and its chromedriver (None where absent); no downloads."""
    browser = next((p for p in map(shutil.which, CHROMIUM) if p), None)
    return browser, shutil.which(DRIVER)


def browser_missing() -> str | None:
    browser, driver = chromium_binaries()
    if browser is None or driver is None:
        return f"needs Chromium and chromedriver on PATH ({APT})"
    if importlib.util.find_spec("selenium") is None:
        return "needs selenium (pip install -e '.[dev]')"
    return None


def openseadragon_missing() -> str | None:
    from mclx.viewer import openseadragon

    try:
        openseadragon.find()
    except FileNotFoundError as exc:
        return f"needs OpenSeadragon: {exc}"
    return None


def spatialdata_missing() -> str | None:
    if importlib.util.find_spec("spatialdata") is None:
        return "needs spatialdata (pip install -e '.[dev,spatialdata]')"
    return None


def start_chromium(width: int = 1280, height: int = 900):
    """Headless system Chromium driven by Selenium (``--no-sandbox``: CI runs as root);
    the browser's console is kept for the tests to read."""
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager: never download
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = chromium_binaries()
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},{height}", "--force-device-scale-factor=1"):  # fmt: skip
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=opts)


def predict_slide(data: Path, folder: Path, *, spatialdata: bool) -> dict[str, Path]:
    """A tiny model and bank on the synthetic data, then ``mclx infer`` over a pyramidal
    TIFF of section S3 (read through OpenSlide, tissue grid) writing the ``.h5ad``, its
    GeoJSON (top 5 genes) and, with ``spatialdata``, a SpatialData store."""
    from helpers.cli import mclx
    from helpers.models import train_tiny_cli
    from mclx.bank import build_bank, save_bank
    from mclx.data.slide import load_image, write_pyramidal_tiff
    from mclx.data.synthetic import PITCH_PX

    ck = train_tiny_cli(data, folder / "m.pt")
    save_bank(build_bank(ck, data, sections=["S1", "S2", "S4"]), folder / "bank.npz")
    jpeg = data / "data" / "ST-imgs" / "S" / "S3" / "S3.jpg"
    tif = write_pyramidal_tiff(load_image(jpeg), folder / "S3.tif", mpp=200.0 / PITCH_PX)
    out = {"h5ad": folder / "S3.h5ad", "slide": tif, "jpeg": jpeg, "geojson": folder / "S3.geojson"}
    args = ["infer", tif, "--bank", folder / "bank.npz", "--k", 20, "--out", out["h5ad"],
            "--geojson", out["geojson"], "--geojson-genes", 5, "-q"]  # fmt: skip
    if spatialdata:
        out["zarr"] = folder / "S3.zarr"
        args += ["--spatialdata", out["zarr"]]
    res = mclx(*args)
    assert res.returncode == 0, res.stderr
    return out


def colour_index(v: float, lo: float, hi: float) -> int:
    """The page's colour table index of value ``v`` over the range [lo, hi] (the formula
    the page documents, in float64 as JavaScript computes)."""
    v, lo, hi = float(v), float(lo), float(hi)
    return min(255, math.floor(256 * (v - lo) / (hi - lo))) if hi > lo else 0


def expected_rgb(values: np.ndarray, cmap: str = "viridis") -> np.ndarray:
    """(n, 3) uint8: the colour each value of one gene must have on the page."""
    from matplotlib import colormaps

    values = np.asarray(values, dtype=np.float32)
    lo, hi = values.min(), values.max()
    table = np.round(np.asarray(colormaps[cmap](np.arange(256)))[:, :3] * 255).astype(np.uint8)
    return table[[colour_index(v, lo, hi) for v in values]]
