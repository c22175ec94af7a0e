"""Layer-explorer page updates: the page's whole script rerun under Streamlit's ``AppTest``.

The issue's goal is that changing the ratio, the score or the methods on a layer
whose statistics are cached updates the page in under a second. This runs the real
page (sidebar, analysis, figures, Streamlit's serialisation of every element) on
the app's default methods, with the layer's statistics already in memory, and
times each rerun after one widget change. What it does not time is the browser
drawing the Plotly charts it receives.

Each change goes to settings not seen before (ratios and scores never repeat within
a sublayer), so nothing comes from the page's in-memory store of analyses.
"""

from __future__ import annotations

import itertools
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from .common import REPO, median

GOAL_PAGE_S = 0.5  # issue: the page's slowest view, median rerun with four methods
GOAL_BROWSER_S = 1.5  # issue: median widget change to idle page in headless Chromium, browser included
VIEWS = ("📊 Scores", "🧭 Principal directions", "📐 Geometry", "📉 Error")
PASSES = 2  # over the views, each time with new settings
# Two new ratios per view and pass (0.2 is the page's start); then a new score at the last of them.
RATIOS = (0.1, 0.15, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.05)
SCORES = ("wanda_sp", "fluctuation", "magnitude", "rcpu")


@contextmanager
def _environment(values: dict):
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _check(at, what: str) -> None:
    problems = [e.value for e in at.exception] + [e.value for e in at.error]
    if problems:
        raise RuntimeError(f"layer explorer page failed after {what}: {problems[0]}")


def _timed_run(at, what: str) -> float:
    start = time.perf_counter()
    at.run()
    seconds = time.perf_counter() - start
    _check(at, what)
    return seconds


def page_update(lm, calib_samples: int, seq_len: int, layer: int) -> dict:
    """Rerun times of the layer explorer after single widget changes, per sublayer and view."""
    from streamlit.testing.v1 import AppTest

    from rcpu.explorer import DEFAULT_METHODS as EXPLORER_METHODS

    env = {"RCPU_APP_CALIB_SAMPLES": str(calib_samples), "RCPU_APP_SEQ_LEN": str(seq_len),
           "RCPU_APP_HELDOUT_SAMPLES": "8", "RCPU_APP_LAYER": str(layer)}
    with tempfile.TemporaryDirectory(prefix="rcpu-page-") as tmp, _environment(env):
        model = "embedded"
        if lm.name != "embedded":  # a model only in memory (tiny mode): the app loads it from a folder
            model = str(Path(tmp) / "model")
            lm.model.save_pretrained(model)
            lm.tokenizer.save_pretrained(model)
        at = AppTest.from_file(str(REPO / "app.py"), default_timeout=900).run()
        if model != "embedded":
            at.sidebar.text_input(key="model").set_value(model).run()
        at.switch_page("pages/layer_explorer.py").run()
        _check(at, "opening it")
        out = {"methods": list(EXPLORER_METHODS), "layer": layer, "sublayers": {}}
        for sub in ("down_proj", "o_proj"):
            at.radio(key="le_sublayer").set_value(sub)
            first = _timed_run(at, f"choosing {sub}")  # statistics from memory or disk, basis, first analysis
            ratios, scores = iter(RATIOS), itertools.cycle(SCORES)
            views = {view: {"view_switch_s": [], "changes": []} for view in VIEWS}
            for _ in range(PASSES):
                for view in VIEWS:
                    at.radio(key="le_view").set_value(view)
                    views[view]["view_switch_s"].append(_timed_run(at, f"choosing the view {view}"))
                    changes = views[view]["changes"]
                    for _ in range(2):
                        ratio = next(ratios)
                        at.slider(key="le_ratio").set_value(ratio)
                        changes.append({"change": f"ratio {ratio}", "s": _timed_run(at, f"ratio {ratio}")})
                    score = next(scores)
                    at.selectbox(key="le_score").set_value(score)
                    changes.append({"change": f"score {score}", "s": _timed_run(at, f"score {score}")})
            for v in views.values():
                v["median_s"] = median([c["s"] for c in v["changes"]])
            out["sublayers"][sub] = {"first_s": first, "views": views}
    every = [c["s"] for s in out["sublayers"].values() for v in s["views"].values() for c in v["changes"]]
    out["median_s"] = median(every)
    out["max_s"] = max(every)
    out["worst_view_median_s"] = max(v["median_s"] for s in out["sublayers"].values() for v in s["views"].values())
    return out


