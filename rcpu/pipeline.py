"""Prune a whole model and measure perplexity: the one route the CLI, the app and sweeps take.

``check_before_work`` refuses what would fail midway before anything is computed;
``dense_perplexity`` is the source model's perplexity, cached on disk;
``prune_and_evaluate`` prunes a copy, evaluates both on the same windows and
returns a ``PruneReport``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from torch import Tensor

from .allocate import check_windows
from .cache import cache_root, key_of, load_json, save_json
from .calibration import prepare_tokens
from .config import DataConfig, EvalConfig, PruneConfig
from .evaluate import evaluation_windows, perplexity
from .export import stock_verdict
from .models import LoadedModel, count_parameters
from .prune import LayerCallback, prune_model
from .reports import PruneReport
from .text import text_fingerprint

RESULTS_VERSION = 2  # of the cached perplexities (dense and sweep points)

# (stage, done, total, what); stage is "dense", "prune" or "eval"
StageProgress = Callable[[str, int, int, str], None]


def _stage(progress: StageProgress | None, stage: str):
    if progress is None:
        return None
    return lambda done, total, what: progress(stage, done, total, what)


def check_before_work(lm: LoadedModel, points: list[tuple[DataConfig, PruneConfig]],
                      evaluation: EvalConfig) -> Tensor:
    """Refuse, before anything is computed, cached or drawn as a progress bar, what would fail
    midway: a ratio that leaves a layer nothing, a text too short for the sampling, too few
    evaluation tokens. The tokens are prepared and kept in memory for the run; the evaluation
    windows (of the first point's sequence length) are returned."""
    for data, cfg in points:
        cfg.check(lm)
        check_windows(cfg.allocation, data.sampling.calib_samples)
    for data in {d.sampling: d for d, _ in points}.values():
        prepare_tokens(lm, data.data, data.sampling)
    return evaluation_windows(lm, points[0][0], evaluation)


def result_path(kind: str, fields: dict) -> Path:
    return cache_root() / "results" / f"{kind}-{key_of({'v': RESULTS_VERSION, **fields})}.json"


def eval_fields(lm: LoadedModel, data: DataConfig, evaluation: EvalConfig) -> dict:
    """What a perplexity depends on besides the pruning: the model and the evaluation windows."""
    evaluation = evaluation.against(data)
    source = evaluation.eval_data or data.data
    text = text_fingerprint(source) if evaluation.eval_data else "heldout:" + text_fingerprint(source)
    return {
        "model": lm.fingerprint,
        "data": text_fingerprint(data.data),
        "eval": {"text": text, "windows": evaluation.eval_windows, "seq_len": data.seq_len},
    }


def dense_perplexity(lm: LoadedModel, data: DataConfig, evaluation: EvalConfig | None = None,
                     progress=None, compute: bool = True) -> dict | None:
    """``perplexity()`` of the source model (cached); ``None`` if not cached and not ``compute``."""
    evaluation = evaluation or EvalConfig()
    path = result_path("dense", eval_fields(lm, data, evaluation))
    cached = load_json(path)
    if cached is not None or not compute:
        return cached
    result = perplexity(lm.model, evaluation_windows(lm, data, evaluation), progress=progress)
    result["params"] = count_parameters(lm.model)
    save_json(path, result)
    return result


def prune_and_evaluate(
    lm: LoadedModel,
    data: DataConfig,
    cfg: PruneConfig,
    evaluation: EvalConfig | None = None,
    *,
    progress: StageProgress | None = None,
    on_layer: LayerCallback | None = None,
    only_perplexity: bool = False,
    heldout_errors: bool = False,
) -> PruneReport:
    """Prune a copy of ``lm.model`` with ``cfg`` and measure the dense and pruned perplexity.

    ``only_perplexity`` skips what a sweep point does not need: the per-layer held-out
    statistics and the stock-loadability check (which builds a second model).
    ``heldout_errors`` keeps the held-out statistics even then (each layer's error on held-out windows,
    which the regime view draws; the pruned weights do not depend on them).
    ``on_layer(record)`` gets each layer's errors as soon as it is pruned.
    """
    start = time.perf_counter()
    evaluation = (evaluation or EvalConfig()).against(data)
    check_before_work(lm, [(data, cfg)], evaluation)  # refuses a too-short evaluation text; windows unused
    prune_data = replace(data, heldout_samples=0) if only_perplexity and not heldout_errors else data
    result = prune_model(lm, prune_data, cfg, progress=_stage(progress, "prune"), on_layer=on_layer)
    # Only now, with the pruned model built, are the evaluation windows read (tests/test_auto.py):
    # nothing in the pruning (auto's choices, the allocation) can depend on them.
    windows = evaluation_windows(lm, data, evaluation)
    dense = dense_perplexity(lm, data, evaluation, progress=_stage(progress, "dense"))
    pruned = perplexity(result.model, windows, progress=_stage(progress, "eval"))
    stock = {}
    if not only_perplexity:
        verdict = stock_verdict(result.model)
        stock = {"stock_loadable": verdict.loadable,
                 ("stock_class" if verdict.loadable else "why_not_stock"): verdict.reason}
    return PruneReport(result, evaluation, dense, pruned, time.perf_counter() - start, stock)
