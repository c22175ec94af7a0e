"""Whole-model prune time against the forward-pass floor, on the same calibration tokens.

Forward: ``LayerFlow`` captures the inputs of layer 0 and every decoder layer runs once
on them (no LM head). Prune: ``prune_model`` with ``rcpu:rotation``, both targets,
ratio 0.2, ``heldout_samples=0`` so that it sees exactly the same tokens. Goal:
prune / forward <= 1.3.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .common import Profiler, Settings, data_config, format_goal, goal, say, timed, write_result

GOAL_RATIO = 1.3
RATIO = 0.2


@contextmanager
def instrumented() -> Iterator[dict]:
    """Time the library's inner steps by wrapping them (no library change): SVD, errors, surgery, Gram."""
    import rcpu.compensate
    import rcpu.prune
    import rcpu.stats

    totals: dict[str, float] = defaultdict(float)
    targets = [
        (rcpu.compensate, "procrustes", "svd"),
        (rcpu.prune, "_errors", "errors"),
        (rcpu.prune, "apply_plan", "surgery"),
        (rcpu.stats.StatsAccumulator, "add", "gram"),
    ]
    originals = []
    for owner, name, label in targets:
        original = getattr(owner, name)

        def wrapper(*args, _original=original, _label=label, **kwargs):
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                totals[_label] += time.perf_counter() - start

        originals.append((owner, name, original))
        setattr(owner, name, wrapper)
    try:
        yield totals
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)


def forward_pass(lm, windows, batch_size: int = 8) -> None:
    from rcpu.flow import LayerFlow

    flow = LayerFlow(lm.adapter, windows, batch_size)
    for index in range(lm.adapter.num_layers):
        flow.run_layer(index)


def flop_floor(lm, records: list[dict], seq_len: int) -> dict:
    """Multiply-add counts (x2 = FLOPs) per token of one forward and of the work a prune cannot avoid.

    Forward, per layer: q, k, v, o, gate, up, down projections and attention (Q K^T and A V over the
    full ``seq_len`` x ``seq_len`` causal block as the CPU kernel computes it). The prune's unavoidable
    part: the dense run up to ``down_proj``'s input (statistics need the dense layer's inputs), the
    Gram products of both inputs (blocks on and above the diagonal, ``rcpu.stats.batch_gram``) and the
    pruned layer's ``o_proj`` and MLP on the kept units (the kept heads' attention is reused).
    Compensation (SVD, products with G) is not counted: it is extra to this floor."""
    import math

    from rcpu.stats import GRAM_BLOCK

    a = lm.adapter
    h, hd = a.hidden_size, a.head_dim

    def tri(d: int) -> float:
        blocks = max(1, math.ceil(d / GRAM_BLOCK))
        return d * d * (blocks + 1) / (2 * blocks)

    forward = floor = 0.0
    for i, record in enumerate(records):
        heads, kv, channels = a.num_heads(i), a.num_kv_heads(i), a.num_channels(i)
        q, kvp, o = h * heads * hd, 2 * h * kv * hd, heads * hd * h
        attention = 2 * heads * hd * seq_len
        mlp_in, down = 2 * h * channels, channels * h
        layer = q + kvp + o + attention + mlp_in + down
        forward += layer
        kept_heads = record.get("o_proj", {}).get("kept_units", heads)
        kept_channels = record.get("down_proj", {}).get("kept_units", channels)
        floor += (layer - down) + tri(heads * hd) + tri(channels)
        floor += kept_heads * hd * h + 3 * h * kept_channels
    return {"forward_flops_per_token": 2 * forward, "floor_flops_per_token": 2 * floor, "floor_ratio": floor / forward}


