"""The quick run's pages in a real browser, offline: headless Chromium (the system's `chromium`, driven by
playwright) opens index.html, every interactive figure and an executed notebook from file:// URLs with every
other request blocked, and checks that nothing failed, that plotly drew every trace, that the line figures plot
the right series, and that hovering shows a tooltip. Screenshots go to <run>/screenshots/ and the index links
them.

Skipped, saying why, when playwright or a Chromium binary is missing (`python3 tasks.py test` installs Debian's
`chromium` with apt when it can)."""

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from snapkv.analysis.reporting.reproduce import SCREENSHOTS, write_index

pytestmark = pytest.mark.slow

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1400, "height": 1000}
# figures whose lines `_lines` draws: layer on x (01 sensitivity and 02 have other x values)
LAYER_LINE_FIGURES = ("01_hit_rate_along_generation", "01_observation_metrics", "03_questions_same_document",
                      "04_question_position", "05_voting_variants")
# x = relative layer depth (0 = first layer, 1 = last), one trace per model and set: each spans its model's layers
DEPTH_LINE_FIGURES = ("12_hit_rate_by_depth",)
NOTEBOOK_PAGE = "09_explorer.html"  # an executed notebook with a plotly output (every head at this budget)


def find_chromium() -> str | None:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e .[dev])")
    executable = find_chromium()
    if executable is None:
        pytest.skip("no Chromium found (tried " + ", ".join(BROWSERS) + "); on Debian as root `python3 tasks.py test` "
                    "installs it, else `apt-get install chromium`")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, args=FLAGS, headless=True)
        yield launched
        launched.close()


class OfflinePage:
    """A page whose requests other than file:// are aborted and recorded, with its console errors and uncaught
    exceptions."""

    def __init__(self, browser):
        self.context = browser.new_context(viewport=VIEWPORT, service_workers="block")
        self.blocked, self.errors = [], []
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()
        self.page.on("console", lambda message: message.type == "error" and self.errors.append(message.text))
        self.page.on("pageerror", lambda error: self.errors.append(f"uncaught: {error}"))
        self.page.on("requestfailed", lambda request: self.errors.append(f"failed request: {request.url}"))

    def _route(self, route):
        if route.request.url.startswith(("file:", "data:", "blob:", "about:")):
            route.continue_()
        else:
            self.blocked.append(route.request.url)
            route.abort()

    def open(self, path: Path):
        self.page.goto(Path(path).resolve().as_uri(), wait_until="load")
        self.page.wait_for_timeout(300)
        return self.page

    def problems(self) -> list[str]:
        return self.errors + [f"network request (blocked): {url}" for url in self.blocked]

    def close(self):
        self.context.close()


@pytest.fixture
def offline(browser):
    pages = []

    def make():
        pages.append(OfflinePage(browser))
        return pages[-1]

    yield make
    for page in pages:
        page.close()


PLOTS_DRAWN = """() => Array.from(document.querySelectorAll('.js-plotly-plot')).map(gd => ({
    traces: (gd.data || []).filter(t => t.visible !== false).length,
    full: (gd._fullData || []).length,
    drawn: gd.querySelectorAll('.scatterlayer .trace, .barlayer .trace, .heatmaplayer .hm, .imagelayer image').length,
}))"""
# the traces as plotly holds them after drawing: name, axis and the points (x, y), for the line figures
TRACES = """() => { const gd = document.querySelector('.js-plotly-plot');
    return gd._fullData.map(t => ({name: t.name, xaxis: t.xaxis, type: t.type,
        x: Array.from(t.x || []), y: Array.from(t.y || [])})); }"""
# a data point (a non-empty heatmap cell) of the first hoverable trace, in page pixels, scrolled into view
POINT = """() => { const gd = document.querySelector('.js-plotly-plot');
    const t = gd._fullData.find(t => t.visible === true && t.hoverinfo !== 'skip' && t.x && t.x.length);
    if (t.type === 'bar') {  // the tallest bar drawn: grouped bars sit beside their category's centre
        const bars = Array.from(gd.querySelectorAll('.barlayer .point path'));
        const tallest = bars.reduce((a, b) => b.getBBox().height > a.getBBox().height ? b : a);
        tallest.scrollIntoView({block: 'center'});
        const box = tallest.getBoundingClientRect();
        return [box.left + box.width / 2, box.top + box.height / 2];
    }
    const xa = gd._fullLayout[t.xaxis.replace('x', 'xaxis')], ya = gd._fullLayout[t.yaxis.replace('y', 'yaxis')];
    const pixel = (axis, value, index) => axis.type === 'category'
        ? axis.l2p(axis._categoriesMap && value in axis._categoriesMap ? axis._categoriesMap[value] : index)
        : axis.l2p(axis.d2l(value));
    let i = Math.floor(t.x.length / 2), j = i;
    if (t.type === 'heatmap') {
        const cells = [];
        t.z.forEach((row, r) => row.forEach((z, c) => { if (z !== null && !Number.isNaN(z)) cells.push([c, r]); }));
        [i, j] = cells[Math.floor(cells.length / 2)];
    } else {
        while (i > 0 && (t.y[i] === null || Number.isNaN(t.y[i]))) i--;
        j = i;
    }
    const at = () => { const box = gd.getBoundingClientRect();
        return [box.left + xa._offset + pixel(xa, t.x[i], i), box.top + ya._offset + pixel(ya, t.y[j], j)]; };
    window.scrollBy(0, at()[1] - window.innerHeight / 2);
    return at(); }"""


