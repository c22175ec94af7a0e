"""Quality: perplexity of every config at several ratios, and a calibration-size curve.

Points come from ``rcpu.sweep.run_sweep``, which caches every finished point in
``cache/results/``: a re-run computes nothing new. Calibration uses the embedded
defaults (32 x 512 tokens, seed 0) with ``heldout_samples=0`` (held-out statistics
are not needed for perplexity; it is evaluated on the held-out part of the text, or
on ``--eval-data``). The expected ordering on small models (method page, section 7)
is checked at every ratio: rcpu:rotation <= fluctuation:bias <= wanda_sp:none.
"""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

from .common import Settings, data_config, format_goal, goal, say, write_result

ORDER = ("rcpu:rotation", "fluctuation:bias", "wanda_sp:none")


def _pairs(configs) -> tuple[tuple[str, str], ...]:
    from rcpu.config import parse_configs

    return parse_configs(",".join(configs))


def _sweep(lm, data, spec, evaluation, label: str) -> dict:
    from rcpu.sweep import run_sweep

    def on_point(done: int, total: int, row: dict) -> None:
        where = "cached" if row.get("cached") else f"{row['timing_s']['total']:.0f} s"
        say(f"  [{label} {done}/{total}] {row['config']} ratio {row['ratio']} calib {row['calib_samples']}: "
            f"ppl {row['ppl']:.3f} ({where})")

    result = run_sweep(lm, data, spec, evaluation, on_point=on_point)
    return {"dense": result["dense"], "points": result["points"]}


def _rows(points: list[dict]) -> list[dict]:
    keep = ("config", "score", "method", "ratio", "calib_samples", "ppl", "ppl_dense", "params_before",
            "params_after", "eval_tokens", "cached", "eval_data")
    return [{k: p.get(k) for k in keep} for p in points]


def _ordering_goals(rows: list[dict], label: str) -> list[dict]:
    goals = []
    by = {(r["config"], r["ratio"]): r["ppl"] for r in rows}
    for ratio in sorted({r["ratio"] for r in rows}):
        for better, worse in pairwise(ORDER):
            if (better, ratio) in by and (worse, ratio) in by:
                goals.append(goal(f"{label} ratio {ratio}: ppl {better} / {worse}",
                                  by[(better, ratio)] / by[(worse, ratio)], "<=", 1.0))
    return goals


def run(lm, settings: Settings, out_dir: Path, started: float, profile: bool = False,
        eval_data: list[str] | None = None) -> dict:
    from rcpu.config import EvalConfig, SweepConfig

    data = data_config(settings, heldout_samples=0)
    configs = _pairs(settings.configs)
    evaluation = EvalConfig(None, settings.quality_eval_windows)
    say(f"quality: {len(configs)} configs x ratios {list(settings.ratios)}, calibration {data.calib_samples} x "
        f"{data.seq_len}, eval windows {settings.quality_eval_windows or 'all'} (cached points are reused)")
    tables = {}
    table_spec = SweepConfig(ratios=tuple(settings.ratios), configs=configs)
    tables["held-out part of the calibration text"] = _sweep(lm, data, table_spec, evaluation, "table")
    for path in eval_data or []:
        tables[path] = _sweep(lm, data, table_spec, EvalConfig(path, settings.quality_eval_windows), path)
    curve_spec = SweepConfig(ratios=(settings.curve_ratio,), configs=_pairs(settings.curve_configs),
                           calib_samples=tuple(settings.curve_samples))
    curve = _sweep(lm, data, curve_spec, evaluation, "curve")
    goals = []
    for label, table in tables.items():
        goals += _ordering_goals(_rows(table["points"]), "held-out" if label.startswith("held-out") else label)
    for g in goals:
        say("  " + format_goal(g))
    return write_result(out_dir, "quality", settings, {
        "calibration": {"samples": data.calib_samples, "seq_len": data.seq_len, "seed": data.seed,
                        "heldout_samples": data.heldout_samples, "data": data.data},
        "eval_windows": settings.quality_eval_windows,
        "targets": "both",
        "tables": {label: {"dense": t["dense"], "rows": _rows(t["points"])} for label, t in tables.items()},
        "curve": {"ratio": settings.curve_ratio, "dense": curve["dense"], "rows": _rows(curve["points"])},
        "goals": goals,
    }, started)