def gram_error(lm, windows, batch_size: int = 8) -> list[dict]:
    """Float32 Gram products per batch (the library's default) against all-float64 products, on the same
    inputs of a few layers' ``o_proj`` and ``down_proj``: the Gram itself, and what it changes in the
    compensated weights and relative errors of rotation and least squares (the most sensitive method)."""
    import math

    import torch

    from rcpu.compensate import compensate
    from rcpu.flow import LayerFlow
    from rcpu.problem import KeptProblem
    from rcpu.scores import select
    from rcpu.stats import StatsAccumulator

    adapter = lm.adapter
    n = adapter.num_layers
    layers = sorted({0, n // 2, n - 1})
    flow = LayerFlow(adapter, windows, batch_size)
    rows = []
    for index in range(n):
        if index not in layers:
            flow.run_layer(index)
            continue
        accs: dict = {}
        handles = []
        for sub in ("o_proj", "down_proj"):
            def hook(mod, args, sub=sub, accs=accs):
                x = args[0]
                if sub not in accs:
                    accs[sub] = (StatsAccumulator(x.shape[-1], 0),
                                 StatsAccumulator(x.shape[-1], 0, float32_from=math.inf))
                for acc in accs[sub]:
                    acc.add(x)
            handles.append(adapter.sublayer(index, sub).register_forward_pre_hook(hook))
        try:
            flow.run_layer(index)
        finally:
            for h in handles:
                h.remove()
        for sub, (fast, exact) in accs.items():
            g32, g64 = fast.finish(), exact.finish()
            diff = g32.gram - g64.gram
            scale = torch.sqrt(torch.outer(g64.gram.diagonal(), g64.gram.diagonal())).clamp_min(1e-300)
            weight = adapter.sublayer(index, sub).weight
            sel = select(weight, g64, "rcpu", 0.2, adapter.unit_size(sub))
            row = {"layer": index, "sublayer": sub, "tokens": g64.count,
                   "gram_rel_frobenius": float(diff.norm() / g64.gram.norm()),
                   "gram_max_scaled": float((diff.abs() / scale).max())}
            for method in ("rotation", "ls"):
                w32 = compensate(method, weight, g32, sel.kept).weight
                w64 = compensate(method, weight, g64, sel.kept).weight
                problem = KeptProblem(weight, g64, sel.kept)
                row[f"{method}_weight_rel"] = float((w32 - w64).norm() / w64.norm())
                row[f"{method}_error_diff"] = abs(problem.relative_error(w32) - problem.relative_error(w64))
            rows.append(row)
    return rows


def run(lm, settings: Settings, out_dir: Path, started: float, profile: bool = False) -> dict:
    import torch

    from rcpu.calibration import prepare_tokens
    from rcpu.config import PruneConfig
    from rcpu.prune import prune_model

    data = data_config(settings, calib_samples=settings.floor_samples, heldout_samples=0)
    tokens = prepare_tokens(lm, data.data, data.sampling)
    cfg = PruneConfig(ratio=RATIO, targets="both", score="rcpu", method="rotation")
    forwards, prunes = [], []
    profiler = Profiler(profile)
    forward_pass(lm, tokens.calibration[:1])  # warm-up: first calls allocate and pick kernels
    for _ in range(settings.floor_repeats):
        seconds, _ = timed(lambda: forward_pass(lm, tokens.calibration))
        forwards.append(seconds)
        with profiler, instrumented() as inner:
            seconds, result = timed(lambda: prune_model(lm, data, cfg, tokens=tokens))
        prunes.append((seconds, dict(result.timing_s), dict(inner)))
        records = result.layers
        del result
    forward_s = min(forwards)
    prune_s, timing, inner = min(prunes, key=lambda p: p[0])
    parts = {k: timing[k] for k in ("statistics", "compensation", "recompute")}
    parts["other"] = max(timing["total"] - sum(parts.values()), 0.0)  # model copy, capture, layout
    detail = {
        "statistics: dense layer run": timing["statistics"] - inner["gram"],
        "statistics: Gram accumulation": inner["gram"],
        "compensation: SVD (procrustes)": inner["svd"],
        "compensation: per-layer errors": inner["errors"],
        "compensation: scores, selection, M, weight update": timing["compensation"] - inner["svd"] - inner["errors"],
        "recompute: surgery (apply_plan)": inner["surgery"],
        "recompute: pruned layer run": timing["recompute"] - inner["surgery"],
        "other": parts["other"],
    }
    ratio = prune_s / forward_s
    goals = [goal("prune / forward", ratio, "<=", GOAL_RATIO)]
    floor = flop_floor(lm, records, settings.seq_len)
    tokens_n = int(tokens.calibration.numel())
    forward_rate = floor["forward_flops_per_token"] * tokens_n / forward_s  # FLOP/s of this run's forward
    floor["forward_gflops"] = forward_rate / 1e9
    floor["floor_s"] = floor["floor_flops_per_token"] * tokens_n / forward_rate
    floor["prune_over_floor"] = prune_s / floor["floor_s"]
    goals.append(goal("prune / its forward-work floor (floor at this run's forward FLOP rate)",
                      floor["prune_over_floor"], "<=", GOAL_RATIO))
    say(f"  floor: the prune's unavoidable forward work is {floor['floor_ratio']:.2f} forwards "
        f"({floor['floor_s']:.1f} s at the forward's {floor['forward_gflops']:.1f} GFLOP/s); "
        f"prune / floor {floor['prune_over_floor']:.2f}")
    precision = gram_error(lm, tokens.calibration)
    worst = {k: max(r[k] for r in precision) for k in precision[0] if k not in ("layer", "sublayer", "tokens")}
    say("  float32 Gram products vs float64, worst of " + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()))
    say(f"floor: forward {forward_s:.2f} s, prune {prune_s:.2f} s over {tokens_n} tokens "
        f"({lm.adapter.num_layers} layers, torch threads {torch.get_num_threads()})")
    say("  prune split: " + ", ".join(f"{k} {v:.2f} s" for k, v in parts.items()))
    say("  in detail: " + ", ".join(f"{k} {v:.2f} s" for k, v in detail.items()))
    for g in goals:
        say("  " + format_goal(g))
    return write_result(out_dir, "floor", settings, {
        "calibration": {"samples": settings.floor_samples, "seq_len": settings.seq_len, "tokens": tokens_n},
        "prune_config": {"ratio": RATIO, "targets": "both", "score": "rcpu", "method": "rotation"},
        "forward_s": forward_s,
        "prune_s": prune_s,
        "forward_runs_s": forwards,
        "prune_runs_s": [p[0] for p in prunes],
        "prune_split_s": parts,
        "prune_split_per_forward": {k: v / forward_s for k, v in parts.items()},
        "prune_detail_s": detail,
        "ratio": ratio,
        "goals": goals,
        "flop_floor": floor,
        "gram_precision": precision,
        "gram_precision_worst": worst,
        "profile": profiler.top(),
    }, started)