def page_update_fresh(mode: str, layer: int) -> dict:
    """``page_update`` on ``mode``'s model and calibration sizes in a fresh process (``common.run_fresh``)."""
    from .common import last_json_line, run_fresh

    return {**last_json_line(run_fresh(["benchmarks.page", "--update", mode, str(layer)])), "fresh": True}


# In a real browser ---------------------------------------------------------------------

SCRIPT_STATE = "document.querySelector('[data-testid=stApp]')?.getAttribute('data-test-script-state')"
LONG_TASKS = """() => { window.__rcpuLongTasks = [];
  new PerformanceObserver(list => { for (const e of list.getEntries()) window.__rcpuLongTasks.push(e.duration); })
    .observe({type: 'longtask'}); }"""
SUBLAYER_LABELS = {"down_proj": "down_proj (channels)", "o_proj": "o_proj (heads)"}


def browser_missing() -> str | None:
    """Why the browser benchmarks cannot run here (playwright or Debian's Chromium missing), or None."""
    sys.path.insert(0, str(REPO / "tests"))  # apphelp: the browser recipes the app's tests use
    try:
        from apphelp import CHROMIUM
        from playwright.sync_api import sync_playwright  # noqa: F401
    except ImportError as exc:
        return f"playwright is missing ({exc})"
    return None if CHROMIUM.exists() else f"{CHROMIUM} is missing"


@contextmanager
def served_page(env: dict, path: str):
    """``streamlit run`` with ``env`` and a headless Chromium page opened at ``path``; yields the page
    (check ``browser_missing`` first)."""
    from apphelp import launch_browser, live_server
    from playwright.sync_api import sync_playwright

    with live_server(env, timeout=300) as url, sync_playwright() as p:
        browser = launch_browser(p)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(f"{url}/{path}")
            yield page
        finally:
            browser.close()


def wait_run(page, timeout_ms: int, polling_ms: int = 5) -> None:
    """Wait until a script run has started and finished, then for two drawn frames."""
    page.wait_for_function(f"() => {SCRIPT_STATE} === 'running'", polling=5, timeout=10_000)
    page.wait_for_function(f"() => {SCRIPT_STATE} !== 'running'", polling=polling_ms, timeout=timeout_ms)
    page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")


def _timed_key(page, key: str) -> dict:
    return _timed(page, lambda: page.keyboard.press(key))


def _timed(page, action) -> dict:
    """A widget change (``action``) until the page is idle again, and the browser's busy time."""
    page.evaluate("() => { window.__rcpuLongTasks = []; }")
    start = time.perf_counter()
    action()
    wait_run(page, 120_000)
    seconds = time.perf_counter() - start
    page.wait_for_timeout(300)  # late long tasks of the same update (WebGL draws)
    busy = page.evaluate("() => window.__rcpuLongTasks.reduce((a, b) => a + b, 0)") / 1000
    if page.locator('[data-testid="stException"]').count():
        raise RuntimeError("the layer explorer showed an exception in the browser")
    return {"s": seconds, "browser_busy_s": busy}


def browser_update(calib_samples: int, seq_len: int, layer: int) -> dict:
    """Key press on the ratio slider until the page is idle again, in headless Chromium.

    The server and the browser share the machine's cores, as they do when the app runs
    on the user's own computer. ``browser_busy_s`` is the browser's main-thread time in
    tasks over 50 ms (Plotly drawing, React) during the update.
    """
    missing = browser_missing()
    if missing:
        return {"skipped": missing}
    from apphelp import wait_idle

    env = {"RCPU_APP_CALIB_SAMPLES": str(calib_samples), "RCPU_APP_SEQ_LEN": str(seq_len),
           "RCPU_APP_HELDOUT_SAMPLES": "8", "RCPU_APP_LAYER": str(layer)}
    out: dict = {"sublayers": {}}
    with served_page(env, "layer_explorer") as page:
        page.wait_for_function(f"() => {SCRIPT_STATE} === 'notRunning' && "
                               "document.querySelectorAll('[data-testid=stPlotlyChart]').length >= 3",
                               polling=100, timeout=900_000)
        page.evaluate(LONG_TASKS)
        slider = page.locator('[data-testid="stSlider"] input[type="range"]').first
        for sub, key in (("down_proj", "ArrowRight"), ("o_proj", "ArrowLeft")):  # new ratios for each
            page.get_by_text(SUBLAYER_LABELS[sub]).click()
            wait_idle(page, 900_000)
            views = {}
            for i, view in enumerate(VIEWS):
                if i == 0:  # already shown after choosing the sublayer? click and wait without timing
                    page.get_by_text(view).click()
                    wait_idle(page)
                    changes = []
                else:  # a view switch is a widget change too
                    changes = [{**_timed(page, page.get_by_text(view).click), "change": f"view {view}"}]
                for _ in range(2):
                    slider.focus()
                    changes.append({**_timed_key(page, key), "change": f"ratio {key}"})
                views[view] = {"changes": changes, "median_s": median([c["s"] for c in changes]),
                               "median_browser_busy_s": median([c["browser_busy_s"] for c in changes])}
            out["sublayers"][sub] = {"views": views}
    every = [c for s in out["sublayers"].values() for v in s["views"].values() for c in v["changes"]]
    out["median_s"] = median([c["s"] for c in every])
    out["median_browser_busy_s"] = median([c["browser_busy_s"] for c in every])
    return out


