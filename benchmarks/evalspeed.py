"""Evaluation throughput: ``rcpu.evaluate.perplexity`` against a plain transformers loop.

Both evaluate the same windows in the same run; the plain loop is what a user writes
by hand: ``model(input_ids=window, labels=window)`` per window. The two are run
alternately ``eval_repeats`` times after a one-window warm-up, and each keeps its best
time. Goal: rcpu tokens/s / plain tokens/s >= 0.95. The perplexities must agree.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from .common import Profiler, Settings, data_config, format_goal, goal, say, write_result

GOAL_RATIO = 0.95


def plain_loop(model, windows: torch.Tensor) -> dict:
    total_nll, total_tokens = 0.0, 0
    start = time.perf_counter()
    with torch.no_grad():
        for window in windows:
            ids = window[None]
            loss = model(input_ids=ids, labels=ids).loss  # mean over the L-1 predicted tokens
            total_nll += float(loss) * (ids.shape[1] - 1)
            total_tokens += ids.shape[1] - 1
    seconds = time.perf_counter() - start
    return {"ppl": math.exp(total_nll / total_tokens), "seconds": seconds,
            "tokens_per_s": windows.numel() / seconds}


def run(lm, settings: Settings, out_dir: Path, started: float, profile: bool = False) -> dict:
    from rcpu.config import EvalConfig
    from rcpu.evaluate import evaluation_windows, perplexity

    data = data_config(settings)
    windows = evaluation_windows(lm, data, EvalConfig(None, settings.eval_windows))
    profiler = Profiler(profile)
    perplexity(lm.model, windows[:1])  # warm-up
    plain_loop(lm.model, windows[:1])
    ours, plain = [], []
    for _ in range(settings.eval_repeats):
        with profiler:
            ours.append(perplexity(lm.model, windows))
        plain.append(plain_loop(lm.model, windows))
    best_ours = max(ours, key=lambda r: r["tokens_per_s"])
    best_plain = max(plain, key=lambda r: r["tokens_per_s"])
    ratio = best_ours["tokens_per_s"] / best_plain["tokens_per_s"]
    g = goal("rcpu / plain tokens per second", ratio, ">=", GOAL_RATIO)
    say(f"eval: {len(windows)} windows x {windows.shape[1]} tokens: rcpu {best_ours['tokens_per_s']:.0f} tok/s "
        f"(ppl {best_ours['ppl']:.3f}), plain loop {best_plain['tokens_per_s']:.0f} tok/s "
        f"(ppl {best_plain['ppl']:.3f})")
    say("  " + format_goal(g))
    return write_result(out_dir, "eval", settings, {
        "windows": len(windows),
        "seq_len": int(windows.shape[1]),
        "rcpu": {"tokens_per_s": best_ours["tokens_per_s"], "seconds": best_ours["seconds"],
                 "ppl": best_ours["ppl"], "batch_size": 4, "runs_tokens_per_s": [r["tokens_per_s"] for r in ours]},
        "plain": {"tokens_per_s": best_plain["tokens_per_s"], "seconds": best_plain["seconds"],
                  "ppl": best_plain["ppl"], "batch_size": 1, "runs_tokens_per_s": [r["tokens_per_s"] for r in plain]},
        "ppl_relative_difference": abs(best_ours["ppl"] - best_plain["ppl"]) / best_plain["ppl"],
        "ratio": ratio,
        "goals": [g],
        "profile": profiler.top(),
    }, started)
