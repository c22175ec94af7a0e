"""rcpu prune / eval / sweep end to end (tiny model for speed; the embedded one where it matters)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from rcpu import pipeline as pipeline_module
from rcpu.cli import main

FAST = ["--calib-samples", "2", "--seq-len", "64", "--heldout-samples", "1", "--eval-windows", "2"]


def test_prune_save_eval_roundtrip(tiny_model_dir, tmp_cache, tmp_path, capsys):
    out, report = tmp_path / "pruned", tmp_path / "prune.json"
    assert main(["prune", "--model", str(tiny_model_dir), "--ratio", "0.34", "--out", str(out),
                 "--json", str(report), *FAST]) == 0
    pruned = json.loads(report.read_text())
    for key in ("ppl", "ppl_dense", "params_before", "params_after", "eval_tokens", "seq_len", "timing_s",
                "ratio", "score", "method", "targets", "seed", "data", "layers"):
        assert key in pruned, key
    assert pruned["params_after"] < pruned["params_before"]
    assert len(pruned["layers"]) == 2 and pruned["layers"][0]["o_proj"]["pruned_units"] == 2
    config = json.loads((out / "config.json").read_text())
    assert config["rcpu"]["score"] == "rcpu" and config["rcpu"]["method"] == "rotation"

    ev = tmp_path / "eval.json"
    assert main(["eval", "--model", str(out), "--seq-len", "64", "--eval-windows", "2", "--json", str(ev)]) == 0
    evaluated = json.loads(ev.read_text())
    # The saved model, evaluated on the same held-out windows, gives the in-memory perplexity.
    assert evaluated["ppl"] == pytest.approx(pruned["ppl"], rel=1e-5)
    assert evaluated["params_after"] == pruned["params_after"]
    assert evaluated["params_before"] == pruned["params_before"]
    assert evaluated["ppl_dense"] == pytest.approx(pruned["ppl_dense"], rel=1e-9)  # the source model, same windows

    # An existing output is never overwritten without --overwrite.
    capsys.readouterr()
    assert main(["prune", "--model", str(tiny_model_dir), "--out", str(out), *FAST]) == 2
    assert "already exists" in capsys.readouterr().err


def test_greedy_prune_reports_totals_and_its_spread_and_refuses_too_few_windows(tiny_model_dir, tmp_cache,
                                                                                  tmp_path, capsys):
    report = tmp_path / "greedy.json"
    args = ["prune", "--model", str(tiny_model_dir), "--ratio", "0.34", "--allocation", "greedy", *FAST]
    assert main(args) == 2  # two calibration windows: none can be held back, refused before any work
    assert "at least 4 calibration windows" in capsys.readouterr().err
    assert main([*args, "--calib-samples", "4", "--json", str(report)]) == 0
    out = capsys.readouterr().out
    allocated = json.loads(report.read_text())["allocated"]
    removed = [r["o_proj"]["pruned_units"] for r in json.loads(report.read_text())["layers"]]
    assert f"{sum(removed)} of {sum(allocated['o_proj']['units'])} heads in all layers" in out
    assert f"lowest loss on the {allocated['spread']['heldback_windows']} held-back calibration windows" in out


def test_sweep_twice_computes_nothing_the_second_time(tiny_model_dir, tmp_cache, tmp_path, monkeypatch):
    args = ["sweep", "--model", str(tiny_model_dir), "--ratios", "0,0.34", "--configs",
            "rcpu:rotation,wanda_sp:none", *FAST, "--json", str(tmp_path / "a.json"), "--csv", str(tmp_path / "a.csv")]
    assert main(args) == 0
    first = json.loads((tmp_path / "a.json").read_text())
    assert len(first["points"]) == 4 and not any(p["cached"] for p in first["points"])
    zero = [p for p in first["points"] if p["ratio"] == 0]
    assert all(p["ppl"] == first["dense"]["ppl"] for p in zero)  # ratio 0 is the dense model exactly

    def refuse(*a, **k):
        raise AssertionError("a cached sweep point was recomputed")

    monkeypatch.setattr(pipeline_module, "prune_model", refuse)
    monkeypatch.setattr(pipeline_module, "perplexity", refuse)
    args[-3] = str(tmp_path / "b.json")
    assert main(args) == 0
    second = json.loads((tmp_path / "b.json").read_text())
    assert all(p["cached"] for p in second["points"])
    assert [p["ppl"] for p in second["points"]] == [p["ppl"] for p in first["points"]]
    csv = (tmp_path / "a.csv").read_text().splitlines()
    assert csv[0].startswith("config,") and len(csv) == 5


def test_interrupted_sweep_resumes(tiny_model_dir, tmp_cache, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = pipeline_module.prune_model

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(pipeline_module, "prune_model", flaky)
    args = ["sweep", "--model", str(tiny_model_dir), "--ratios", "0.34,0.5", "--configs", "rcpu:rotation", *FAST,
            "--json", str(tmp_path / "s.json")]
    assert main(args) == 130  # interrupted during the second point
    monkeypatch.setattr(pipeline_module, "prune_model", real)
    assert main(args) == 0
    result = json.loads((tmp_path / "s.json").read_text())
    assert [p["cached"] for p in result["points"]] == [True, False]


def test_calibration_size_sweep_and_shifted_eval_text(tiny_model_dir, tmp_cache, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text(" ".join(f"word{i % 97} and more text number {i}." for i in range(3000)))
    out = tmp_path / "c.json"
    assert main(["sweep", "--model", str(tiny_model_dir), "--ratios", "0.34", "--configs", "rcpu:ls",
                 "--calib-samples", "1,2", "--seq-len", "64", "--heldout-samples", "1",
                 "--eval-data", str(other), "--eval-windows", "2", "--json", str(out)]) == 0
    points = json.loads(out.read_text())["points"]
    assert [p["calib_samples"] for p in points] == [1, 2]
    assert all(p["eval_data"] == str(other) for p in points)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["prune", "--ratio", "1.0"], "ratio must be in [0, 1)"),
        (["prune", "--score", "nope"], "unknown score"),
        (["prune", "--method", "nope"], "unknown method"),
        (["sweep", "--configs", "rcpu"], "SCORE:METHOD"),
        (["sweep", "--ratios", "0.1,x"], "comma-separated"),
        (["eval", "--model", "not-a-model"], "unknown model"),
    ],
)
def test_bad_whole_model_inputs_fail_in_one_line(argv, message):
    proc = subprocess.run([sys.executable, "-m", "rcpu", *argv], capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("rcpu: error:") and message in lines[0], proc.stderr


def test_paper_protocol_is_a_preset_that_explicit_options_override(tiny_model_dir, tmp_cache, tmp_path):
    out = tmp_path / "paper.json"
    assert main(["prune", "--model", str(tiny_model_dir), "--protocol", "paper", "--ratio", "0.3",
                 "--calib-samples", "2", "--heldout-samples", "1", "--eval-windows", "2", "--json", str(out)]) == 0
    paper = json.loads(out.read_text())
    assert (paper["seq_len"], paper["rounding"], paper["targets"]) == (128, "truncate", "both")
    assert paper["calib_samples"] == 2  # given explicitly: the preset does not override it
    assert paper["eval_tokens"] == 2 * 127  # perplexity windows of the protocol's 128 tokens
    # int(0.3 * 6) = 1 head goes, where the nearest count is 2; int(0.3 * 64) = 19 channels
    assert paper["units_pruned"] == {"o_proj": 1, "down_proj": 19}
    assert paper["calibration_tokens_per_input_dim"]["down_proj"] == pytest.approx(2 * 128 / 64)
    assert main(["prune", "--model", str(tiny_model_dir), "--ratio", "0.3", *FAST, "--json", str(out)]) == 0
    assert json.loads(out.read_text())["units_pruned"] == {"o_proj": 2, "down_proj": 19}


def test_sweep_takes_a_lambda_axis_for_ls_ridge(tiny_model_dir, tmp_cache, tmp_path):
    out = tmp_path / "lambdas.json"
    assert main(["sweep", "--model", str(tiny_model_dir), "--ratios", "0.34", "--configs",
                 "rcpu:ls_ridge,rcpu:rotation", "--lambdas", "1e-4,1e6", *FAST, "--json", str(out)]) == 0
    points = json.loads(out.read_text())["points"]
    assert [(p["method"], p["lambda"]) for p in points] == [("ls_ridge", 1e-4), ("ls_ridge", 1e6),
                                                           ("rotation", 1e-4)]
    assert len({p["config"] for p in points}) == 3
    assert points[0]["ppl"] != points[1]["ppl"]


def test_evaluation_text_equal_to_the_calibration_text_means_its_held_out_part(tiny_model_dir, tmp_cache,
                                                                                tmp_path):
    """The same text under another path is found by content: evaluation never sees calibration windows."""
    from rcpu.text import _embedded_text

    copy = tmp_path / "same.txt"
    copy.write_text(_embedded_text())
    outs = []
    for extra in ([], ["--eval-data", str(copy)]):
        out = tmp_path / f"run{len(outs)}.json"
        assert main(["prune", "--model", str(tiny_model_dir), "--ratio", "0.34", *FAST, *extra,
                     "--json", str(out)]) == 0
        outs.append(json.loads(out.read_text()))
    assert outs[1]["eval_data"] == outs[0]["eval_data"] == "embedded (held-out part)"
    assert outs[1]["ppl"] == outs[0]["ppl"]
