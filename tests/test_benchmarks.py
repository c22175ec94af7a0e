"""The benchmark code runs end to end on a tiny setting (no timing is asserted)."""

from __future__ import annotations

import json
import re

import pytest

from benchmarks import BENCHMARKS
from benchmarks.__main__ import main
from benchmarks.common import DOCS_PATH, RESULTS_DIR, goal, settings_for
from benchmarks.explorer import compensation_flops
from benchmarks.svg import line_chart


def test_all_tiny_writes_results_and_docs(tmp_cache, tmp_path, capsys):
    results, docs = tmp_path / "results", tmp_path / "docs" / "benchmarks.md"
    real = {p: p.stat().st_mtime_ns for p in [DOCS_PATH, *RESULTS_DIR.glob("*.json")] if p.exists()}

    assert main(["all", "--tiny", "--results-dir", str(results), "--docs", str(docs)]) == 0

    out = capsys.readouterr().out
    for name in BENCHMARKS:
        result = json.loads((results / f"{name}.json").read_text())
        assert result["mode"] == "tiny"
        assert result["machine"]["nproc"] >= 1 and result["machine"]["torch_threads"] >= 1
        for g in result["goals"]:
            assert g["met"] in (True, False, None)
            assert g["name"] in out  # every goal is printed with its verdict
    floor = json.loads((results / "floor.json").read_text())
    assert set(floor["prune_split_s"]) == {"statistics", "compensation", "recompute", "other"}
    memory = json.loads((results / "memory.json").read_text())
    assert memory["runs"]["2"]["maxrss"] > 0 and memory["runs"]["4"]["samples"] == 4
    evaluation = json.loads((results / "eval.json").read_text())
    assert evaluation["ppl_relative_difference"] < 1e-3  # both loops compute the same perplexity
    page = json.loads((results / "explorer.json").read_text())["page_update"]
    assert set(page["sublayers"]) == {"down_proj", "o_proj"}
    for sub in page["sublayers"].values():  # the real page reran after every change, without an error
        assert len(sub["views"]) == 4 and all(len(v["changes"]) == 6 for v in sub["views"].values())
    quality = json.loads((results / "quality.json").read_text())
    assert {r["config"] for r in quality["curve"]["rows"]} == {"rcpu:rotation", "rcpu:ls"}
    auto = json.loads((results / "auto.json").read_text())
    for table in auto["tables"].values():  # every fixed method, auto and auto + greedy at every ratio
        assert len(table["rows"]) == 8 * 3
    # one regime alone: the other keeps its table (and its date) from the previous result
    assert main(["auto", "--tiny", "--regime", "paper tokens per dimension", "--results-dir", str(results),
                 "--docs", str(docs)]) == 0
    again = json.loads((results / "auto.json").read_text())
    assert again["tables"]["default"] == auto["tables"]["default"]  # rows and the date it was measured
    remeasured = again["tables"]["paper tokens per dimension"]["rows"]  # this time from the point cache
    assert len(remeasured) == 8 * 3 and all(row["cached"] for row in remeasured)
    assert {g["name"].split(" ratio")[0] for g in again["goals"]} == set(auto["tables"])
    with pytest.raises(SystemExit, match="no regime"):
        main(["auto", "--tiny", "--regime", "nonesuch", "--results-dir", str(results), "--docs", str(docs)])
    size = json.loads((results / "size.json").read_text())
    for m in size["models"].values():  # dense and every ratio, with the shapes the prune records
        dense, rows = m["rows"]["dense"], m["rows"]
        assert set(rows) == {"dense", "0.1", "0.2", "0.3"} and dense["stock_loadable"]
        for row in rows.values():
            assert row["params"] <= dense["params"] and row["disk_bytes"] > 0
            assert row["kv_bytes_per_token"] <= dense["kv_bytes_per_token"]
            assert row["stock_loadable"] or row["why_not_stock"]
            assert row["forward_tokens_per_s"] > 0 and row["generate_tokens_per_s"] > 0
    large = size["models"]["large"]["rows"]["0.2"]
    assert large["o_proj"] == [[64, 48]]  # 6 of 8 heads of 8 columns kept at 0.2 (tiny shapes)
    assert {g["name"].split(":")[0] for g in size["goals"]} >= {"tiny at 0.2", "random-64x1 at 0.2"}

    appcost = json.loads((results / "appcost.json").read_text())
    for turn in appcost["runs"]:  # the page (AppTest: the tiny model) ran the prune inside its own run
        assert turn["how"] == "AppTest" and 0 < turn["app_pipeline_s"] < turn["app_s"] and turn["cli_s"] > 0
    assert all(appcost["thread_check"][k] > 0 for k in ("thread_only_s", "main_s", "thread_after_main_s"))

    text = docs.read_text()
    for heading in ("Pruning cost", "Explorer latency", "Layer explorer page", "Peak memory", "Evaluation throughput",
                    "Quality", "What pruning buys", "Auto compensation and greedy allocation",
                    "The app's whole-model prune against the CLI's"):
        assert heading in text
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert images and all((docs.parent / image).is_file() for image in images)
    # the committed results and summary were not touched
    assert real == {p: p.stat().st_mtime_ns for p in real}


