"""Every family the README names, end to end on tiny random models: LLaMA (MHA, uneven GQA, Llama-3
rope scaling), Mistral (sliding window), Qwen2 (q/k/v biases, sliding-window and full layers mixed)
and Qwen3 (per-head q/k norms). For every method: physical == masked logits; the pruned model keeps
its real shapes (no zero head, never more KV heads); the saved folder reloads in a fresh process, with
plain transformers where the folder says it is stock-loadable and with ``rcpu.load_pruned`` where it
says why not, and gives the same logits."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import random_tokens, tiny_lm
from safetensors.torch import load_file, save_file
from test_prune import _masked

from rcpu.adapters import adapter_for
from rcpu.compensate import METHODS
from rcpu.config import DataConfig, PruneConfig
from rcpu.export import save_pruned
from rcpu.flow import LayerFlow
from rcpu.prune import prune_model

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = 128
COMMON = dict(vocab_size=VOCAB, intermediate_size=40, num_hidden_layers=3, max_position_embeddings=512)


def family(name: str):
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    configs = {
        "llama-mha": lambda: LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=4, **COMMON),
        "llama-uneven-gqa": lambda: LlamaConfig(hidden_size=36, num_attention_heads=9, num_key_value_heads=3,
                                                **COMMON),
        "llama3-rope": lambda: LlamaConfig(
            hidden_size=48, num_attention_heads=6, num_key_value_heads=2, **COMMON,
            rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 16, "rope_theta": 500000.0}),
        "mistral": lambda: MistralConfig(hidden_size=48, num_attention_heads=6, num_key_value_heads=2,
                                         sliding_window=8, **COMMON),
        "qwen2": lambda: Qwen2Config(hidden_size=48, num_attention_heads=6, num_key_value_heads=2,
                                     use_sliding_window=True, sliding_window=8, max_window_layers=1, **COMMON),
        "qwen3": lambda: Qwen3Config(hidden_size=48, num_attention_heads=6, num_key_value_heads=2, head_dim=8,
                                     **COMMON),
    }
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(configs[name]()).eval().requires_grad_(False)
    if name == "qwen3":  # random non-trivial q/k norms (they start at ones)
        for layer in model.model.layers:
            layer.self_attn.q_norm.weight.uniform_(0.5, 1.5)
            layer.self_attn.k_norm.weight.uniform_(0.5, 1.5)
    return model


FAMILIES = ["llama-mha", "llama-uneven-gqa", "llama3-rope", "mistral", "qwen2", "qwen3"]
IDS = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(5))  # longer than the windows


def test_the_flow_gives_each_layer_its_own_mask():
    """Qwen2 here mixes a full layer with sliding-window layers: states layer by layer are the model's."""
    model = family("qwen2")
    flow = LayerFlow(adapter_for(model), IDS)
    expected = model(IDS, output_hidden_states=True).hidden_states
    for index in range(1, 3):
        flow.advance_to(index)
        torch.testing.assert_close(flow.batches[0][0], expected[index], rtol=1e-5, atol=1e-5)


def _prune(name: str, method: str, ratio: float = 0.34, score: str = "random", balanced: bool = False):
    model = family(name)
    result = prune_model(tiny_lm(model), DataConfig(seq_len=32, calib_samples=8),
                         PruneConfig(ratio, "both", score, method, gqa_balanced=balanced),
                         tokens=random_tokens(n=8, length=32))
    return model, result


@pytest.mark.parametrize("name", FAMILIES)
def test_every_method_prunes_every_family_exactly(name):
    for method in METHODS:
        model, result = _prune(name, method)
        pruned = result.model(IDS).logits
        torch.testing.assert_close(pruned, _masked(model, result.plans)(IDS).logits, rtol=1e-5, atol=1e-5,
                                   msg=lambda m, method=method: f"{name} {method}: {m}")
        for record in result.layers:  # real shapes, and never more KV heads than before
            heads, kv_heads = record["shape"]["heads"], record["shape"]["kv_heads"]
            assert heads[1] == heads[0] - record["o_proj"]["pruned_units"]
            assert kv_heads[1] <= kv_heads[0]
            assert record["shape"]["channels"][1] == record["down_proj"]["kept_units"]


