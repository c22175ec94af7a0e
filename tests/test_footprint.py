"""What pruning buys: shapes read from the model, speed measured side by side, the benchmark's table."""

from __future__ import annotations

import json

import pytest
import torch

from rcpu import figures
from rcpu.config import DataConfig, PruneConfig
from rcpu.footprint import SIZE_RESULTS, benchmark_rows, compare, footprint, measure_speed, speed_sample
from rcpu.models import count_parameters
from rcpu.prune import prune_model
from tests.conftest import make_tiny_llama, random_tokens, tiny_lm


@pytest.fixture(scope="module")
def dense_and_pruned():
    model = make_tiny_llama(heads=4, kv_heads=2, layers=2, hidden=32, intermediate=48)
    lm = tiny_lm(model)
    data = DataConfig(model="tiny", calib_samples=8, seq_len=32, heldout_samples=2)
    result = prune_model(lm, data, PruneConfig(0.5, "both", "wanda_sp", "none"), tokens=random_tokens())
    return model, result.model


def test_footprint_counts_what_the_model_holds(dense_and_pruned):
    dense, pruned = dense_and_pruned
    before, after = footprint(dense), footprint(pruned)
    assert before["params"] == count_parameters(dense) and after["params"] == count_parameters(pruned)
    assert before["weight_bytes"] == 4 * before["params"]  # float32
    # 2 (K and V) x KV heads x head_dim x 4 bytes, per layer
    assert before["kv_bytes_per_token"] == 2 * 2 * 2 * 8 * 4
    assert after["heads"] == [2, 2] and after["channels"] == [24, 24]
    assert after["kv_bytes_per_token"] == sum(2 * k * 8 * 4 for k in after["kv_heads"])
    assert after["kv_bytes_per_token"] <= before["kv_bytes_per_token"]
    # removing 2 of 4 query heads removes their q rows and o columns: 2 x (8 x 32) x 2 per layer at least
    assert before["attention_params"] - after["attention_params"] >= 2 * 2 * 8 * 32 * 2
    assert after["o_proj"] == [[32, 16], [32, 16]]


def test_compare_and_its_figure(dense_and_pruned):
    dense, pruned = dense_and_pruned
    before, after = footprint(dense), footprint(pruned)
    rows = compare(before, after)
    assert [r["key"] for r in rows] == ["params", "attention_params", "weight_bytes", "kv_bytes_per_token"]
    assert all(r["pruned / dense"] == r["pruned"] / r["dense"] for r in rows)
    assert all(r["pruned / dense"] <= 1 for r in rows)
    fig = figures.footprint_figure(rows)
    assert list(fig.data[0].x) == [r["pruned / dense"] for r in rows]
    assert len(figures.footprint_figure([]).data) == 0


def test_measure_speed_times_every_model(dense_and_pruned):
    dense, pruned = dense_and_pruned
    ids, prompt = speed_sample(dense.config.vocab_size, windows=1, length=16, prompt=4)
    speed = measure_speed({"dense": dense, "pruned": pruned}, ids, prompt, new_tokens=3, repeats=2)
    for key in ("dense", "pruned"):
        assert len(speed[key]["forward_runs"]) == 2 and len(speed[key]["generate_runs"]) == 2
        assert speed[key]["forward_tokens_per_s"] == max(speed[key]["forward_runs"]) > 0
        assert speed[key]["generate_tokens_per_s"] == max(speed[key]["generate_runs"]) > 0
    rows = compare({**footprint(dense), **speed["dense"]}, {**footprint(pruned), **speed["pruned"]})
    assert [r["key"] for r in rows][-2:] == ["forward_tokens_per_s", "generate_tokens_per_s"]
    assert torch.equal(ids, speed_sample(dense.config.vocab_size, windows=1, length=16, prompt=4)[0])


def test_benchmark_rows_read_the_size_results(tmp_path):
    result = json.loads(SIZE_RESULTS.read_text())
    rows, source = benchmark_rows()
    assert len(rows) == sum(len(m["rows"]) for m in result["models"].values())
    assert source["command"].startswith("python -m benchmarks size")
    dense = [r for r in rows if r["ratio"] == 0]
    assert all(r["parameters (M)"] > 0 and r["forward × dense"] == 1 for r in dense)
    pruned = [r for r in rows if r["ratio"] > 0]
    assert all(r["KV bytes / token"] <= d["KV bytes / token"] for r in pruned for d in dense
               if d["model"] == r["model"])
    bad = tmp_path / "size.json"
    bad.write_text("{not json")
    assert benchmark_rows(bad) is None
    assert benchmark_rows(tmp_path / "missing.json") is None