def draw_costs(repeats: int = 4) -> dict:
    """Milliseconds of one Plotly ``newPlot`` (what Streamlit does on every change of a chart's figure) in
    headless Chromium, for SVG (``scatter``) and WebGL (``scattergl``) charts of two traces of 5, 200 and
    800 markers each: the median of ``repeats``. What ``rcpu.figures`` chooses between."""
    import json
    import tempfile

    import numpy as np
    import plotly

    missing = browser_missing()
    if missing:
        return {"skipped": missing}
    from apphelp import launch_browser
    from playwright.sync_api import sync_playwright

    script = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    rng = np.random.default_rng(0)
    figures = {}
    for kind in ("scatter", "scattergl"):
        for n in (5, 200, 800):
            data = [{"type": kind, "mode": "markers", "x": rng.random(n).tolist(), "y": rng.random(n).tolist(),
                     "marker": {"size": 4}} for _ in range(2)]
            figures[f"{kind} 2 x {n}"] = json.dumps({"data": data, "layout": {"width": 640, "height": 420}})
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as p:
        html = Path(tmp) / "draw.html"
        html.write_text(f"<html><head><script src='{script.as_uri()}'></script></head>"
                        "<body><div id=d style='width:640px'></div></body></html>")
        browser = launch_browser(p)
        page = browser.new_page()
        page.goto(html.as_uri())
        for _ in range(repeats):
            for name, spec in figures.items():
                ms = page.evaluate("""async (spec) => {
                    const d = document.getElementById('d'); const f = JSON.parse(spec);
                    const t0 = performance.now(); await Plotly.newPlot(d, f.data, f.layout);
                    await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
                    const t1 = performance.now(); Plotly.purge(d); return t1 - t0; }""", spec)
                out.setdefault(name, []).append(ms)
        browser.close()
    return {name: round(median(times), 1) for name, times in out.items()}


def main() -> None:
    """``python -m benchmarks.page``: the browser measurement alone (quick settings: 32 x 512 tokens,
    layer 15) and the cost of drawing one chart (``draw_costs``), written to
    ``benchmarks/results/browser.json``; docs/app.md quotes it."""
    import json
    import platform

    from .common import settings_for

    settings = settings_for("quick")
    result = browser_update(settings.calib_samples, settings.seq_len, settings.explorer_layer)
    result["draw_ms"] = draw_costs()
    result["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(),
                         "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                         "load_average": [round(x, 2) for x in os.getloadavg()]}  # others' work on the machine
    out = REPO / "benchmarks" / "results" / "browser.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    every = [c for s in result.get("sublayers", {}).values() for v in s["views"].values() for c in v["changes"]]
    print(f"{len(every)} widget changes (ratio steps and view switches): median {result.get('median_s', 0):.2f} s "
          f"to an idle page, browser busy {result.get('median_browser_busy_s', 0):.2f} s; wrote {out}")
    print("one Plotly newPlot, ms: " + ", ".join(f"{k} {v}" for k, v in result["draw_ms"].items()))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--update"]:  # page_update_fresh's process
        import json

        from .common import load_lm, settings_for

        settings = settings_for(sys.argv[2])
        print(json.dumps(page_update(load_lm(settings), settings.calib_samples, settings.seq_len, int(sys.argv[3]))))
    else:
        main()
