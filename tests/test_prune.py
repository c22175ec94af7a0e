"""Whole-model pruning: physical == masked, stock reload, sequential statistics, ratio 0, sweeps."""

from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import make_tiny_llama
from conftest import random_tokens as _tokens
from conftest import tiny_lm as _lm

from rcpu.adapters import adapter_for
from rcpu.compensate import compensate
from rcpu.config import DataConfig, PruneConfig
from rcpu.errors import RcpuError
from rcpu.evaluate import perplexity
from rcpu.export import save_pruned
from rcpu.flow import LayerFlow, layer_input_stats
from rcpu.prune import prune_model
from rcpu.scores import select
from rcpu.surgery import mask_plan

VOCAB = 128




def _masked(model, plans):
    masked = copy.deepcopy(model)
    adapter = adapter_for(masked)
    for index, layer_plans in enumerate(plans):
        for plan in layer_plans.values():
            mask_plan(adapter, index, plan)
    return masked


SHAPES = {
    "mha": dict(heads=4, kv_heads=4, hidden=32),
    "gqa": dict(heads=6, kv_heads=2, hidden=48),
    "gqa-uneven": dict(heads=9, kv_heads=3, hidden=72),
}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("method", ["rotation", "bias", "rotation_bias", "ls", "none"])
def test_physical_equals_masked(shape, method):
    model = make_tiny_llama(layers=3, intermediate=40, **SHAPES[shape])
    dense_copy = copy.deepcopy(model.state_dict())
    result = prune_model(
        _lm(model), DataConfig(seq_len=32, calib_samples=8), PruneConfig(0.3, "both", "rcpu", method),
        tokens=_tokens(),
    )
    ids = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(5))
    pruned = result.model(ids).logits
    masked = _masked(model, result.plans)(ids).logits
    torch.testing.assert_close(pruned, masked, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(pruned, model(ids).logits, atol=1e-3)  # something was pruned
    assert result.params_after < result.params_before
    # the source model is never modified
    for name, value in model.state_dict().items():
        assert torch.equal(value, dense_copy[name]), name


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("targets", ["attn", "mlp"])
def test_one_target_leaves_the_other_sublayer_exactly_as_it_was(shape, targets):
    """Physical == masked for each target alone, and the untouched sublayer keeps every weight.

    (Regression: with ``--targets mlp`` the export once counted KV heads as
    ``k_out // (q_out // groups)``, which kept 1 KV group of an unpruned attention.)
    """
    model = make_tiny_llama(layers=3, intermediate=40, **SHAPES[shape])
    result = prune_model(
        _lm(model), DataConfig(seq_len=32, calib_samples=8), PruneConfig(0.3, targets, "rcpu", "rotation"),
        tokens=_tokens(),
    )
    ids = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(result.model(ids).logits, _masked(model, result.plans)(ids).logits,
                               rtol=1e-5, atol=1e-5)
    untouched = "self_attn" if targets == "mlp" else "mlp"
    dense = {k: v for k, v in model.state_dict().items() if f".{untouched}." in k}
    pruned = {k: v for k, v in result.model.state_dict().items() if f".{untouched}." in k}
    assert dense.keys() == pruned.keys()
    assert all(torch.equal(dense[k], pruned[k]) for k in dense)
    adapter = adapter_for(model)
    if targets == "mlp":  # exactly the removed channels' rows and columns go
        removed = sum(len(plans["down_proj"].kept) for plans in result.plans)
        per_channel = 3 * adapter.hidden_size
        assert result.params_before - result.params_after == (3 * 40 - removed) * per_channel


def test_uneven_gqa_groups_really_occur():
    """With 9 query heads in 3 KV groups, pruning 3 heads by score can leave groups uneven."""
    model = make_tiny_llama(layers=2, intermediate=40, **SHAPES["gqa-uneven"])
    result = prune_model(
        _lm(model), DataConfig(seq_len=32, calib_samples=8), PruneConfig(0.3, "attn", "random", "rotation"),
        tokens=_tokens(),
    )
    groups = [torch.bincount(p["o_proj"].kept_units // 3, minlength=3).tolist() for p in result.plans]
    assert any(len(set(g)) > 1 for g in groups), groups


def test_sequential_statistics_come_from_pruned_prefix():
    model = make_tiny_llama(layers=2, intermediate=40, **SHAPES["gqa"])
    tokens = _tokens()
    data = DataConfig(seq_len=32, calib_samples=8)
    cfg = PruneConfig(0.5, "both", "rcpu", "ls")
    result = prune_model(_lm(model), data, cfg, tokens=tokens)

    def layer1_stats(source):
        flow = LayerFlow(adapter_for(source), tokens.calibration)
        flow.advance_to(1)
        return layer_input_stats(flow, 1, 0, 0)["down_proj"]

    # Layer 1 of the result still has dense shapes until relayout; use the dense layer-1 weight.
    weight = model.model.layers[1].mlp.down_proj.weight
    prefix_pruned = copy.deepcopy(model)
    prefix_pruned.model.layers[0] = result.model.model.layers[0]  # pruned layer 0, dense layer 1
    expected_stats = layer1_stats(prefix_pruned)
    dense_stats = layer1_stats(model)
    plan = result.plans[1]["down_proj"]
    sel = select(weight, expected_stats, "rcpu", 0.5)
    assert torch.equal(sel.kept, plan.kept)
    expected = compensate("ls", weight, expected_stats, plan.kept).weight
    from_dense = compensate("ls", weight, dense_stats, plan.kept).weight
    # The prune's layer-0 run reuses the dense run's kept-head attention outputs: the same numbers as this
    # recomputation up to float32 rounding (attention over fewer heads sums in another order).
    torch.testing.assert_close(plan.compensation.weight, expected, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(plan.compensation.weight, from_dense, rtol=1e-3, atol=1e-5)


def test_ratio_zero_is_dense_exactly():
    model = make_tiny_llama(layers=2, **SHAPES["gqa"])
    result = prune_model(
        _lm(model), DataConfig(seq_len=32, calib_samples=8), PruneConfig(0.0, "both", "rcpu", "rotation"),
        tokens=_tokens(),
    )
    windows = _tokens(seed=3).calibration
    assert perplexity(result.model, windows)["ppl"] == perplexity(model, windows)["ppl"]
    assert result.params_after == result.params_before


def test_window_nll_are_each_windows_mean_and_average_to_the_nll():
    model = make_tiny_llama(layers=2, **SHAPES["gqa"])
    windows = _tokens(seed=3).calibration[:5]  # batches of 4 and 1
    result = perplexity(model, windows)
    assert len(result["window_nll"]) == len(windows)
    assert sum(result["window_nll"]) / len(windows) == pytest.approx(result["nll"], rel=1e-12)
    alone = perplexity(model, windows[2:3])  # a window's NLL does not depend on its batch
    assert result["window_nll"][2] == pytest.approx(alone["nll"], rel=1e-5)


def test_ratio_that_removes_every_unit_is_refused():
    model = make_tiny_llama(layers=1, heads=2, kv_heads=2, hidden=16)
    with pytest.raises(RcpuError, match="remove all"):
        prune_model(_lm(model), DataConfig(seq_len=32, calib_samples=8), PruneConfig(0.9, "attn"), tokens=_tokens())


def test_save_reloads_in_fresh_process_with_stock_transformers(tmp_path):
    model = make_tiny_llama(layers=2, intermediate=40, **SHAPES["gqa-uneven"])
    result = prune_model(
        _lm(model), DataConfig(seq_len=32, calib_samples=8), PruneConfig(0.3, "both", "rcpu", "rotation_bias"),
        tokens=_tokens(),
    )
    out = save_pruned(result.model, None, tmp_path / "pruned", record=dataclasses.asdict(result.config))
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(1))
    expected = result.model(ids).logits
    script = textwrap.dedent(
        f"""
        import json, sys, torch
        from transformers import AutoModelForCausalLM
        assert "rcpu" not in sys.modules
        m = AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()
        ids = torch.tensor({ids.tolist()})
        with torch.no_grad():
            print(json.dumps(m(ids).logits.tolist()))
        assert "rcpu" not in sys.modules
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    reloaded = torch.tensor(json.loads(proc.stdout.strip().splitlines()[-1]))
    torch.testing.assert_close(reloaded, expected, rtol=1e-5, atol=1e-5)
    config = json.loads((out / "config.json").read_text())
    assert config["rcpu"]["method"] == "rotation_bias" and config["rcpu"]["ratio"] == 0.3
    assert config["attention_bias"] and config["mlp_bias"]


def test_save_never_overwrites_silently(tmp_path):
    model = make_tiny_llama(layers=1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(RcpuError, match="already exists"):
        save_pruned(model, None, out)
    assert (out / "keep.txt").read_text() == "mine"
    save_pruned(model, None, out, overwrite=True)
    assert (out / "config.json").exists() and not (out / "keep.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folders left


@pytest.mark.slow
def test_embedded_physical_equals_masked(embedded):
    data = DataConfig(calib_samples=2, seq_len=64, heldout_samples=1)
    result = prune_model(embedded, data, PruneConfig(0.2, "both", "rcpu", "rotation"))
    ids = torch.randint(0, 49152, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pruned = result.model(ids).logits
        masked = _masked(embedded.model, result.plans)(ids).logits
    # float32 through 30 layers: different matmul shapes sum in different orders (~1e-4 of logits ~10)
    torch.testing.assert_close(pruned, masked, rtol=1e-4, atol=1e-3)
    groups = [torch.bincount(p["o_proj"].kept_units // 3, minlength=3).tolist() for p in result.plans]
    assert all(sum(g) == 7 for g in groups)
    assert result.params_after < result.params_before