def check_plotly_page(page, name: str) -> list[str]:
    """Plotly drew every trace of every plot on the page, and hovering a data point shows a tooltip."""
    failures = []
    try:
        page.wait_for_function("() => document.querySelectorAll('.js-plotly-plot .main-svg').length > 0",
                               timeout=15_000)
    except Exception:  # noqa: BLE001 (reported below with the page's errors)
        return [f"{name}: plotly drew nothing"]
    plots = page.evaluate(PLOTS_DRAWN)
    for i, plot in enumerate(plots):
        if not plot["traces"] or plot["full"] < plot["traces"] or plot["drawn"] < plot["traces"]:
            failures.append(f"{name}: plot {i} has {plot['traces']} traces, drew {plot['drawn']}")
    x, y = page.evaluate(POINT)
    page.mouse.move(x, y)
    try:
        page.wait_for_selector(".hoverlayer .hovertext", timeout=3_000)
    except Exception:  # noqa: BLE001
        failures.append(f"{name}: no tooltip when hovering a data point at ({x:.0f}, {y:.0f})")
    page.mouse.move(1, 1)
    return failures


def expected_layer_series(out: Path) -> dict:
    """01's SnapKV series per (protocol, window) from its CSV: the mean hit rate over samples at each layer, the
    way notebook 01 summarizes it."""
    table = pd.read_csv(out / "figures" / "01_hit_rate_along_generation.csv")
    snap = table[table.reference == "snapkv"]
    return {key: group.groupby("layer").hit_rate.mean() for key, group in snap.groupby(["protocol", "window"])}


def check_layer_lines(traces: list[dict], layers: set, name: str) -> list[str]:
    """Every line of a per-layer figure spans every layer once, in order, with y in [0, 1]."""
    failures = []
    for trace in traces:
        if trace["type"] != "scatter" or not trace["y"]:
            continue
        label = f"{name}: series {trace['name']!r} ({trace['xaxis']})"
        if trace["x"] != sorted(layers):
            failures.append(f"{label} covers layers {trace['x']}, not each of {sorted(layers)} once in order")
        y = np.array(trace["y"], dtype=float)
        if np.nanmin(y) < 0 or np.nanmax(y) > 1:
            failures.append(f"{label} has y outside [0, 1]: {y.min():.2f} to {y.max():.2f}")
    return failures


def check_depth_lines(traces: list[dict], layers: dict, name: str) -> list[str]:
    """Every line of the cross-model depth figure spans its model's layers once, in order, from depth 0 to 1,
    with y in [0, 1] (trace names are "MODEL, SET"; layers: model -> layer count)."""
    failures = []
    for trace in traces:
        if trace["type"] != "scatter" or not trace["y"]:
            continue
        model = trace["name"].rsplit(", ", 1)[0]
        label = f"{name}: series {trace['name']!r} ({trace['xaxis']})"
        expected = list(np.arange(layers[model]) / (layers[model] - 1)) if model in layers else None
        if expected is None or len(trace["x"]) != len(expected) or not np.allclose(trace["x"], expected):
            failures.append(f"{label} has depths {trace['x']}, not its model's {layers.get(model)} layers from 0 to 1")
        y = np.array(trace["y"], dtype=float)
        if np.nanmin(y) < 0 or np.nanmax(y) > 1:
            failures.append(f"{label} has y outside [0, 1]: {np.nanmin(y):.2f} to {np.nanmax(y):.2f}")
    return failures


