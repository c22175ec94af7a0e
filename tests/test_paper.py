"""The paper's experiments: the ablation option, the experiment points and tables, ``rcpu reproduce`` end to
end on the embedded model (tiny sizes), zero-shot accuracy through lm-eval on a local task, the Paper page."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import make_tiny_llama
from conftest import random_tokens as _tokens
from conftest import tiny_lm as _lm

from rcpu.cli import main
from rcpu.config import DataConfig, PruneConfig
from rcpu.errors import RcpuError
from rcpu.paper import (
    against_rotation,
    crossover,
    experiment_points,
    published,
    published_table,
    scaled_samples,
    sizes_for,
)
from rcpu.prune import prune_model

TASK = str(Path(__file__).resolve().parent / "data" / "zeroshot" / "tiny_mc.yaml")


# -- the ablation: compensation on chosen sublayers only ---------------------------------------------------------

@pytest.mark.parametrize("compensate", ["none", "attn", "mlp", "both"])
def test_compensate_applies_the_method_to_the_chosen_sublayers_only(compensate):
    model = make_tiny_llama(layers=2, intermediate=40, heads=4, kv_heads=4, hidden=32)
    result = prune_model(_lm(model), DataConfig(seq_len=32, calib_samples=8),
                         PruneConfig(0.3, "both", "rcpu", "rotation", compensate=compensate), tokens=_tokens())
    touched = {"none": (), "attn": ("o_proj",), "mlp": ("down_proj",), "both": ("o_proj", "down_proj")}[compensate]
    for layer in result.layers:
        for sub in ("o_proj", "down_proj"):
            errors = layer[sub]
            assert layer[sub]["pruned_units"] > 0
            if sub in touched:  # rotation lowers the calibration error below no compensation
                assert errors["error_calibration"] < errors["error_uncompensated_calibration"] - 1e-6
            else:  # left alone: the kept weights are W_K exactly
                assert errors["error_calibration"] == pytest.approx(errors["error_uncompensated_calibration"],
                                                                    rel=1e-9)


def test_compensate_is_checked_and_labelled():
    with pytest.raises(RcpuError, match="--compensate"):
        PruneConfig(compensate="o_proj").check()
    assert PruneConfig(compensate="attn").label == "rcpu:rotation [compensate attn]"
    assert PruneConfig().label == "rcpu:rotation"


def test_default_compensate_keeps_cache_keys_of_older_points(tmp_path, monkeypatch):
    """Points cached before ``compensate`` and ``allocation`` existed keep their keys (defaults are left out)."""
    from dataclasses import asdict

    from rcpu.config import EvalConfig
    from rcpu.pipeline import eval_fields, result_path
    from rcpu.sweep import point_path

    monkeypatch.setenv("RCPU_CACHE", str(tmp_path))
    lm, data = _lm(make_tiny_llama()), DataConfig()

    old = asdict(PruneConfig())
    del old["compensate"], old["allocation"]
    expected = result_path("point", {**eval_fields(lm, data, EvalConfig()), "sampling": asdict(data.sampling),
                                     "prune": old})
    assert point_path(lm, data, EvalConfig(), PruneConfig()) == expected
    assert point_path(lm, data, EvalConfig(), PruneConfig(compensate="mlp")) != expected


# -- experiments as points, published data ---------------------------------------------------------------------

def test_experiment_points_follow_the_paper_sizes():
    data = DataConfig()
    paper = sizes_for("paper")
    fig5 = experiment_points("fig5", data, paper)
    assert len(fig5) == 2 * 3 * (11 + 1)  # two sizes x three ratios x (11 lambdas + rotation)
    assert {d.calib_samples for d, _ in fig5} == {128, 512}
    assert {c.lam for _, c in fig5 if c.method == "ls_ridge"} == {10.0 ** k for k in range(-5, 6)}
    fig3 = experiment_points("fig3", data, paper)
    assert {f"{c.score}:{c.method}" for _, c in fig3} == {f"{s}:{m}" for s in ("wanda_sp", "rcpu")
                                                          for m in ("none", "ls", "rotation")}
    ablation = experiment_points("ablation", data, paper)
    assert [c.compensate for _, c in ablation] == ["none", "attn", "mlp", "both"]
    assert all(d.seq_len == 128 and c.rounding == "truncate" for d, c in fig5 + fig3 + ablation)
    assert [d.calib_samples for d, _ in experiment_points("fig2", data, paper)][::3] == [8, 16, 32, 64, 128, 256, 512]


def test_scaled_sizes_match_the_papers_tokens_per_down_proj_input():
    # LLaMA-7B: 128 x 128 tokens over 11008 inputs = 1.49; the embedded model has 1536 inputs
    assert scaled_samples(128, 1536, 128) == 18
    assert scaled_samples(512, 1536, 128) == 71
    assert sizes_for("paper", 1536, scaled=True).fig_samples == (18, 71)
    assert sizes_for("paper", 11008, scaled=True).fig_samples == (128, 512)


def test_published_numbers_are_data_with_their_source():
    data = published()
    assert "source" in data and "method.md" in data["source"]
    table1 = published_table("table1")
    assert table1[0] == {"ratio": 0.2, "wanda_sp:none": 16.70, "fluctuation:bias": 15.36, "rcpu:rotation": 14.40,
                         "rcpu:rotation_scale": 14.55}
    assert {r["compensate"]: r["ppl"] for r in published_table("ablation")} == {
        "none": 16.85, "attn": 15.47, "mlp": 15.76, "both": 14.40}
    assert {r["config"]: r["mean_accuracy"] for r in published_table("table2")}["rcpu:rotation"] == 61.57


def _row(config, tokens, ppl, ratio=0.2):
    return {"config": config, "ratio": ratio, "ppl": ppl, "calibration_tokens_per_input_dim": {"down_proj": tokens}}


def test_crossover_interpolates_where_ls_overtakes_rotation():
    rows = [_row("rcpu:ls", 1, 40.0), _row("rcpu:rotation", 1, 20.0),
            _row("rcpu:ls", 4, 10.0), _row("rcpu:rotation", 4, 20.0)]
    x = crossover(rows)
    # log(ls/rot) goes from log 2 to log 0.5: zero half way in log(tokens)
    assert x == pytest.approx(2.0)
    assert crossover(rows[:2]) is None
    assert crossover([_row("rcpu:ls", 1, 1.0), _row("rcpu:rotation", 1, 2.0)]) is None  # LS ahead everywhere
    assert "overtakes rcpu:rotation at 2.00" in against_rotation(rows, 0.2, "rcpu:ls")
    ahead = [_row("rcpu:ls", 1, 1.0), _row("rcpu:rotation", 1, 2.0), _row("rcpu:ls", 4, 1.0),
             _row("rcpu:rotation", 4, 3.0)]
    assert against_rotation(ahead, 0.2, "rcpu:ls") == "rcpu:ls is ahead of rcpu:rotation at every measured size (2)"
    behind = [_row("rcpu:ls", 1, 3.0), _row("rcpu:rotation", 1, 2.0)]
    assert "stays behind rcpu:rotation at every measured size" in against_rotation(behind, 0.2, "rcpu:ls")


def test_unknown_experiment_and_sizes_are_one_line():
    with pytest.raises(RcpuError, match="unknown experiment"):
        experiment_points("fig9", DataConfig(), sizes_for("tiny"))
    with pytest.raises(RcpuError, match="unknown sizes"):
        sizes_for("huge")


# -- rcpu reproduce end to end on the embedded model (tiny sizes) --------------------------------------------------

# one calibration size and one lambda: every experiment shares its rcpu:rotation point with the others
TINY = ["--sizes", "tiny", "--calib-samples", "2", "--lambdas", "100"]


@pytest.fixture(scope="module")
def paper_cache(tmp_path_factory):
    """One private cache for this module's reproduce and page tests: experiments share points, as they do for
    users, and the page test finds what ``rcpu reproduce ablation`` cached."""
    import os

    from conftest import REAL_CACHE

    root = tmp_path_factory.mktemp("paper") / "cache"
    root.mkdir()
    (REAL_CACHE / "models").mkdir(parents=True, exist_ok=True)
    os.symlink(REAL_CACHE / "models", root / "models")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RCPU_CACHE", str(root))
        yield root


PERPLEXITY_EXPERIMENTS = ["table1", "ablation", "fig2", "fig3", "fig5", "regime"]


@pytest.mark.parametrize("name", PERPLEXITY_EXPERIMENTS)
def test_reproduce_on_a_tiny_model_runs_every_experiment(name, tiny_model_dir, tmp_cache, tmp_path, capsys):
    """Every experiment end to end in seconds (a tiny random LLaMA); the embedded model runs below (slow)."""
    check_reproduce(name, ["--model", str(tiny_model_dir), "--sizes", "tiny"], tmp_path, capsys)


@pytest.mark.slow
@pytest.mark.parametrize("name", PERPLEXITY_EXPERIMENTS)
def test_reproduce_runs_end_to_end_and_resumes_from_the_cache(name, embedded, paper_cache, tmp_path, capsys,
                                                                one_thread):
    # Table 1's four and Fig. 3's six configs run on the tiny model above; here two of them keep the suite's
    # time in bounds (rcpu:rotation is shared with the other experiments through the module's cache).
    part = ["--configs", "wanda_sp:none,rcpu:rotation"] if name in ("table1", "fig3") else []
    check_reproduce(name, TINY + part, tmp_path, capsys)


def check_reproduce(name: str, options: list[str], tmp_path, capsys) -> None:
    out = tmp_path / "out"
    assert main(["reproduce", name, *options, "--out", str(out)]) == 0
    result = json.loads((out / f"{name}.json").read_text())
    assert result["missing"] == 0 and len(result["points"]) == result["total"] > 0
    assert all(math.isfinite(r["ppl"]) and r["ppl"] > 1 for r in result["points"])
    assert result["published"] and result["measured"]
    csv = (out / f"{name}.csv").read_text().splitlines()
    assert csv[0].startswith("config,") and len(csv) == len(result["points"]) + 1
    html = (out / f"{name}.html").read_text()
    assert "plotly" in html.lower() and len(html) > 100_000  # standalone: plotly.js inside
    if name == "ablation":
        ppl = {r["compensate"]: r["ppl"] for r in result["points"]}
        assert set(ppl) == {"none", "attn", "mlp", "both"} and len(set(ppl.values())) == 4
    if name == "fig5":
        assert {r["method"] for r in result["points"]} == {"ls_ridge", "rotation"}
    capsys.readouterr()
    # a second run computes nothing: every point comes from the sweep cache
    assert main(["reproduce", name, *options, "--out", str(out)]) == 0
    again = json.loads((out / f"{name}.json").read_text())
    assert all(r["cached"] for r in again["points"])
    assert [r["ppl"] for r in again["points"]] == [r["ppl"] for r in result["points"]]
    assert "from cache, 0 computed" in capsys.readouterr().out


# -- the regime view: perplexity and layer-level error against tokens per input ------------------------------------

def _regime_rows(heldout: bool = True) -> list[dict]:
    """Sweep rows as ``run_experiment('regime')`` returns them: four configs (two lambdas of LS + ridge) at
    two calibration sizes, each with two layers' errors; LS overfits at the small size."""
    rows = []
    for samples, tokens in ((18, 1.5), (71, 5.9)):
        for config, lam, ppl, err in (("rcpu:ls", 1.0, 31.0 if samples == 18 else 24.0, 0.6 if samples == 18 else 0.2),
                                      ("rcpu:ls_ridge", 0.01, 30.0, 0.5), ("rcpu:ls_ridge", 100.0, 28.0, 0.35),
                                      ("rcpu:rotation", 1.0, 29.0 if samples == 18 else 26.0, 0.3),
                                      ("rcpu:rotation_scale", 1.0, 28.5, 0.29)):
            score, method = config.split(":")
            split = {"error_calibration": err / 3, "error_uncompensated_calibration": 0.4}
            if heldout:
                split.update(error_heldout=err, error_uncompensated_heldout=0.45)
            rows.append({"config": config if method != "ls_ridge" else f"{config} λ={lam:g}", "score": score,
                         "method": method, "lambda": lam, "ratio": 0.2, "calib_samples": samples, "ppl": ppl,
                         "tokens_per_down_input": tokens,
                         "calibration_tokens_per_input_dim": {"down_proj": tokens},
                         "layer_errors": [{"layer": i, "o_proj": dict(split), "down_proj": dict(split)}
                                          for i in range(2)]})
    return rows


