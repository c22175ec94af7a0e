"""Perplexity sweeps over (ratio, score:method) and calibration size, with a result cache.

Every finished point is written to ``cache/results/`` as soon as it is done, so a
re-run computes nothing and an interrupted sweep resumes where it stopped. A
point is the ``PruneReport`` JSON of ``prune_and_evaluate`` with only the relative
output errors of the per-layer records (``layer_errors``; held-out ones where the
point was computed with ``heldout_errors``; points cached before have none).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from .allocate import ALLOCATION_VERSION
from .cache import load_json, save_json
from .config import DataConfig, EvalConfig, PruneConfig, SweepConfig
from .flow import Progress
from .models import LoadedModel
from .pipeline import dense_perplexity, eval_fields, prune_and_evaluate, result_path
from .reports import layer_errors


def point_path(lm: LoadedModel, data: DataConfig, evaluation: EvalConfig, cfg: PruneConfig) -> Path:
    prune = asdict(cfg)
    if prune["allocation"] == "uniform":
        del prune["allocation"]  # the key points cached before allocations existed had
    else:
        prune["allocation_version"] = ALLOCATION_VERSION  # a point of an earlier rule is not this rule's
    if prune["compensate"] == "both":  # the default: keys of points cached before the option existed still hold
        del prune["compensate"]
    fields = {**eval_fields(lm, data, evaluation), "sampling": asdict(data.sampling), "prune": prune}
    return result_path("point", fields)


def prune_point(
    lm: LoadedModel, data: DataConfig, evaluation: EvalConfig, cfg: PruneConfig,
    progress: Progress | None = None, compute: bool = True, heldout_errors: bool = False,
) -> dict | None:
    """One point (cached): prune with ``cfg``, evaluate, return a flat row. ``heldout_errors``: also measure each
    layer's relative output error on held-out windows (``data.heldout_samples``) when the point is computed."""
    path = point_path(lm, data, evaluation, cfg)
    cached = load_json(path)
    if cached is not None:
        cached["cached"] = True
        return cached
    if not compute:
        return None

    def stage_progress(stage: str, done: int, total: int, what: str) -> None:
        if progress and stage == "prune":
            progress(done, total, what)

    report = prune_and_evaluate(lm, data, cfg, evaluation, progress=stage_progress, only_perplexity=True,
                                heldout_errors=heldout_errors)
    return save_point(lm, data, evaluation, cfg, report)


def save_point(lm: LoadedModel, data: DataConfig, evaluation: EvalConfig, cfg: PruneConfig, report) -> dict:
    """Cache a finished ``prune_and_evaluate`` as the sweep point of the same configuration.

    The whole-model page calls this too, so a configuration pruned there shows as cached on the
    sweep (the pruned weights and perplexity do not depend on the held-out statistics it adds).
    """
    row = report.to_json()
    row["layer_errors"] = layer_errors(row.pop("layers", None) or [])
    save_json(point_path(lm, data, evaluation, cfg), row)
    row["cached"] = False
    return row


PointCallback = Callable[[int, int, dict], None]


def run_sweep(
    lm: LoadedModel, data: DataConfig, spec: SweepConfig, evaluation: EvalConfig | None = None, *,
    compute: bool = True, progress: Progress | None = None, on_point: PointCallback | None = None,
) -> dict:
    """{dense, points, missing}; with ``compute=False`` only what is cached (nothing runs)."""
    return run_points(lm, data, spec.points(data), evaluation, compute=compute, progress=progress, on_point=on_point)


def run_points(
    lm: LoadedModel, data: DataConfig, points: list[tuple[DataConfig, PruneConfig]],
    evaluation: EvalConfig | None = None, *,
    compute: bool = True, progress: Progress | None = None, on_point: PointCallback | None = None,
    heldout_errors: bool = False,
) -> dict:
    """``run_sweep`` on a list of points that no one grid spans (the paper's experiments); ``heldout_errors``: see
    ``prune_point``."""
    evaluation = evaluation or EvalConfig()
    dense = dense_perplexity(lm, data, evaluation, compute=compute)
    rows = []
    for i, (d, cfg) in enumerate(points):
        row = prune_point(lm, d, evaluation, cfg, progress=progress, compute=compute, heldout_errors=heldout_errors)
        if row is not None:
            rows.append(row)
            if on_point:
                on_point(i + 1, len(points), row)
    return {"dense": dense, "points": rows, "missing": len(points) - len(rows)}


CSV_COLUMNS = ("config", "score", "method", "lambda", "ratio", "rounding", "targets", "calib_samples", "ppl",
               "ppl_dense", "params_before", "params_after", "eval_tokens", "cached", "allocation")


def to_csv(rows: list[dict], columns: tuple[str, ...] = CSV_COLUMNS) -> str:
    lines = [",".join(columns)]
    for row in rows:
        lines.append(",".join(str(row.get(c, "")) for c in columns))
    return "\n".join(lines) + "\n"
