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
    tokens_n = int(tokens.calibration.numel())
    say(f"floor: forward {forward_s:.2f} s, prune {prune_s:.2f} s over {tokens_n} tokens "
        f"({lm.adapter.num_layers} layers, torch threads {torch.get_num_threads()})")
    say("  prune split: " + ", ".join(f"{k} {v:.2f} s" for k, v in parts.items()))
    say("  in detail: " + ", ".join(f"{k} {v:.2f} s" for k, v in detail.items()))
    say("  " + format_goal(goals[0]))
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
        "profile": profiler.top(),
    }, started)