def test_report_only_rewrites_docs(tmp_path):
    docs = tmp_path / "benchmarks.md"
    assert main(["report", "--results-dir", str(tmp_path / "none"), "--docs", str(docs)]) == 0
    assert docs.read_text().startswith("# Benchmarks")


def test_goal_and_flop_count():
    assert goal("x", 1.0, "<=", 1.3)["met"] is True
    assert goal("x", 0.5, ">=", 0.6)["met"] is False
    assert goal("x", None, "<", 1)["met"] is None
    flops = compensation_flops(4096, 11008, 8806)
    assert flops["total"] == sum(v for k, v in flops.items() if k != "total")
    assert settings_for("quick").quality_eval_windows and settings_for("tiny").model == "tiny"


def test_svg_chart_is_small_and_valid():
    svg = line_chart({"a": [(8, 30.0), (32, 20.0)], "b": [(8, 400.0), (32, None)]}, title="t <1>",
                     xlabel="x", ylabel="y", log_x=True, hline=(15.0, "dense"))
    assert svg.startswith("<svg") and svg.rstrip().endswith("</svg>")
    assert "t &lt;1&gt;" in svg and len(svg) < 10_000


def test_kept_greedy_rows_of_the_fixed_cap_rule_are_marked_in_the_table_and_goal():
    from benchmarks.auto import _goals, _mark_earlier_rule

    def row(allocation, ppl, allocated):
        return {"config": "rcpu:auto" + (" [greedy]" if allocation == "greedy" else ""), "method": "auto",
                "allocation": allocation, "ratio": 0.3, "ppl": ppl, "allocated": allocated}

    old = {"rows": [row("uniform", 20.0, {"rule": "uniform"}), row("greedy", 19.0, {"rule": "greedy"})]}
    marked = _mark_earlier_rule(_mark_earlier_rule(old))  # idempotent: a table kept twice is marked once
    assert [r["config"] for r in marked["rows"]] == ["rcpu:auto", "rcpu:auto [greedy] (fixed 2.5x cap)"]
    name = "t ratio 0.3: ppl auto greedy (fixed 2.5x cap) / auto uniform"
    assert [g["name"] for g in _goals(marked["rows"], "t")] == [name]
    new = {"rows": [old["rows"][0], row("greedy", 19.0, {"rule": "greedy", "spread": {"chosen": 1.5}})]}
    assert _mark_earlier_rule(new) == new
    assert _goals(new["rows"], "t")[0]["name"] == "t ratio 0.3: ppl auto greedy / auto uniform"


def test_auto_section_says_when_its_run_only_tabulated_cached_points():
    from benchmarks.report import _auto

    machine = {"nproc": 2, "cpu": "x", "torch": "2", "torch_threads": 2, "load_average": [1, 1, 1]}

    def result(cached: bool) -> dict:
        row = {"config": "rcpu:auto", "method": "auto", "allocation": "uniform", "ratio": 0.1, "ppl": 20.0,
               "seconds": 300.0, "cached": cached}
        table = {"rows": [row], "dense": {"ppl": 19.0}, "calib_samples": 18, "seq_len": 128,
                 "tokens_per_down_proj_input": 1.5, "eval_windows": 16, "date": "D2"}
        older = {**table, "rows": [{**row, "cached": False}], "date": "D1"}  # a table kept from an earlier run
        return {"mode": "quick", "date": "D2", "wall_s": 0.1, "machine": machine, "ratios": [0.1],
                "tables": {"now": table, "kept": older}, "goals": []}

    assert "every point it tabulated was in the cache" in _auto(result(cached=True))[2]
    assert "cache" not in _auto(result(cached=False))[2]