def test_regime_figure_draws_the_methods_the_papers_positions_and_the_layer_error():
    from rcpu.figures import paper_figure
    from rcpu.paper import layer_error_curve

    result = {"experiment": "regime", "points": _regime_rows(), "dense": {"ppl": 20.0},
              "ls_overtakes_rotation_at": {"0.2": {"rcpu:ls": 3.0}}}
    fig = paper_figure(result, current=2.5).to_plotly_json()
    panels = {}
    for trace in fig["data"]:
        panels.setdefault(trace.get("xaxis", "x"), {})[trace["name"]] = trace
    methods = {"LS", "LS + ridge (best λ)", "rotation", "rotation + scale"}
    assert set(panels["x"]) == methods  # left: perplexity
    assert set(panels["x2"]) == methods | {"no compensation"}  # right: the layer-level error
    assert list(panels["x"]["LS"]["x"]) == [1.5, 5.9] and list(panels["x"]["LS"]["y"]) == [31.0, 24.0]
    assert list(panels["x"]["LS + ridge (best λ)"]["y"]) == [28.0, 28.0]  # the best of the two lambdas
    assert list(panels["x2"]["LS"]["y"]) == pytest.approx([0.6, 0.2])  # held-out, mean over the layers
    assert list(panels["x2"]["no compensation"]["y"]) == pytest.approx([0.45, 0.45])
    titles = [a["text"] for a in fig["layout"]["annotations"]]
    assert "down_proj held-out relative error, mean over layers" in titles
    lines = {round(s["x0"], 2) for s in fig["layout"]["shapes"]}
    assert {round(128 * 128 / 11008, 2), round(512 * 128 / 11008, 2), 2.5, 3.0} <= lines  # 1.49, 5.95, current
    assert any(t.startswith("LLaMA-7B, 128 x 128: 1.5") for t in titles)
    assert "current settings: 2.5" in titles and "LS overtakes rotation: 3" in titles
    # points without held-out errors: the calibration (in-sample) error, said so, never mixed with held-out ones
    mixed = _regime_rows(heldout=False) + _regime_rows()[:1]
    assert layer_error_curve(mixed)["split"] == "calibration"
    fig = paper_figure({**result, "points": _regime_rows(heldout=False)}, current=2.5).to_plotly_json()
    assert "down_proj calibration (in-sample) relative error, mean over layers" in [
        a["text"] for a in fig["layout"]["annotations"]]
    curve = layer_error_curve([{k: v for k, v in r.items() if k != "layer_errors"} for r in _regime_rows()])
    assert curve == {"split": None, "rows": [], "without_errors": 10}  # points cached before: left out


