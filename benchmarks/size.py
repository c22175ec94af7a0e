"""What pruning buys, measured: dense against pruned at several ratios, side by side in one run.

Two models: the embedded model (in tiny mode, the tiny random LLaMA) and a random-weight
LLaMA with LLaMA-7B layer shapes (hidden 4096, 32 heads, 32 KV heads, head_dim 128,
intermediate 11008) but only a few layers and a small vocabulary, so that it fits in
memory and time on a small machine. Each is pruned with ``prune_model`` at every ratio,
both targets, score ``wanda_sp`` and method ``none``: compensation changes the kept
weights' values, never which rows and columns are kept, so shapes, sizes and speed are
the same for every method.

For the dense model and each pruned one: parameters (distinct tensors, tied embeddings
once), attention parameters, the size on disk of the folder ``rcpu.export.save_pruned``
writes (weights and config; no tokenizer, which pruning does not change), KV-cache
bytes per token (2 x kv_heads x head_dim x dtype bytes, summed over layers with each
layer's own KV heads), whether stock transformers loads the folder (and why not), and
query heads, KV heads and MLP channels per layer. Speed: forward tokens/s (one batch of
random-id windows, logits at every position) and generation tokens/s (``generate`` with
greedy decoding, ``use_cache=True``, a fixed number of new tokens after a short prompt,
batch 1); each is the best of a few repeats, the dense and pruned models taking turns
within every repeat so that they see the same machine load.

Every model stays in memory until its speeds are measured: a full-mode run (two 7B-shaped
layers) peaked at 11.8 GB resident (``/usr/bin/time -v``); the quick mode keeps one such layer.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from rcpu.footprint import footprint, measure_speed, random_ids

from .common import Profiler, Settings, format_goal, goal, say, write_result

GOAL_RATIO = 0.2  # the ratio the goals are checked at
MB = 2**20


# Models ------------------------------------------------------------------------------------


def large_lm(shape: dict, seed: int = 0):
    """A random-weight LLaMA with the given layer shapes (no tokenizer: tokens are random ids)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rcpu.adapters import adapter_for
    from rcpu.models import LoadedModel

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"], head_dim=shape["head_dim"], max_position_embeddings=2048,
    )
    model = LlamaForCausalLM(config).eval()
    model.requires_grad_(False)
    label = f"random-{shape['hidden']}x{shape['layers']}"
    return LoadedModel(model, None, adapter_for(model), label, f"{label}-{seed}")


def calibration_tokens(lm, windows: int, length: int, seed: int = 0):
    """Calibration windows of the model's own text when it has a tokenizer, else random ids."""
    from rcpu.calibration import TokenSet, prepare_tokens
    from rcpu.config import DataConfig

    data = DataConfig(model=lm.name, calib_samples=windows, seq_len=length, heldout_samples=0)
    if lm.tokenizer is not None:
        return data, prepare_tokens(lm, data.data, data.sampling)
    vocab = lm.model.config.vocab_size
    ids = random_ids(windows, length, vocab, seed)
    return data, TokenSet(ids, ids[:0], torch.zeros(0, dtype=torch.long))


# Measures ----------------------------------------------------------------------------------


def saved_folder(model) -> dict:
    """Size of the folder ``save_pruned`` writes, and whether stock transformers loads it."""
    import json

    from transformers.utils import logging as hf_logging

    from rcpu.export import save_pruned

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Writing model shards" once per folder
    with tempfile.TemporaryDirectory(prefix="rcpu-size-") as tmp:
        start = time.perf_counter()
        try:
            folder = save_pruned(model, None, Path(tmp) / "model")
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        seconds = time.perf_counter() - start
        files = {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}
        record = json.loads((folder / "config.json").read_text()).get("rcpu", {})
    return {
        "disk_bytes": sum(files.values()),
        "files": files,
        "save_s": seconds,
        "stock_loadable": bool(record.get("stock_loadable")),
        "stock_class": record.get("stock_class"),
        "why_not_stock": record.get("why_not_stock"),
    }


def removed_heads_share(dense: dict, pruned: dict, dense_model) -> int:
    """Attention parameters that removing the heads should remove: per layer, a removed query head's
    q rows and o columns, a removed KV head's k and v rows (biases of those rows included)."""
    from rcpu.adapters import adapter_for

    a = adapter_for(dense_model)
    total = 0
    for i in range(a.num_layers):
        q, k, v = a.attention_inputs(i)
        o = a.attention_output(i)
        heads, kv = dense["heads"][i], dense["kv_heads"][i]
        per_query = sum(p.numel() for p in q.parameters()) // heads + o.weight.numel() // heads
        per_kv = (sum(p.numel() for p in k.parameters()) + sum(p.numel() for p in v.parameters())) // kv
        total += (heads - pruned["heads"][i]) * per_query + (kv - pruned["kv_heads"][i]) * per_kv
    return total


# One model ---------------------------------------------------------------------------------


