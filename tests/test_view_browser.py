"""``mclx view`` in a real browser: the system Chromium, headless, driven by Selenium; one
browser for the module, the page opened from disk (file://) as a user double-clicks it,
and once from a static web server.

Expected values come from the ``.h5ad`` and matplotlib's colour map, not from the page:
the overlay's colour under each tile centre, the top genes of a clicked tile, the matches
of a search. The screenshots are kept under the test's tmp path (printed; ``-s`` shows
the paths).
"""

from __future__ import annotations

import functools
import http.server
import io
import threading
import time

import anndata as ad
import numpy as np
import pytest
from helpers import needs
from helpers.viewer import expected_rgb, start_chromium

pytestmark = [needs("browser", "openseadragon"), pytest.mark.slow]
LOAD_TIMEOUT = 60


def wait_for(driver, script: str, timeout: float = LOAD_TIMEOUT):
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        value = driver.execute_script(script)
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"not true after {timeout} s: {script}")


def console_errors(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


class Page:
    """The open page: JavaScript, elements, screenshots, and the default state between
    tests (first gene, nothing selected, opacity 70 %, home view)."""

    def __init__(self, driver, pred):
        self.driver, self.pred = driver, pred
        self.first_gene = self.js("return mclxView.gene")

    def js(self, script: str, *args):
        return self.driver.execute_script(script, *args)

    def find(self, css: str):
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, css)

    def find_all(self, css: str):
        from selenium.webdriver.common.by import By

        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def reset(self) -> None:
        self.js(
            "mclxView.setGene(arguments[0]); mclxView.select(-1);"
            "const o = document.getElementById('opacity'); o.value = 70;"
            "o.dispatchEvent(new Event('input'));"
            "mclxView.viewer.viewport.goHome(true);",
            self.first_gene,
        )
        wait_for(self.driver, "return mclxView.fullyLoaded()")
        self.js("mclxView.viewer.forceRedraw()")

    def centres(self) -> np.ndarray:
        """(n, 2) element coordinates of every observation's centre."""
        return np.array(self.js("return mclxView.data.ids.map((_, i) => mclxView.onScreen(i))"))

    def overlay_colours(self) -> np.ndarray:
        """(n, 3) the overlay canvas's colour under each observation's centre."""
        script = "return arguments[0].map(([x, y]) => mclxView.overlayPixel(x, y).slice(0, 3))"
        return np.array(self.js(script, self.centres().tolist()), dtype=np.uint8)

    def screenshot(self, path=None) -> np.ndarray:
        from PIL import Image

        png = self.driver.get_screenshot_as_png()
        if path is not None:
            path.write_bytes(png)
        return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))

    def clear_of_controls(self) -> np.ndarray:
        """Observations whose centre is on screen, away from the navigator and buttons."""
        box = self.js(
            "const v = document.getElementById('viewer').getBoundingClientRect();"
            "const n = mclxView.viewer.navigator.element.getBoundingClientRect();"
            "return [v.width, v.height, n.left - v.left, n.top - v.top];"
        )
        w, h, nav_x, nav_y = box
        x, y = self.centres().T
        ok = (x > 5) & (y > 5) & (x < w - 5) & (y < h - 5)
        ok &= ~((x > nav_x - 30) & (y > nav_y - 30)) & ~((x < 160) & (y < 50))
        return np.flatnonzero(ok)

    def on_screenshot(self, shot: np.ndarray, idx) -> np.ndarray:
        """Screenshot pixels under the centres of observations ``idx``."""
        left, top = self.js(
            "const r = document.getElementById('viewer').getBoundingClientRect();"
            "return [r.left, r.top];"
        )
        xy = self.centres()[idx]
        return shot[(top + xy[:, 1]).astype(int), (left + xy[:, 0]).astype(int)]


@pytest.fixture(scope="module")
def page(view_folder, slide_predictions):
    pred = ad.read_h5ad(slide_predictions["h5ad"])
    t0 = time.perf_counter()
    driver = start_chromium()
    t1 = time.perf_counter()
    try:
        driver.get((view_folder / "index.html").as_uri())
        wait_for(driver, "return window.mclxView !== undefined && mclxView.fullyLoaded()")
        t2 = time.perf_counter()
        print(f"Chromium started in {t1 - t0:.1f} s; page loaded in {t2 - t1:.1f} s")
        yield Page(driver, pred)
    finally:
        driver.quit()


