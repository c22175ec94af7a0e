"""Every page of the app under ``streamlit.testing.v1.AppTest`` (no browser).

The app starts on a small calibration set here (``RCPU_APP_*`` variables, see
docs/app.md) so that a layer's statistics take about a second.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
import streamlit as st
import torch
from streamlit.testing.v1 import AppTest

REPO = Path(__file__).resolve().parent.parent
APP = str(REPO / "app.py")
TIMEOUT = 180
BAD_MODEL = "no/such/model!"

pytestmark = pytest.mark.slow  # the pages load the embedded model


@pytest.fixture(autouse=True)
def small_app(monkeypatch):
    """Small app defaults, fresh Streamlit caches, one torch thread (the suite shares 2 cores)."""
    for name, value in (("CALIB_SAMPLES", "4"), ("SEQ_LEN", "128"), ("HELDOUT_SAMPLES", "2"), ("LAYER", "1"),
                        ("EVAL_WINDOWS", "2")):
        monkeypatch.setenv(f"RCPU_APP_{name}", value)
    st.cache_data.clear()
    st.cache_resource.clear()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    st.cache_data.clear()
    st.cache_resource.clear()


def open_page(page: str | None = None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    if page:
        at.switch_page(page).run()
    return at


def ok(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def _decode(value):
    if isinstance(value, dict) and "bdata" in value:
        return np.frombuffer(base64.b64decode(value["bdata"]), value["dtype"]).tolist()
    return value


def charts(at: AppTest) -> list[dict]:
    """Plotly figures on the page, as dicts, with binary arrays decoded to lists."""
    out = []
    for el in at.get("plotly_chart"):
        fig = json.loads(el.proto.spec)
        for trace in fig["data"]:
            for key in ("x", "y"):
                if key in trace:
                    trace[key] = _decode(trace[key])
        out.append(fig)
    return out


def chart(at: AppTest, title_start: str) -> dict:
    found = [f for f in charts(at) if f["layout"]["title"]["text"].startswith(title_start)]
    assert found, [f["layout"]["title"]["text"] for f in charts(at)]
    return found[0]


def set_model(at: AppTest, name: str) -> AppTest:
    return at.sidebar.text_input(key="model").set_value(name).run()


# --- Home --------------------------------------------------------------------


def test_home_shows_the_model_card():
    at = open_page()
    ok(at)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Layers"] == "30" and metrics["Heads / KV heads"] == "9 / 3"
    assert len(at.get("page_link")) == 5  # Learn, Layer explorer, Whole model, Perplexity vs ratio, Paper
    # the regime note: tokens per input dimension and what to expect (4 x 128 tokens, hidden size 576)
    assert any("512 calibration tokens for 576 input dimensions" in i.value for i in at.info)


def test_home_bad_model_is_an_error_not_a_traceback():
    at = set_model(open_page(), BAD_MODEL)
    assert not at.exception
    assert any("unknown model" in e.value for e in at.error)


def test_missing_text_file_is_an_error():
    at = open_page()
    at.sidebar.radio(key="text_source").set_value("local path").run()
    at.sidebar.text_input(key="text_path").set_value("/nonexistent/calibration.txt").run()
    assert not at.exception
    assert any("not found" in e.value for e in at.error)


# --- Learn -------------------------------------------------------------------


def test_learn_renders_and_reacts():
    at = open_page("pages/learn.py")
    ok(at)
    before = chart(at, "Outputs after removing input dimension 3")
    assert len(at.get("plotly_chart")) == 3
    assert len(at.latex) >= 4 and len(at.get("page_link")) >= 1
    at.radio(key="learn_removed_2").set_value(0).run()
    ok(at)
    after = chart(at, "Outputs after removing input dimension 1")
    pruned = lambda fig: next(t for t in fig["data"] if t.get("name") == "pruned")["x"]
    assert pruned(before) != pruned(after)
    at.radio(key="learn_dims").set_value(3).run()
    ok(at)
    assert any(t["type"] == "scatter3d" for t in chart(at, "Outputs after removing")["data"])


def test_learn_bad_model_shows_an_error():
    at = open_page("pages/learn.py")
    set_model(at, BAD_MODEL)
    assert not at.exception
    assert any("unknown model" in e.value for e in at.error)
    assert charts(at)  # the page itself needs no model


# --- Layer explorer ------------------------------------------------------------


def kept_count(at: AppTest) -> int:
    fig = chart(at, "Score and variance per input dimension")
    kept = [t for t in fig["data"] if t.get("legendgroup") == "kept" and t.get("yaxis", "y") == "y"]
    return len(kept[0]["x"])


def test_explorer_renders_and_caches_statistics(tmp_cache):
    at = open_page("pages/layer_explorer.py")
    ok(at)
    assert len(at.get("plotly_chart")) >= 4
    assert list((tmp_cache / "stats").glob("layer001-*.npz")), "statistics were not cached on disk"
    fig = chart(at, "Score and variance per input dimension")
    assert sum(len(t["x"]) for t in fig["data"] if t.get("yaxis", "y") == "y") == 576  # o_proj d_in


def test_rounding_and_the_paper_protocol_from_the_sidebar():
    at = open_page("pages/layer_explorer.py")
    assert kept_count(at) == 7 * 64  # 20 % of 9 heads to the nearest: 2 go
    at.sidebar.radio(key="rounding").set_value("truncate").run()
    ok(at)
    assert kept_count(at) == 8 * 64  # int(0.2 * 9) = 1 goes, as in the authors' code
    at.sidebar.radio(key="rounding").set_value("nearest").run()
    at.sidebar.button(key="paper_protocol").click().run()
    ok(at)
    assert (at.session_state["calib_samples"], at.session_state["seq_len"], at.session_state["rounding"]) == (
        128, 128, "truncate")
    assert kept_count(at) == 8 * 64
    assert any("28.4 per input dimension" in c.value for c in at.caption)


def test_explorer_ratio_changes_the_figures():
    at = open_page("pages/layer_explorer.py")
    before = kept_count(at)
    at.slider(key="le_ratio").set_value(0.5).run()
    ok(at)
    after = kept_count(at)
    assert before == 7 * 64 and after == 4 * 64  # 9 heads: 2 pruned at 20 %, 5 at 50 % (half up)


def test_explorer_methods_and_views():
    at = open_page("pages/layer_explorer.py")
    at.radio(key="le_view").set_value("📉 Error").run()
    ok(at)
    names = chart(at, "Relative output error")["data"][0]["x"]
    # the default score is RCPU's: "none" is not Wanda-sp, "bias" not FLAP, and the pruned outputs are one bar
    assert names == ["none", "bias", "least squares", "rotation (RCPU)"]
    table = at.dataframe[0].value
    assert list(table["method"]) == names
    assert not (table.astype(str) == "None").any().any()  # missing values are "–", not "None"
    at.selectbox(key="le_score").set_value("wanda_sp").run()
    ok(at)
    assert chart(at, "Relative output error")["data"][0]["x"] == [
        "none (Wanda-sp)", "bias", "least squares", "rotation"]
    at.multiselect(key="le_methods").set_value(["rotation_scale", "ridge"]).run()
    ok(at)
    assert chart(at, "Relative output error")["data"][0]["x"] == ["uncompensated", "rotation + scale", "ridge"]
    assert len(chart(at, "Singular values of M")["data"]) == 1
    for view in ("🧭 Principal directions", "📐 Geometry"):
        at.radio(key="le_view").set_value(view).run()
        ok(at)
        assert len(at.get("plotly_chart")) == 3


def test_explorer_layer_and_sublayer_change_the_data():
    at = open_page("pages/layer_explorer.py")
    at.radio(key="le_view").set_value("📉 Error").run()
    first = chart(at, "Relative output error")["data"][1]["y"]
    at.number_input(key="le_layer").set_value(0).run()
    ok(at)
    second = chart(at, "Relative output error")["data"][1]["y"]
    assert first != second
    at.radio(key="le_sublayer").set_value("down_proj").run()
    ok(at)
    at.radio(key="le_view").set_value("📊 Scores").run()
    fig = chart(at, "Score and variance per input dimension")
    score_row = [t for t in fig["data"] if t.get("yaxis", "y") == "y"]
    # down_proj's 1536 columns: the kept ones one line through every kept column, the pruned ones markers
    # (those hidden under another in the same 2-px cell are not drawn); the legend counts all of them
    counts = {t["legendgroup"]: int(t["name"].split("(")[1].rstrip(")")) for t in score_row}
    assert counts["kept"] + counts["pruned"] == 1536
    kept = next(t for t in score_row if t["legendgroup"] == "kept")
    assert kept["mode"] == "lines" and len(kept["x"]) == counts["kept"]


def test_explorer_too_little_text_is_an_error(tmp_path, tmp_cache):
    short = tmp_path / "short.txt"
    short.write_text("Only a few words of calibration text.\n")
    at = open_page("pages/layer_explorer.py")
    at.sidebar.radio(key="text_source").set_value("local path").run()
    at.sidebar.text_input(key="text_path").set_value(str(short)).run()
    assert not at.exception
    assert any("tokens" in e.value for e in at.error)


def test_explorer_bad_model_shows_an_error():
    at = open_page("pages/layer_explorer.py")
    set_model(at, BAD_MODEL)
    assert not at.exception
    assert any("unknown model" in e.value for e in at.error)
    assert not at.get("plotly_chart")


# --- Whole model and perplexity vs ratio ------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from apphelp import tiny_model_dir

    return str(tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model"))


def layer_errors(at: AppTest) -> list:
    fig = chart(at, "Relative output error per layer")
    return [t["y"] for t in fig["data"]]


@pytest.mark.parametrize("page", ["pages/whole_model.py", "pages/perplexity.py"])
def test_run_pages_render_on_the_embedded_defaults_without_running(page, tmp_cache):
    at = open_page(page)
    ok(at)
    assert len(at.get("plotly_chart")) == 1
    assert not list(tmp_cache.glob("results/*.json"))  # nothing was computed just by opening the page


@pytest.mark.parametrize("page", ["pages/whole_model.py", "pages/perplexity.py"])
def test_run_pages_bad_model_shows_an_error(page):
    at = set_model(open_page(page), BAD_MODEL)
    assert not at.exception
    assert any("unknown model" in e.value for e in at.error)


def test_whole_model_run_updates_chart_metrics_and_downloads(tiny_model, tmp_cache):
    at = set_model(open_page("pages/whole_model.py"), tiny_model)
    ok(at)
    at.button(key="run_prune").click().run()
    ok(at)
    first = layer_errors(at)
    assert all(len(series) == 2 for series in first)  # two layers, every series
    metrics = {m.label: m.value for m in at.metric}
    assert {"Parameters", "Perplexity before", "Perplexity after"} <= set(metrics)
    assert len(at.get("download_button")) == 2

    # The JSON download and ``rcpu prune --json`` on the same settings: same keys, same values.
    from rcpu.cli import main

    downloaded = at.session_state["whole_model_run"]["report"].to_json()
    out = tmp_cache / "prune.json"
    assert main(["prune", "--model", tiny_model, "--calib-samples", "4", "--seq-len", "128",
                 "--heldout-samples", "2", "--eval-windows", "2", "--json", str(out)]) == 0
    from_cli = json.loads(out.read_text())
    assert set(from_cli) == set(downloaded)
    timings = ("timing_s", "eval_tokens_per_s")
    # the same code on the same thread count: bit-for-bit equal
    assert {k: v for k, v in from_cli.items() if k not in timings} == {
        k: v for k, v in downloaded.items() if k not in timings}
    assert set(from_cli["timing_s"]) == set(downloaded["timing_s"])
    at.slider(key="wm_ratio").set_value(0.5).run()
    assert any("earlier run" in w.value for w in at.warning)
    at.button(key="run_prune").click().run()
    ok(at)
    assert layer_errors(at) != first
    assert not at.warning


def test_whole_model_greedy_run_says_which_spread_it_chose_and_on_what(tiny_model, tmp_cache):
    at = set_model(open_page("pages/whole_model.py"), tiny_model)
    at.radio(key="wm_allocation").set_value("greedy").run()
    at.button(key="run_prune").click().run()
    ok(at)
    spread = at.session_state["whole_model_run"]["report"].to_json()["allocated"]["spread"]
    assert spread["chosen"] in (1.0, 1.5, 2.0, 2.5) and spread["heldback_windows"] >= 1
    assert spread["heldback_nll"][f"{spread['chosen']:g}"] == min(spread["heldback_nll"].values())
    assert any(f"{spread['heldback_windows']} held-back calibration windows" in c.value
               and f"more than {spread['chosen']:g}x the uniform count" in c.value for c in at.caption)
    heat = chart(at, "Ratio removed per layer and module")
    assert len(heat["data"][0]["z"]) == 2  # o_proj and down_proj, one row each


def test_whole_model_shows_what_pruning_buys(tiny_model, tmp_cache):
    at = set_model(open_page("pages/whole_model.py"), tiny_model)
    at.button(key="run_prune").click().run()
    ok(at)
    sizes = at.session_state["whole_model_run"]["footprint"]
    bars = chart(at, "What pruning buys")["data"][0]
    assert bars["y"] == ["parameters", "attention parameters", "bytes of weights", "KV-cache bytes per token"]
    assert bars["x"][0] == sizes["pruned"]["params"] / sizes["dense"]["params"] < 1
    at.button(key="measure_speed").click().run()
    ok(at)
    bars = chart(at, "What pruning buys")["data"][0]
    assert bars["y"][-2:] == ["forward tokens/s", "generation tokens/s"]
    assert all(v > 0 for v in bars["x"])
    assert any(e.label.startswith("Measured by the size benchmark") for e in at.expander)


def test_perplexity_sweep_computes_then_reads_the_cache(tiny_model, tmp_cache):
    at = set_model(open_page("pages/perplexity.py"), tiny_model)
    at.multiselect(key="pv_configs").set_value(["rcpu:rotation", "wanda_sp:none"]).run()
    at.multiselect(key="pv_ratios").set_value([0.1, 0.3]).run()
    ok(at)
    assert chart(at, "Perplexity against pruning ratio")["data"] == []
    at.button(key="compute_points").click().run()
    ok(at)
    fig = chart(at, "Perplexity against pruning ratio")
    lines = {t["name"]: t["x"] for t in fig["data"] if not t["name"].startswith("dense")}
    assert lines == {"rcpu:rotation": [0.1, 0.3], "wanda_sp:none": [0.1, 0.3]}
    assert len(list((tmp_cache / "results").glob("point-*.json"))) == 4
    # the axes frame every point and the dense line; no stale caption, button or progress after computing
    ppl = [y for t in fig["data"] for y in t["y"]]
    lo, hi = fig["layout"]["yaxis"]["range"]
    if fig["layout"]["yaxis"].get("type") == "log":
        lo, hi = 10 ** lo, 10 ** hi
    assert lo <= min(ppl) and max(ppl) <= hi
    assert not any("points cached" in c.value for c in at.caption)
    assert not [b for b in at.button if b.key == "compute_points"]
    assert any("computed and cached" in s.value for s in at.success)
    assert len(at.get("download_button")) == 1

    # A new ratio: the four cached points are drawn at once, two are missing.
    at.multiselect(key="pv_ratios").set_value([0.1, 0.2, 0.3]).run()
    ok(at)
    lines = {t["name"]: t["x"] for t in chart(at, "Perplexity against pruning ratio")["data"]
             if not t["name"].startswith("dense")}
    assert lines == {"rcpu:rotation": [0.1, 0.3], "wanda_sp:none": [0.1, 0.3]}
    assert "Compute 2 points" in at.button(key="compute_points").label
    assert not at.success

    # The calibration-size view.
    at.radio(key="pv_view").set_value("🧪 Calibration size").run()
    at.multiselect(key="pv_sizes").set_value([2, 4]).run()
    at.button(key="compute_points").click().run()
    ok(at)
    fig = chart(at, "Perplexity against calibration size")
    assert {tuple(t["x"]) for t in fig["data"] if not t["name"].startswith("dense")} == {(2, 4)}


# --- Issue 16: what a lecturer and a researcher ran into ----------------------------


def test_explorer_shows_the_effective_ratio_and_the_regime():
    at = open_page("pages/layer_explorer.py")
    ok(at)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Pruned heads (effective ratio)"] == "2 / 9 = 22%"
    at.slider(key="le_ratio").set_value(0.25).run()  # rounds to the same two heads: says so
    assert {m.label: m.value for m in at.metric}["Pruned heads (effective ratio)"] == "2 / 9 = 22%"
    assert any("per dimension" in i.value for i in at.info)
    at.sidebar.button(key="lecture_preset").click().run()
    ok(at)
    from rcpu.regime import LECTURE_PRESET

    assert at.sidebar.number_input(key="calib_samples").value == LECTURE_PRESET["calib_samples"]
    assert any("few tokens per dimension" in i.value for i in at.info)


def no_duplicate_legend_entries(at: AppTest) -> None:
    """No chart names two series alike (the same outputs drawn twice under two names looked like two)."""
    for fig in charts(at):
        names = [t.get("name") for t in fig["data"] if t.get("name") and t.get("showlegend", True)
                 and t.get("type") not in ("heatmap", "box")]
        assert len(names) == len(set(names)), (fig["layout"]["title"]["text"], names)


def test_explorer_views_have_no_duplicate_series():
    at = open_page("pages/layer_explorer.py")
    for view in ("📊 Scores", "🧭 Principal directions", "📐 Geometry", "📉 Error"):
        at.radio(key="le_view").set_value(view).run()
        ok(at)
        no_duplicate_legend_entries(at)


def test_explorer_principal_directions_and_geometry_say_what_to_look_for():
    at = open_page("pages/layer_explorer.py")
    at.radio(key="le_view").set_value("🧭 Principal directions").run()
    ok(at)
    fig = chart(at, "Alignment with Y's top")
    assert [t["name"] for t in fig["data"]] == ["pruned Z = none", "bias", "least squares", "rotation (RCPU)"]
    assert any("What to look for" in c.value for c in at.caption)
    at.radio(key="le_view").set_value("📐 Geometry").run()
    ok(at)
    assert any("norm ratio and Gram distortion are exactly those of no compensation" in c.value
               for c in at.caption)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("le_layer", 99, "Layer 99 does not exist: this model has layers 0 to 29"),
    ("seq_len", 1_000_000, "sequence length must be between"),
    ("seq_len", 9000, "longer than this model's context"),
])
def test_bad_inputs_are_one_line_errors(key, value, message):
    at = open_page("pages/layer_explorer.py")
    at.number_input(key=key).set_value(value).run()
    assert not at.exception
    assert any(message in e.value for e in at.error), [e.value for e in at.error]
    assert not at.get("plotly_chart")  # not the old result under the error


def test_whole_model_run_is_a_sweep_point_and_stop_keeps_partial_results(tiny_model, tmp_cache):
    at = set_model(open_page("pages/whole_model.py"), tiny_model)
    at.button(key="run_prune").click().run()
    ok(at)
    run = at.session_state["whole_model_run"]
    cfg, records = run["config"], run["report"].result.layers
    # accounting per unit kind and per module
    units = at.dataframe[0].value
    assert list(units["units"]) == ["attention heads", "KV heads", "MLP channels"]
    modules = at.dataframe[1].value
    assert {"q_proj", "o_proj", "down_proj"} <= set(modules["module"])
    assert "bfloat16" in at.selectbox(key="wm_zip_dtype").options

    # Stop mid-run leaves the records of the layers done: the page shows them with a "stopped" note.
    at.session_state["whole_model_partial"] = {"config": cfg, "layers": records[:1]}
    at.run()
    assert any("Stopped: 1 of 2 layers" in w.value for w in at.warning)
    partial = [f for f in charts(at) if f["layout"]["title"]["text"].startswith("Relative output error per layer")]
    assert partial and all(len(t["y"]) == 1 for t in partial[0]["data"])

    # The same configuration on the sweep page: cached, nothing to compute.
    at.switch_page("pages/perplexity.py").run()
    at.multiselect(key="pv_configs").set_value([f"{cfg.score}:{cfg.method}"]).run()
    at.multiselect(key="pv_ratios").set_value([cfg.ratio]).run()
    ok(at)
    assert not [b for b in at.button if b.key == "compute_points"]
    lines = [t for t in chart(at, "Perplexity against pruning ratio")["data"] if not t["name"].startswith("dense")]
    assert lines and lines[0]["y"] == [pytest.approx(run["report"].pruned["ppl"])]