RELOAD = textwrap.dedent(
    """
    import json, sys
    import torch
    from safetensors.torch import load_file, save_file
    jobs = json.loads(sys.argv[1])
    out = {}
    ids = load_file(sys.argv[2])["ids"]
    for job in jobs:
        config = json.load(open(job["folder"] + "/config.json"))
        if config["rcpu"]["stock_loadable"]:
            from transformers import AutoModelForCausalLM  # plain transformers, no rcpu
            model = AutoModelForCausalLM.from_pretrained(job["folder"]).eval()
            assert "rcpu" not in sys.modules
        else:
            from rcpu import load_pruned
            model = load_pruned(job["folder"])
        with torch.no_grad():
            out[job["key"]] = model(ids).logits.contiguous()
    save_file(out, sys.argv[3])
    """
)


@pytest.mark.slow
def test_saved_folders_reload_in_a_fresh_process_with_the_same_logits(tmp_path):
    jobs, expected, verdicts, uneven = [], {}, {}, set()
    for name in FAMILIES:
        for method, balanced in (("rotation", False), ("bias", False), ("rotation_bias", True), ("ls_ridge", True)):
            _, result = _prune(name, method, ratio=0.5 if balanced else 0.34, balanced=balanced)
            key = f"{name}-{method}"
            folder = save_pruned(result.model, None, tmp_path / key, record={"method": method})
            record = json.loads((folder / "config.json").read_text())["rcpu"]
            verdicts[key] = record
            jobs.append({"folder": str(folder), "key": key, "stock": record["stock_loadable"]})
            expected[key] = result.model(IDS).logits.contiguous()
            adapter = adapter_for(result.model)
            if any(getattr(adapter.attention_module(i), "rcpu_kv_index", None) is not None for i in range(3)):
                uneven.add(key)
    jobs.sort(key=lambda job: not job["stock"])  # stock folders first, before anything imports rcpu
    save_file({"ids": IDS}, tmp_path / "ids.safetensors")
    proc = subprocess.run([sys.executable, "-c", RELOAD, json.dumps(jobs), str(tmp_path / "ids.safetensors"),
                           str(tmp_path / "out.safetensors")], capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = load_file(tmp_path / "out.safetensors")
    for key, logits in expected.items():
        torch.testing.assert_close(got[key], logits, rtol=1e-5, atol=1e-5, msg=lambda m, key=key: f"{key}: {m}")
    # what the folders say about themselves
    assert uneven, "no uneven GQA layer was produced: the test would not cover the KV index"
    for key in uneven:
        assert "unevenly" in verdicts[key]["why_not_stock"], key
    for key, record in verdicts.items():
        assert record["stock_loadable"] == ("why_not_stock" not in record), key
        if not record["stock_loadable"]:
            assert record["why_not_stock"] and record["layout"]["loader"] == "rcpu.load_pruned", key
    stock = {k for k, r in verdicts.items() if r["stock_loadable"]}
    # GQA-balanced selection keeps every family stock-loadable where its class can hold the biases
    assert {f"{name}-ls_ridge" for name in FAMILIES} <= stock
    assert {"llama-mha-rotation", "llama-mha-bias", "llama-mha-rotation_bias", "llama3-rope-rotation_bias"} <= stock
    # Qwen2's and Qwen3's classes have no bias on down_proj, Mistral's none at all (and its sliding
    # window rules out a stand-in class): such a bias is never dropped, the folder says why it is
    # not stock and load_pruned reads it
    assert not {"qwen2-rotation_bias", "qwen3-rotation_bias", "mistral-rotation_bias"} & stock