def values(pred, gene: str) -> np.ndarray:
    return np.asarray(pred[:, gene].X, dtype=np.float32).ravel()


def test_tiles_load_and_every_observation_is_one_shape(page):
    page.reset()
    assert page.js("return mclxView.fullyLoaded()")  # OpenSeadragon: getFullyLoaded()
    assert page.js("return mclxView.drawn") == page.pred.n_obs
    assert page.js("return mclxView.viewer.drawer.getType()") == "canvas"
    u = page.pred.uns["mclx"]
    dd = {e.get_attribute("data-key"): e for e in page.find_all("#provenance dd")}
    assert dd["checkpoint"].text == u["checkpoint_fingerprint"][:12]
    assert dd["checkpoint"].get_attribute("title") == u["checkpoint_fingerprint"]
    assert dd["bank"].text == "bank.npz" and dd["bank"].get_attribute("title") == u["bank"]
    assert dd["backend"].text == f"{u['backend']} / {u['precision']} / {u['device']}"
    assert dd["timings"].text.startswith(f"{u['timings']['total']:.1f} s (read ")
    assert page.find("#slide-name").text == "S3.tif"
    # zoomed in, deeper tiles load and only the tiles in view are drawn
    page.js("mclxView.viewer.viewport.zoomBy(6); mclxView.viewer.viewport.applyConstraints();")
    time.sleep(0.5)
    wait_for(page.driver, "return mclxView.fullyLoaded()")
    assert 0 < page.js("return mclxView.drawn") < page.pred.n_obs
    assert console_errors(page.driver) == []


def test_colours_are_the_genes_and_change_with_it(page):
    from selenium.webdriver.common.keys import Keys

    page.reset()
    pred = page.pred
    first = page.first_gene
    want_first = expected_rgb(values(pred, first))
    np.testing.assert_array_equal(page.overlay_colours(), want_first)
    # the gene whose colours differ most from the first's, chosen by typing its name
    other = max(
        (g for g in pred.var_names if g != first),
        key=lambda g: (expected_rgb(values(pred, g)) != want_first).any(1).sum(),
    )
    want_other = expected_rgb(values(pred, other))
    search = page.find("#gene-search")
    search.clear()
    search.send_keys(other, Keys.ENTER)
    assert page.js("return mclxView.gene") == other
    got = page.overlay_colours()
    np.testing.assert_array_equal(got, want_other)
    assert (got != want_first).any(1).sum() >= pred.n_obs // 4
    lo, hi = values(pred, other).min(), values(pred, other).max()
    assert page.find("#legend-gene").text == other
    assert float(page.find("#legend-min").text) == pytest.approx(lo, rel=1e-3)
    assert float(page.find("#legend-max").text) == pytest.approx(hi, rel=1e-3)


def test_search_lists_every_matching_gene(page):
    page.reset()
    genes = list(page.pred.var_names)
    search = page.find("#gene-search")
    search.clear()
    search.send_keys("e01")  # case-insensitive: GENE01x first (prefix none), then inner
    items = [li.text for li in page.find_all("#gene-matches li")]
    q = "e01"
    want = [g for g in genes if g.lower() == q]
    want += [g for g in genes if g.lower().startswith(q) and g.lower() != q]
    want += [g for g in genes if q in g.lower() and not g.lower().startswith(q)]
    assert items == want[:50] and len(items) > 1
    assert page.find("#gene-count").text.startswith(f"{len(want)} of {len(genes)} genes match")
    page.find(f'#gene-matches li[data-gene="{want[1]}"]').click()
    assert page.js("return mclxView.gene") == want[1]
    assert page.find_all("#gene-matches li") == []


