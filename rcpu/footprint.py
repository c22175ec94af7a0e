"""What pruning buys: parameters, KV-cache bytes, bytes of weights and tokens per second.

``footprint`` reads a model's shapes (no computation); ``measure_speed`` times forward and
generation, dense and pruned taking turns so that both see the same machine load. The size
benchmark (``python -m benchmarks size``) and the whole-model page both use these.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .adapters import adapter_for
from .models import count_parameters

SIZE_RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "size.json"


def attention_parameters(adapter) -> int:
    """Parameters of every layer's q/k/v/o projections (biases included)."""
    total = 0
    for i in range(adapter.num_layers):
        for linear in (*adapter.attention_inputs(i), adapter.attention_output(i)):
            total += sum(p.numel() for p in linear.parameters())
    return total


def footprint(model: nn.Module) -> dict:
    """Parameters, per-layer head and channel counts, o_proj shapes and KV-cache bytes per token."""
    a = adapter_for(model)
    layers = range(a.num_layers)
    weight = a.attention_output(0).weight
    dtype_bytes = weight.element_size()
    kv_heads = [a.num_kv_heads(i) for i in layers]
    params = count_parameters(model)
    return {
        "params": params,
        "attention_params": attention_parameters(a),
        "weight_bytes": params * dtype_bytes,
        "heads": [a.num_heads(i) for i in layers],
        "kv_heads": kv_heads,
        "channels": [a.num_channels(i) for i in layers],
        "o_proj": [list(a.attention_output(i).weight.shape) for i in layers],
        "head_dim": a.head_dim,
        "dtype": str(weight.dtype).replace("torch.", ""),
        "kv_bytes_per_token": sum(2 * k * a.head_dim * dtype_bytes for k in kv_heads),
    }


def random_ids(n: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def _forward(model: nn.Module, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    return time.perf_counter() - start


def _generate(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> float:
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              use_cache=True, pad_token_id=0)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), generation_config=config)
    seconds = time.perf_counter() - start
    if out.shape[1] != prompt.shape[1] + new_tokens:
        raise RuntimeError(f"generation stopped early: {out.shape[1] - prompt.shape[1]} of {new_tokens} tokens")
    return seconds


def measure_speed(models: Mapping[str, nn.Module], ids: torch.Tensor, prompt: torch.Tensor, new_tokens: int,
                  repeats: int) -> dict[str, dict]:
    """Forward and generation tokens/s of every model, best of ``repeats``; the models take turns
    within every repeat. Forward: one batch ``ids`` with logits at every position; generation:
    greedy, with the KV cache, ``new_tokens`` after ``prompt`` (batch 1)."""
    for model in models.values():  # warm-up at the timed shapes: first-call allocations, kernel choice
        _forward(model, ids)
        _generate(model, prompt, 2)
    runs: dict[str, dict[str, list[float]]] = {k: {"forward": [], "generate": []} for k in models}
    for _ in range(repeats):
        for key, model in models.items():
            runs[key]["forward"].append(ids.numel() / _forward(model, ids))
        for key, model in models.items():
            runs[key]["generate"].append(new_tokens / _generate(model, prompt, new_tokens))
    return {key: {"forward_tokens_per_s": max(r["forward"]), "generate_tokens_per_s": max(r["generate"]),
                  "forward_runs": r["forward"], "generate_runs": r["generate"]} for key, r in runs.items()}


COMPARED = (  # (key, label, larger is better)
    ("params", "parameters", False),
    ("attention_params", "attention parameters", False),
    ("weight_bytes", "bytes of weights", False),
    ("kv_bytes_per_token", "KV-cache bytes per token", False),
    ("forward_tokens_per_s", "forward tokens/s", True),
    ("generate_tokens_per_s", "generation tokens/s", True),
)


def compare(dense: dict, pruned: dict) -> list[dict]:
    """One row per measure present in both: dense, pruned and pruned / dense."""
    rows = []
    for key, name, _ in COMPARED:
        if key in dense and key in pruned:
            rows.append({"measure": name, "key": key, "dense": dense[key], "pruned": pruned[key],
                         "pruned / dense": pruned[key] / dense[key] if dense[key] else float("nan")})
    return rows


def speed_sample(vocab: int, windows: int = 2, length: int = 128, prompt: int = 16) -> tuple[torch.Tensor, ...]:
    """Random token ids for ``measure_speed``: a forward batch and a generation prompt (fixed seeds)."""
    return random_ids(windows, length, vocab, seed=1), random_ids(1, prompt, vocab, seed=2)


def benchmark_rows(path: Path = SIZE_RESULTS) -> tuple[list[dict], dict] | None:
    """The size benchmark's measurements as table rows (one per model and ratio, pruned against
    dense) and where they come from; ``None`` when the result file is missing or unreadable."""
    try:
        result = json.loads(Path(path).read_text())
        rows = []
        for model in result["models"].values():
            dense = model["rows"]["dense"]
            for key, row in model["rows"].items():
                rows.append({
                    "model": model["label"], "ratio": row["ratio"],
                    "query heads": sum(row["heads"]), "KV heads": sum(row["kv_heads"]),
                    "parameters (M)": row["params"] / 1e6,
                    "on disk (MiB)": row["disk_bytes"] / 2**20,
                    "KV bytes / token": row["kv_bytes_per_token"],
                    "forward × dense": row["forward_tokens_per_s"] / dense["forward_tokens_per_s"],
                    "generation × dense": row["generate_tokens_per_s"] / dense["generate_tokens_per_s"],
                    "stock-loadable": bool(row["stock_loadable"]) if key != "dense" else True,
                })
        source = {"date": result["date"], "mode": result["mode"], "machine": result["machine"],
                  "command": "python -m benchmarks size" + {"full": ""}.get(result["mode"], f" --{result['mode']}")}
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        return None
    return rows, source