def measure(lm, label: str, calib: tuple[int, int], forward: tuple[int, int], settings: Settings,
            profiler: Profiler) -> dict:
    from rcpu.config import PruneConfig
    from rcpu.prune import prune_model

    data, tokens = calibration_tokens(lm, *calib)
    rows = {"dense": {"ratio": 0.0, **footprint(lm.model), **saved_folder(lm.model)}}
    models = {"dense": lm.model}
    for ratio in settings.size_ratios:
        start = time.perf_counter()
        result = prune_model(lm, data, PruneConfig(ratio, "both", "wanda_sp", "none"), tokens=tokens)
        prune_s = time.perf_counter() - start
        key = f"{ratio:g}"
        row = {"ratio": ratio, "prune_s": prune_s, **footprint(result.model), **saved_folder(result.model)}
        assert row["params"] == result.params_after, (row["params"], result.params_after)
        for what in ("heads", "kv_heads", "channels"):  # the prune's own per-layer records agree
            assert [r["shape"][what] for r in result.layers] == [
                [b, a] for b, a in zip(rows["dense"][what], row[what], strict=True)], what
        row["removed_heads_share"] = removed_heads_share(rows["dense"], row, lm.model)
        row["attention_params_removed"] = rows["dense"]["attention_params"] - row["attention_params"]
        rows[key] = row
        models[key] = result.model
        say(f"size: {label} {ratio:g}: pruned in {prune_s:.1f} s, {row['params']:,} parameters, "
            f"stock-loadable {row['stock_loadable']}")
    vocab = lm.model.config.vocab_size
    ids = random_ids(*forward, vocab, seed=1)
    prompt = random_ids(1, settings.size_prompt, vocab, seed=2)
    with profiler:
        measured = measure_speed(models, ids, prompt, settings.size_new_tokens, settings.size_repeats)
    dense = measured["dense"]
    for key, row in rows.items():
        row.update(measured[key])
        row["forward_vs_dense"] = row["forward_tokens_per_s"] / dense["forward_tokens_per_s"]
        row["generate_vs_dense"] = row["generate_tokens_per_s"] / dense["generate_tokens_per_s"]
        row["params_vs_dense"] = row["params"] / rows["dense"]["params"]
        row["kv_vs_dense"] = row["kv_bytes_per_token"] / rows["dense"]["kv_bytes_per_token"]
        say(f"  {label} {key:>5}: {row['params']:>13,} params, {row['disk_bytes'] / MB:8.1f} MiB on disk, "
            f"KV {row['kv_bytes_per_token']:>7,} B/token, heads {sum(row['heads'])}, KV heads "
            f"{sum(row['kv_heads'])}, forward {row['forward_tokens_per_s']:8.0f} tok/s "
            f"(x{row['forward_vs_dense']:.2f}), generate {row['generate_tokens_per_s']:6.1f} tok/s "
            f"(x{row['generate_vs_dense']:.2f})")
    del models
    return {
        "label": label,
        "calibration": {"windows": calib[0], "seq_len": calib[1], "text": data.data if lm.tokenizer else "random ids"},
        "forward": {"windows": forward[0], "seq_len": forward[1]},
        "generate": {"prompt": settings.size_prompt, "new_tokens": settings.size_new_tokens},
        "repeats": settings.size_repeats,
        "rows": rows,
    }


# Goals ---------------------------------------------------------------------------------------


def goals(small: dict, large: dict, large_shape: dict) -> list[dict]:
    from rcpu.scores import num_pruned

    key = f"{GOAL_RATIO:g}"
    heads = large_shape["heads"]
    kept = heads - num_pruned(heads, GOAL_RATIO)
    want = [large_shape["hidden"], kept * large_shape["head_dim"]]
    at = large["rows"][key]
    wrong = sum(shape != want for shape in at["o_proj"])
    s = small["rows"][key]
    share = s["attention_params_removed"] / s["removed_heads_share"] if s["removed_heads_share"] else None
    kv_growth = max(
        after - before
        for m in (small, large) for k, row in m["rows"].items() if k != "dense"
        for after, before in zip(row["kv_heads"], m["rows"]["dense"]["kv_heads"], strict=True)
    )
    return [
        goal(f"{large['label']} at {key}: layers whose o_proj is not {want[0]} x {want[1]} "
             f"({kept} of {heads} heads)", wrong, "<=", 0),
        goal(f"{large['label']} at {key}: forward tokens/s pruned / dense", at["forward_vs_dense"], ">", 1.0),
        goal(f"{small['label']} at {key}: attention parameters removed / removed heads' share",
             share, "==", 1.0),
        goal("KV heads after - before, worst layer (both models, every ratio)", kv_growth, "<=", 0),
    ]


def run(lm, settings: Settings, out_dir: Path, started: float, profile: bool = False) -> dict:
    profiler = Profiler(profile)
    small = measure(lm, lm.name, settings.size_calib, settings.size_forward, settings, profiler)
    shape = dict(settings.size_large)
    big = large_lm(shape)
    large = measure(big, big.name, settings.size_large_calib, settings.size_large_forward, settings, profiler)
    del big
    checks = goals(small, large, shape)
    for g in checks:
        say("  " + format_goal(g))
    return write_result(out_dir, "size", settings, {
        "ratios": list(settings.size_ratios),
        "score": "wanda_sp",
        "method": "none",
        "targets": "both",
        "large_shape": shape,
        "models": {"small": small, "large": large},
        "goals": checks,
        "profile": profiler.top(),
    }, started)
