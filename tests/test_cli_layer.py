"""``rcpu layer`` end to end on the embedded model, and its one-line user errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rcpu import cli
from rcpu.compensate import METHODS

REPO = Path(__file__).resolve().parent.parent
SMALL = ["--layer", "2", "--calib-samples", "4", "--seq-len", "128", "--heldout-samples", "2"]
ROTATIONS = {"rotation", "rotation_scale", "rotation_so", "rotation_bias", "rotation_diag"}
SHAPES = {"o_proj": (576, 576), "down_proj": (576, 1536)}  # (d_out, d_in) of SmolLM2-135M
HEAD_DIM = 64


pytestmark = pytest.mark.usefixtures("one_thread")


def strict_json(text: str) -> dict:
    """Parse JSON, refusing NaN / Infinity (not valid JSON for other readers)."""

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture
def use_embedded(embedded, monkeypatch):
    """In-process runs reuse the session's loaded model instead of loading it per call."""
    monkeypatch.setattr(cli.args, "load", lambda data: embedded)
    return embedded


def run_layer(tmp_path: Path, capsys, *args: str) -> tuple[dict, str]:
    out = tmp_path / "result.json"
    rc = cli.main(["layer", *SMALL, *args, "--json", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "Traceback" not in captured.err
    assert f"wrote {out}" in captured.out
    return strict_json(out.read_text()), captured.out


def check_report(r: dict, sublayer: str, method: str) -> None:
    d_out, d_in = SHAPES[sublayer]
    for key in (
        "layer",
        "sublayer",
        "ratio",
        "score",
        "method",
        "d_in",
        "d_out",
        "kept",
        "pruned",
        "error",
        "error_uncompensated",
        "orthogonality_error",
        "norm_ratio",
        "cosine",
        "gram_distortion",
        "principal_angles_deg",
        "timing_s",
    ):
        assert key in r, key
    assert (r["layer"], r["sublayer"], r["ratio"], r["score"], r["method"]) == (
        2,
        sublayer,
        0.2,
        "rcpu",
        method,
    )
    assert (r["d_out"], r["d_in"]) == (d_out, d_in)
    kept, pruned = r["kept"], r["pruned"]
    assert len(kept) + len(pruned) == d_in
    assert sorted(kept + pruned) == list(range(d_in))
    if sublayer == "o_proj":
        assert len(pruned) == 2 * HEAD_DIM  # round(0.2 * 9 heads) = 2 whole heads
        heads = {c // HEAD_DIM for c in pruned}
        assert len(heads) == 2 and all(
            set(range(h * HEAD_DIM, (h + 1) * HEAD_DIM)) <= set(pruned) for h in heads
        )
    else:
        assert len(pruned) == 307  # round(0.2 * 1536)
    for key in ("error", "error_uncompensated"):
        assert set(r[key]) == {"calibration", "heldout"}
        assert all(math.isfinite(v) and v >= 0 for v in r[key].values())
    assert r["error_uncompensated"]["calibration"] > 0
    if method in ROTATIONS:
        assert r["orthogonality_error"] is not None and 0 <= r["orthogonality_error"] < 1e-8
    else:
        assert r["orthogonality_error"] is None
    for key in ("norm_ratio", "cosine"):
        assert set(r[key]) >= {"mean", "p05", "p95"}
        assert all(math.isfinite(v) for v in r[key].values())
        assert r[key]["p05"] <= r[key]["p95"]
    assert -1 - 1e-9 <= r["cosine"]["p05"] and r["cosine"]["p95"] <= 1 + 1e-9
    assert math.isfinite(r["gram_distortion"]) and r["gram_distortion"] >= 0
    angles = r["principal_angles_deg"]
    assert len(angles) > 0 and all(-1e-6 <= a <= 90 + 1e-6 for a in angles)
    assert isinstance(r["timing_s"]["statistics_from_cache"], bool)
    assert r["timing_s"]["total"] > 0
    assert r["settings"]["calibration_tokens"] == 4 * 128
    assert r["settings"]["heldout_tokens"] == 2 * 128


@pytest.mark.slow
@pytest.mark.parametrize("sublayer", ["o_proj", "down_proj"])
def test_layer_every_method(tmp_cache, use_embedded, tmp_path, capsys, sublayer):
    reports = {}
    for i, method in enumerate(METHODS):
        r, stdout = run_layer(tmp_path, capsys, "--sublayer", sublayer, "--method", method)
        check_report(r, sublayer, method)
        assert f"layer 2 {sublayer}" in stdout and f"compensated by '{method}'" in stdout
        # fresh cache: statistics are computed by the first call and reused by every later one
        assert r["timing_s"]["statistics_from_cache"] is (i > 0), method
        reports[method] = r
    # same selection for every method; uncompensated error independent of the method
    first = reports["none"]
    for r in reports.values():
        assert (
            r["kept"] == first["kept"] and r["error_uncompensated"] == first["error_uncompensated"]
        )
    calib = {m: r["error"]["calibration"] for m, r in reports.items()}
    assert calib["none"] == pytest.approx(first["error_uncompensated"]["calibration"], rel=1e-9)
    assert calib["ls"] <= calib["ridge"] + 1e-9
    assert calib["rotation"] <= calib["none"] + 1e-9
    assert calib["rotation_so"] <= calib["none"] + 1e-9
    assert calib["rotation_scale"] <= calib["rotation"] + 1e-9
    assert calib["rotation_diag"] <= calib["rotation"] + 1e-9
    assert calib["bias"] <= calib["none"] + 1e-9
    assert calib["rotation_bias"] <= calib["bias"] + 1e-9
    assert calib["rotation"] < calib["none"]  # the compensation does something on a real layer


@pytest.mark.slow
def test_cache_hit_on_second_call(tmp_cache, use_embedded, tmp_path, capsys):
    args = ("--sublayer", "down_proj", "--method", "rotation", "--ratio", "0.3")
    first, out1 = run_layer(tmp_path, capsys, *args)
    second, out2 = run_layer(tmp_path, capsys, *args)
    assert first["timing_s"]["statistics_from_cache"] is False
    assert second["timing_s"]["statistics_from_cache"] is True
    assert "(computed)" in out1 and "(cache)" in out2
    assert list((tmp_cache / "stats").glob("*.npz"))
    for key in ("kept", "error", "error_uncompensated", "orthogonality_error", "gram_distortion"):
        assert first[key] == second[key], key
    # a different seed is a different cache entry
    third, _ = run_layer(tmp_path, capsys, *args, "--seed", "1")
    assert third["timing_s"]["statistics_from_cache"] is False


@pytest.mark.slow
def test_damaged_stats_entry_is_recomputed(tmp_cache, use_embedded, tmp_path, capsys):
    first, _ = run_layer(tmp_path, capsys, "--sublayer", "o_proj", "--method", "ls")
    (entry,) = (tmp_cache / "stats").glob("*.npz")
    entry.write_bytes(entry.read_bytes()[:1000])
    again, _ = run_layer(tmp_path, capsys, "--sublayer", "o_proj", "--method", "ls")
    assert again["timing_s"]["statistics_from_cache"] is False
    assert again["error"] == pytest.approx(first["error"], rel=1e-9)


@pytest.mark.slow
def test_layer_subprocess(tmp_cache, tmp_path):
    out = tmp_path / "sub.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "rcpu",
            "layer",
            *SMALL,
            "--sublayer",
            "o_proj",
            "--method",
            "rotation_bias",
            "--json",
            str(out),
        ],
        cwd=REPO,
        env=dict(os.environ, RCPU_CACHE=str(tmp_cache), OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "layer 2 o_proj" in proc.stdout and "relative output error" in proc.stdout
    report = strict_json(out.read_text())
    check_report(report, "o_proj", "rotation_bias")
    assert report["timing_s"]["statistics_from_cache"] is False


def test_error_subprocess(tmp_cache):
    proc = subprocess.run(
        [sys.executable, "-m", "rcpu", "layer", *SMALL, "--ratio", "1.0"],
        cwd=REPO,
        env=dict(os.environ, RCPU_CACHE=str(tmp_cache), OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rcpu: error:") and "ratio" in lines[0]
    assert proc.stdout == ""


# One-line errors ----------------------------------------------------------------------


def expect_error(capsys, argv: list[str], *words: str) -> str:
    rc = cli.main(argv)
    captured = capsys.readouterr()
    assert rc == 2
    assert "Traceback" not in captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("rcpu: error:")
    for word in words:
        assert word in lines[0]
    return lines[0]


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--model", "gpt2"], ["unknown model", "gpt2"]),
        (["--model", "not-a-model"], ["unknown model", "not-a-model"]),
        (["--ratio=-0.1"], ["ratio", "-0.1"]),
        (["--ratio", "1.0"], ["ratio", "1.0"]),
        (["--score", "bogus"], ["unknown score", "bogus"]),
        (["--method", "bogus"], ["unknown method", "bogus"]),
        (["--data", "/definitely/not/here.txt"], ["not found"]),
        (["--seq-len", "0"], ["sequence length"]),
        (["--calib-samples", "0"], ["calibration samples"]),
    ],
)
def test_user_errors_before_model_load(tmp_cache, capsys, monkeypatch, extra, words):
    def no_load(data):
        raise AssertionError("the model must not be loaded for an invalid argument")

    if "--model" not in extra:
        monkeypatch.setattr(cli.args, "load", no_load)
    expect_error(capsys, ["layer", *SMALL, *extra], *words)


def test_empty_text_file(tmp_cache, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    expect_error(capsys, ["layer", *SMALL, "--data", str(empty)], "empty")


def test_json_into_missing_folder(tmp_cache, tmp_path, capsys):
    expect_error(
        capsys,
        ["layer", *SMALL, "--json", str(tmp_path / "no" / "such" / "r.json")],
        "does not exist",
    )


@pytest.mark.slow
def test_layer_out_of_range(tmp_cache, use_embedded, capsys):
    line = expect_error(capsys, ["layer", *SMALL[2:], "--layer", "99"], "layer 99", "0..29")
    assert "out of range" in line


@pytest.mark.slow
def test_text_shorter_than_one_sample(tmp_cache, use_embedded, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("A few words of text, far too few for one calibration sample. " * 5)
    line = expect_error(capsys, ["layer", *SMALL, "--data", str(short)], "tokens")
    assert "at least 640 are needed" in line  # 128-token sample + held-out window: 5 * 128


@pytest.mark.slow
def test_ratio_removing_every_head(tmp_cache, use_embedded, capsys):
    # 0.95 * 9 heads rounds to 9: nothing would be left
    expect_error(
        capsys, ["layer", *SMALL, "--sublayer", "o_proj", "--ratio", "0.95"], "remove all", "heads"
    )


# rcpu cache ---------------------------------------------------------------------------


def test_cache_info_and_clear(tmp_cache, capsys):
    from rcpu.cache import save_json

    save_json(tmp_cache / "stats" / "x.json", {"a": 1})
    assert cli.main(["cache"]) == 0
    out = capsys.readouterr().out
    assert str(tmp_cache) in out and "stats" in out and "total" in out
    assert cli.main(["cache", "clear", "--section", "stats"]) == 0
    assert "freed" in capsys.readouterr().out
    assert not (tmp_cache / "stats").exists()
    assert (tmp_cache / "models").is_symlink()


@pytest.mark.slow
def test_layer_without_heldout_tokens_is_refused(tmp_cache, use_embedded, capsys):
    argv = ["layer", *SMALL, "--heldout-samples", "0"]
    expect_error(capsys, argv, "held-out")