# -- zero-shot accuracy through lm-evaluation-harness -------------------------------------------------------------

def test_task_names_offline_are_one_clear_line(capsys):
    assert main(["zeroshot", "--tasks", "boolq"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "offline" in err and "--tasks path/to/task.yaml" in err


def test_local_task_offline_in_memory_and_saved_folder(embedded, tmp_cache, tmp_path, monkeypatch, one_thread):
    """A tiny local multiple-choice task, offline, on the model in memory and on a saved copy of it."""
    pytest.importorskip("lm_eval")
    import socket

    from rcpu.models import load_model
    from rcpu.zeroshot import zeroshot_accuracy

    def no_network(*args, **kwargs):
        raise AssertionError("zero-shot evaluation reached for the network")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    in_memory = zeroshot_accuracy(embedded.model, embedded.tokenizer, [TASK])
    assert list(in_memory["tasks"]) == ["tiny_mc"] and in_memory["examples"]["tiny_mc"] == 6
    assert 0.5 <= in_memory["mean_accuracy"] <= 1.0  # the easy questions: better than chance
    folder = tmp_path / "saved"
    embedded.model.save_pretrained(folder)
    embedded.tokenizer.save_pretrained(folder)
    saved = load_model(str(folder))
    assert zeroshot_accuracy(saved.model, saved.tokenizer, [TASK]) == in_memory


@pytest.mark.slow
def test_zeroshot_command_prunes_in_memory_and_caches(embedded, tmp_cache, tmp_path, capsys, one_thread):
    pytest.importorskip("lm_eval")
    out = tmp_path / "z.json"
    args = ["zeroshot", "--tasks", TASK, "--ratio", "0.2", "--calib-samples", "2", "--seq-len", "32",
            "--json", str(out)]
    assert main(args) == 0
    first = json.loads(out.read_text())
    assert first["config"] == "rcpu:rotation" and not first["cached"] and 0 <= first["mean_accuracy"] <= 1
    assert main(args) == 0
    assert json.loads(out.read_text())["cached"] and "(cached)" in capsys.readouterr().out


# -- the Paper page reuses the cache -------------------------------------------------------------------------------

def test_paper_page_shows_cached_points_without_recomputing(tiny_model_dir, tmp_cache, tmp_path, monkeypatch,
                                                             one_thread):
    """``rcpu reproduce ablation`` caches its points; the Paper page then shows every one of them, with the
    same perplexities, and nothing is pruned or evaluated again (the workflow is replaced by a trap)."""
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    import rcpu.pipeline
    import rcpu.sweep

    model = str(tiny_model_dir)
    assert main(["reproduce", "ablation", "--model", model, "--sizes", "tiny", "--out", str(tmp_path)]) == 0
    measured = json.loads((tmp_path / "ablation.json").read_text())
    calls = []
    monkeypatch.setattr(rcpu.sweep, "prune_and_evaluate", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(rcpu.pipeline, "prune_and_evaluate", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(rcpu.pipeline, "perplexity", lambda *a, **k: calls.append(a))
    monkeypatch.setenv("RCPU_APP_PAPER_SIZES", "tiny")
    st.cache_data.clear()
    st.cache_resource.clear()
    at = AppTest.from_file(str(Path(__file__).resolve().parent.parent / "app.py"), default_timeout=180).run()
    at.sidebar.text_input(key="model").set_value(model).run()
    at.switch_page("pages/paper.py").run()
    at.radio(key="pp_experiment").set_value("ablation").run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    assert calls == []
    figures = [json.loads(el.proto.spec) for el in at.get("plotly_chart")]
    assert any(f["layout"]["title"]["text"].startswith("Ablation") for f in figures)
    tables = [df.value for df in at.dataframe]
    shown = {round(v, 6) for df in tables[1:] if "ppl" in df for v in df["ppl"]}
    assert {round(r["ppl"], 6) for r in measured["points"]} == shown  # the measured table: all four, cached
    assert {r["ppl"] for r in published_table("ablation")} <= set(tables[0]["ppl"])  # beside the published
    assert not any("Compute" in b.label for b in at.button)  # nothing is missing
    assert any("All 4 points cached" in c.value for c in at.caption)
    st.cache_data.clear()
    st.cache_resource.clear()


def test_experiment_points_are_the_sweeps_points(tmp_path, monkeypatch):
    """``rcpu sweep`` with the paper's settings and ``rcpu reproduce`` share cache entries point for point."""
    from rcpu.config import EvalConfig, SweepConfig
    from rcpu.sweep import point_path

    monkeypatch.setenv("RCPU_CACHE", str(tmp_path))
    lm, data = _lm(make_tiny_llama()), DataConfig(seq_len=128)
    sizes = sizes_for("quick")
    mine = experiment_points("regime", data, sizes, configs=("rcpu:ls", "rcpu:rotation"))
    assert {f"{c.score}:{c.method}" for _, c in mine} == {"rcpu:ls", "rcpu:rotation"}
    sweep = SweepConfig(ratios=(0.2,), configs=(("rcpu", "ls"), ("rcpu", "rotation")),
                        calib_samples=sizes.regime_samples, rounding="truncate").points(data)
    evaluation = EvalConfig(None, sizes.eval_windows)
    assert {point_path(lm, d, evaluation, c) for d, c in mine} == {point_path(lm, d, evaluation, c) for d, c in sweep}
    with pytest.raises(RcpuError, match="no point"):
        experiment_points("table1", data, sizes, configs=("rcpu:ls",))


@pytest.mark.slow
def test_reproduce_table2_on_a_local_task(tiny_model_dir, tmp_cache, tmp_path, capsys):
    """Table 2 end to end: the dense model and each config at 20% through lm-eval, offline, then from the cache."""
    pytest.importorskip("lm_eval")
    args = ["reproduce", "table2", "--model", str(tiny_model_dir), "--sizes", "tiny", "--tasks", TASK,
            "--configs", "wanda_sp:none,rcpu:rotation", "--out", str(tmp_path)]  # two of its five configs
    assert main(args) == 0
    result = json.loads((tmp_path / "table2.json").read_text())
    assert [r["config"] for r in result["points"]] == ["dense", "wanda_sp:none", "rcpu:rotation"]
    assert all(0 <= r["mean_accuracy"] <= 1 and r["examples"]["tiny_mc"] == 6 for r in result["points"])
    assert (tmp_path / "table2.html").exists() and (tmp_path / "table2.csv").read_text().startswith("config,")
    assert main(args) == 0
    assert all(r["cached"] for r in json.loads((tmp_path / "table2.json").read_text())["points"])
    assert main(["reproduce", "table2", "--model", str(tiny_model_dir), "--tasks", "boolq"]) == 2
    assert "offline" in capsys.readouterr().err


def _open_paper_page(model_dir, experiment: str):
    """A fresh app session (Streamlit's caches cleared) on the Paper page with ``model_dir`` and ``experiment``."""
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    st.cache_data.clear()
    st.cache_resource.clear()
    at = AppTest.from_file(str(Path(__file__).resolve().parent.parent / "app.py"), default_timeout=300).run()
    at.sidebar.text_input(key="model").set_value(str(model_dir)).run()
    at.switch_page("pages/paper.py").run()
    at.radio(key="pp_experiment").set_value(experiment).run()
    return at


def test_paper_page_computes_table2_on_a_local_task_then_reads_the_cache(tiny_model_dir, tmp_cache, monkeypatch,
                                                                          one_thread):
    """The Table 2 view: the tiny local task is the default, Compute runs the dense model and one config through
    lm-eval (the route of ``rcpu reproduce table2``), and a fresh page shows the same accuracies from the cache with
    lm-eval and pruning replaced by traps. A task given by name is the library's one offline line, no traceback."""
    pytest.importorskip("lm_eval")
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    import rcpu.prune
    import rcpu.zeroshot

    monkeypatch.setenv("RCPU_APP_PAPER_SIZES", "tiny")

    def open_table2() -> AppTest:
        at = _open_paper_page(tiny_model_dir, "table2")
        assert at.text_input(key="pp_tasks").value == TASK  # the repository's tiny task by default
        at.multiselect(key="pp_t2_configs").set_value(["rcpu:rotation"]).run()
        assert not at.exception, [e.value for e in at.exception]
        assert not at.error, [e.value for e in at.error]
        return at

    def measured(at: AppTest) -> dict:
        df = next(df.value for df in at.dataframe if "mean_accuracy" in df.value and "tiny_mc (%)" in df.value)
        return dict(zip(df["config"], df["mean_accuracy"]))

    at = open_table2()
    assert any("0 of 2 results cached" in c.value for c in at.caption)
    at.button(key="paper_t2_compute").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    assert any("All 2 results computed" in s.value for s in at.success)
    first = measured(at)
    assert list(first) == ["dense", "rcpu:rotation"] and all(0 <= v <= 100 for v in first.values())
    published = next(df.value for df in at.dataframe if "mean_accuracy" in df.value and "tiny_mc (%)" not in df.value)
    assert published["mean_accuracy"].tolist() == [r["mean_accuracy"] for r in published_table("table2")]
    figure = json.loads(at.get("plotly_chart")[-1].proto.spec)
    assert figure["layout"]["title"]["text"].startswith("Table 2")

    calls = []
    monkeypatch.setattr(rcpu.zeroshot, "zeroshot_accuracy", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(rcpu.prune, "prune_model", lambda *a, **k: calls.append(a))
    at = open_table2()
    assert calls == [] and measured(at) == first  # at once, from the cache
    assert not any(b.key == "paper_t2_compute" for b in at.button)
    assert any("All 2 results cached" in c.value for c in at.caption)

    at.text_input(key="pp_tasks").set_value("boolq").run()  # a task by name: the one offline line
    assert not at.exception, [e.value for e in at.exception]
    assert len(at.error) == 1 and "offline" in at.error[0].value and "Task files field" in at.error[0].value
    assert calls == []
    st.cache_data.clear()
    st.cache_resource.clear()


def test_paper_page_computes_the_regime_with_held_out_layer_errors(tiny_model_dir, tmp_cache, monkeypatch,
                                                                   one_thread):
    """The regime view computes its points from the page (tiny sizes), draws both panels with the held-out layer
    error and the sidebar's setting marked, and a fresh page shows them from the cache (pruning is a trap)."""
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    import rcpu.pipeline
    import rcpu.sweep

    monkeypatch.setenv("RCPU_APP_PAPER_SIZES", "tiny")

    def open_regime() -> AppTest:
        at = _open_paper_page(tiny_model_dir, "regime")
        assert not at.exception, [e.value for e in at.exception]
        assert not at.error, [e.value for e in at.error]
        return at

    def regime_figure(at: AppTest) -> dict:
        return next(f for f in (json.loads(el.proto.spec) for el in at.get("plotly_chart"))
                    if f["layout"]["title"]["text"].startswith("Regime"))

    at = open_regime()
    at.button(key="paper_compute").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    assert any("All 10 points computed" in s.value for s in at.success)
    fig = regime_figure(at)
    right = {t["name"] for t in fig["data"] if t.get("xaxis") == "x2"}
    assert right == {"LS", "LS + ridge (best λ)", "rotation", "rotation + scale", "no compensation"}
    assert "down_proj held-out relative error, mean over layers" in [a["text"] for a in fig["layout"]["annotations"]]
    current = at.session_state["calib_samples"] * at.session_state["seq_len"] / 64  # the sidebar's; 64 inputs
    assert any(math.isclose(s["x0"], current) for s in fig["layout"]["shapes"])

    calls = []
    monkeypatch.setattr(rcpu.sweep, "prune_and_evaluate", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(rcpu.pipeline, "perplexity", lambda *a, **k: calls.append(a))
    at = open_regime()
    assert calls == [] and any("All 10 points cached" in c.value for c in at.caption)
    assert regime_figure(at)["data"] == fig["data"]
    st.cache_data.clear()
    st.cache_resource.clear()