def test_a_click_shows_that_tiles_top_genes(page):
    from selenium.webdriver.common.action_chains import ActionChains

    page.reset()
    pred = page.pred
    clear = page.clear_of_controls()
    i = int(clear[len(clear) // 2])
    x, y = page.centres()[i]
    el = page.find("#viewer")
    w, h = el.size["width"], el.size["height"]
    ActionChains(page.driver).move_to_element_with_offset(
        el, int(round(x - w / 2)), int(round(y - h / 2))
    ).click().perform()
    wait_for(page.driver, f"return mclxView.selected === {i}", timeout=5)
    assert page.find("#sel-id").text == pred.obs_names[i]
    row = np.asarray(pred.X[i], dtype=np.float32).ravel()
    top = np.lexsort((np.arange(len(row)), -row))[:10]
    shown = [
        (tr.find_element("css selector", ".gene").text,
         float(tr.find_element("css selector", ".value").text))
        for tr in page.find_all("#top-genes tr")
    ]  # fmt: skip
    assert [g for g, _ in shown] == [pred.var_names[j] for j in top]
    np.testing.assert_allclose([v for _, v in shown], row[top], rtol=1e-3)
    gene, value = page.find("#sel-current").text.split(": ")
    assert gene == page.first_gene
    assert float(value) == pytest.approx(row[pred.var_names.get_loc(gene)], rel=1e-3)
    # a top gene's row colours the slide by it; a click on bare glass clears the selection
    page.find(f'#top-genes tr[data-gene="{pred.var_names[top[1]]}"]').click()
    assert page.js("return mclxView.gene") == pred.var_names[top[1]]
    gx, gy = page.js(
        "const it = mclxView.viewer.world.getItemAt(0);"
        "const p = it.imageToViewerElementCoordinates(new OpenSeadragon.Point(60, 1900));"
        "return [p.x, p.y];"
    )
    assert page.js("return mclxView.pick(60, 1900)") == -1  # left of the tissue: glass
    ActionChains(page.driver).move_to_element_with_offset(
        el, int(round(gx - w / 2)), int(round(gy - h / 2))
    ).click().perform()
    wait_for(page.driver, "return mclxView.selected === -1", timeout=5)
    assert "Click a tile" in page.find("#selection").text


def test_opacity_slider_and_a_screenshot_that_is_not_blank(page, tmp_path):
    from selenium.webdriver.common.keys import Keys

    from mclx.data.slide import open_slide

    page.reset()
    pred = page.pred
    idx = page.clear_of_controls()
    assert len(idx) >= pred.n_obs // 2
    slider = page.find("#opacity")
    slider.send_keys(Keys.END)  # 100 %: the screen shows the overlay's colours exactly
    assert page.js("return mclxView.overlay.style.opacity") == "1"
    opaque = page.screenshot(tmp_path / "opaque.png")
    want = expected_rgb(values(pred, page.first_gene))[idx]
    np.testing.assert_array_equal(page.on_screenshot(opaque, idx), want)
    slider.send_keys(Keys.HOME)  # 0 %: the slide itself under the tiles
    assert page.js("return mclxView.overlay.style.opacity") == "0"
    bare = page.on_screenshot(page.screenshot(tmp_path / "slide_only.png"), idx)
    slide = open_slide(pred.uns["mclx"]["slide"])
    scale = (
        page.js(
            "const it = mclxView.viewer.world.getItemAt(0);"
            "return it.imageToViewerElementCoordinates(new OpenSeadragon.Point(1000, 0)).x"
            " - it.imageToViewerElementCoordinates(new OpenSeadragon.Point(0, 0)).x;"
        )
        / 1000
    )
    side = max(1, int(round(1 / scale)))  # level-0 pixels per screen pixel
    under = np.array([
        slide.read(int(x) - side // 2, int(y) - side // 2, side).reshape(-1, 3).mean(0)
        for x, y in pred.obsm["spatial"][idx]
    ])  # fmt: skip
    assert np.abs(bare.astype(float) - under).mean() < 20
    assert (np.abs(bare.astype(int) - want.astype(int)).sum(1) > 30).mean() > 0.5
    page.reset()
    path = tmp_path / "mclx_view.png"
    shot = page.screenshot(path)
    print(f"screenshot of the viewer: {path}")
    left, top, width, height = page.js(
        "const r = document.getElementById('viewer').getBoundingClientRect();"
        "return [r.left, r.top, r.width, r.height];"
    )
    viewer = shot[int(top) : int(top + height), int(left) : int(left + width)]
    assert len(np.unique(viewer.reshape(-1, 3), axis=0)) > 200 and viewer.std() > 20
    assert console_errors(page.driver) == []


def test_the_folder_served_by_a_static_web_server(page, view_folder):
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(view_folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        page.driver.get(f"http://127.0.0.1:{server.server_address[1]}/index.html")
        wait_for(page.driver, "return window.mclxView !== undefined && mclxView.fullyLoaded()")
        assert page.js("return mclxView.drawn") == page.pred.n_obs
        assert console_errors(page.driver) == []
    finally:
        server.shutdown()
        server.server_close()
