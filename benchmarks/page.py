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
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from .common import REPO, median

GOAL_PAGE_S = 1.0
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

    from rcpu.appstate import EXPLORER_METHODS

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