def test_index_page_is_complete_offline_and_links_the_screenshots(quick_run, offline):
    out, _ = quick_run
    (out / SCREENSHOTS).mkdir(exist_ok=True)
    browser_page = offline()
    page = browser_page.open(out / "index.html")
    assert not browser_page.problems(), browser_page.problems()
    findings = page.locator("#findings + p + ul li")
    assert findings.count() >= 5 and page.locator("#findings + p + ul li.missing").count() == 0
    assert page.locator("#findings").evaluate("h => h.compareDocumentPosition(document.querySelector('table')) & 4")
    broken = page.evaluate("() => Array.from(document.images).filter(i => !i.complete || !i.naturalWidth)"
                           ".map(i => i.src)")
    assert page.locator("img").count() >= len(list((out / "figures").glob("*.png"))) and not broken, broken
    page.screenshot(path=str(out / SCREENSHOTS / "index.png"), full_page=False)
    assert write_index(out)  # the page links the screenshots of this session
    text = (out / "index.html").read_text()
    assert f"{SCREENSHOTS}/index.png" in text


def test_every_interactive_figure_draws_offline_with_tooltips(quick_run, offline):
    out, _ = quick_run
    figures = sorted((out / "figures").glob("*.html"))
    assert {p.stem for p in figures} == {p.stem for p in (out / "figures").glob("*.json")} and len(figures) >= 16
    second = sorted((out / "models").glob("*/figures/*.html"))  # a second model's pass (reproduce.MODEL_PASSES)
    failures = []
    for path in figures + second:
        browser_page = offline()
        page = browser_page.open(path)
        label = path.relative_to(out).as_posix()
        failures += [f"{label}: {problem}" for problem in browser_page.problems()]
        failures += check_plotly_page(page, label)
        if path.stem in LAYER_LINE_FIGURES and not browser_page.problems():
            layers = set(pd.read_csv(path.parent / "01_hit_rate_along_generation.csv").layer)
            failures += check_layer_lines(page.evaluate(TRACES), layers, label)
        if path.stem in DEPTH_LINE_FIGURES and not browser_page.problems():
            depth = pd.read_csv(path.with_suffix(".csv"))
            failures += check_depth_lines(page.evaluate(TRACES), depth.groupby("model").layers.first().to_dict(),
                                          label)
        if path.parent == out / "figures" and path.stem in ("01_hit_rate_along_generation", *DEPTH_LINE_FIGURES,
                                                            "12_needle_by_model", "12_suite_by_model"):
            (out / SCREENSHOTS).mkdir(exist_ok=True)
            page.evaluate("window.scrollTo(0, 0)")
            page.screenshot(path=str(out / SCREENSHOTS / f"{path.stem}.png"))
        browser_page.close()
    write_index(out)  # links the screenshot
    assert not failures, "\n".join(failures)
    assert f"{SCREENSHOTS}/01_hit_rate_along_generation.png" in (out / "index.html").read_text()


def test_hit_rate_figure_plots_each_series_at_its_own_layers(quick_run, offline):
    """01's interactive figure: one trace per (protocol, series), the SnapKV series equal to the CSV's means."""
    out, _ = quick_run
    browser_page = offline()
    page = browser_page.open(out / "figures" / "01_hit_rate_along_generation.html")
    assert not browser_page.problems(), browser_page.problems()
    page.wait_for_function("() => document.querySelector('.js-plotly-plot')?._fullData", timeout=15_000)
    traces = page.evaluate(TRACES)
    table = pd.read_csv(out / "figures" / "01_hit_rate_along_generation.csv")
    protocols = table.protocol.nunique()
    snap_rows = table.reference == "snapkv"
    series = table[snap_rows].window.nunique() + table[~snap_rows].reference.nunique()
    assert len(traces) == protocols * series
    expected = expected_layer_series(out)
    protocol_of_axis = dict(zip(sorted({t["xaxis"] for t in traces}), sorted(table.protocol.unique())))
    snap = [t for t in traces if t["name"].startswith("SnapKV")]
    assert len(snap) == len(expected)
    windows = sorted(table.window.unique())
    for axis, protocol in protocol_of_axis.items():  # series "SnapKV, tokens A-B", in the order of A: the windows
        ordered = sorted((t for t in snap if t["xaxis"] == axis),
                         key=lambda t: int(t["name"].split()[-1].split("-")[0]))
        for trace, window in zip(ordered, windows, strict=True):
            means = expected[(protocol, window)]
            assert trace["x"] == sorted(means.index), trace["name"]
            np.testing.assert_allclose(trace["y"], means.loc[trace["x"]].to_numpy(), atol=1e-9,
                                       err_msg=f"{protocol}: {trace['name']}")


def test_an_executed_notebook_page_draws_its_plotly_output_offline(quick_run, offline):
    out, _ = quick_run
    browser_page = offline()
    page = browser_page.open(out / NOTEBOOK_PAGE)
    assert not browser_page.problems(), browser_page.problems()
    assert not check_plotly_page(page, NOTEBOOK_PAGE)
    assert page.locator(".js-plotly-plot").count() >= 1
    assert page.locator("progress").count() >= 1  # tqdm's bars, drawn from the saved widget state
