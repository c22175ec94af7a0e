"""Auto: ``--method auto`` and ``--allocation greedy`` against every fixed compensation.

Every config is ``rcpu:<method>`` (the same selection, only the compensation differs) at each
ratio, on two calibration sizes: the default of the mode, and the paper's tokens-per-dimension
regime (about 1.5 calibration tokens per ``down_proj`` input, 128-token windows, as 128 x 128
tokens are for LLaMA-7B's 11008 inputs). Perplexity is on the held-out part of the embedded
text, which neither the choice nor the allocation reads (they split the calibration windows
into folds). Points are cached sweep points: a re-run computes nothing new.

Goals: ``auto`` within 2% of the best fixed method at every ratio, and ``auto`` with the
greedy allocation below uniform ``auto`` at the largest ratio.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rcpu.allocate import FOLDS
from rcpu.text import Sampling

from .common import Settings, format_goal, goal, now, say, write_result

FIXED = ("rotation", "rotation_scale", "rotation_bias", "bias", "ls", "ls_ridge")


@dataclass(frozen=True)
class Regime:
    name: str
    calib_samples: int
    seq_len: int
    eval_windows: int


def regimes(settings: Settings) -> list[Regime]:
    """The default calibration of the mode, and ~1.5 tokens per down_proj input (1536 in the embedded model);
    quick: 1.5 and 5.3 tokens per input (where rotation matters, and where least squares' freedom pays), and
    the tool's own default (32 x 512 tokens, 10.7 per input: what ``rcpu prune`` uses unless told)."""
    if settings.mode == "tiny":
        return [Regime("default", 4, 32, 2), Regime("paper tokens per dimension", 4, 16, 2)]
    default = Regime("default", Sampling.calib_samples, Sampling.seq_len, 8)
    if settings.mode == "quick":  # 128-token windows: a prune of the embedded model takes a minute or two on 2 cores
        return [Regime("paper tokens per dimension", 18, 128, 16), Regime("more tokens per dimension", 64, 128, 16),
                default]
    return [default, Regime("paper tokens per dimension", 18, 128, 32)]


def _kept_tables(out_dir: Path, settings: Settings) -> dict:
    """The tables of the previous result in ``out_dir`` (same mode), for the regimes this run leaves alone."""
    try:
        previous = json.loads((out_dir / "auto.json").read_text())
    except (OSError, ValueError):
        return {}
    if previous.get("mode") != settings.mode:
        return {}
    return {name: {"date": previous.get("date"), **table} for name, table in (previous.get("tables") or {}).items()}


def _rows(points: list[dict]) -> list[dict]:
    keep = ("config", "method", "allocation", "ratio", "calib_samples", "seq_len", "ppl", "ppl_dense",
            "params_before", "params_after", "eval_tokens", "allocated", "auto_wins", "cached")
    # seconds: the point's whole prune and evaluation when it was computed (a cached point keeps them)
    return [{**{k: p.get(k) for k in keep}, "seconds": (p.get("timing_s") or {}).get("total")} for p in points]


EARLIER_RULE = " (fixed 2.5x cap)"


def _mark_earlier_rule(table: dict) -> dict:
    """A kept table whose greedy rows were measured before greedy chose its spread on held-back calibration
    windows (their allocation has no ``spread``; every sublayer could go to 2.5x its uniform count): say so
    in their config, where the table and the goals show it."""
    rows = [{**row, "config": row["config"] + EARLIER_RULE}
            if row.get("allocation") == "greedy" and "spread" not in (row.get("allocated") or {})
            and not row["config"].endswith(EARLIER_RULE) else row for row in table["rows"]]
    return {**table, "rows": rows}


def _goals(rows: list[dict], label: str) -> list[dict]:
    goals = []
    ratios = sorted({r["ratio"] for r in rows})
    for ratio in ratios:
        at = [r for r in rows if r["ratio"] == ratio]
        fixed = [r["ppl"] for r in at if r["method"] in FIXED and r["allocation"] == "uniform"]
        auto = [r["ppl"] for r in at if r["method"] == "auto" and r["allocation"] == "uniform"]
        if fixed and auto:
            goals.append(goal(f"{label} ratio {ratio}: ppl auto / best fixed", auto[0] / min(fixed), "<=", 1.02))
    last = [r for r in rows if r["ratio"] == ratios[-1] and r["method"] == "auto"] if ratios else []
    by = {r["allocation"]: r for r in last}
    if {"uniform", "greedy"} <= set(by):
        rule = EARLIER_RULE if by["greedy"]["config"].endswith(EARLIER_RULE) else ""
        goals.append(goal(f"{label} ratio {ratios[-1]}: ppl auto greedy{rule} / auto uniform",
                          by["greedy"]["ppl"] / by["uniform"]["ppl"], "<", 1.0))
    return goals


def run(lm, settings: Settings, out_dir: Path, started: float, profile: bool = False,
        cached_only: bool = False, only: tuple[str, ...] = ()) -> dict:
    """``cached_only``: tabulate the points already cached, compute none (the rest are listed as missing).
    ``only``: run these regimes (by name); the others keep their tables from the previous result, each with
    the date it was measured (a regime's points take up to an hour on 2 cores)."""
    from rcpu.config import DataConfig, EvalConfig, SweepConfig
    from rcpu.sweep import run_sweep

    ratios = tuple(settings.size_ratios)
    names = [regime.name for regime in regimes(settings)]
    unknown = set(only) - set(names)
    if unknown:
        raise SystemExit(f"auto: no regime {sorted(unknown)} in {settings.mode} mode; there are {names}")
    kept = _kept_tables(out_dir, settings) if only else {}
    tables = {}
    for regime in regimes(settings):
        if only and regime.name not in only:
            if regime.name in kept:
                tables[regime.name] = _mark_earlier_rule(kept[regime.name])
                say(f"auto ({regime.name}): kept from the previous result ({kept[regime.name]['date']})")
            else:
                say(f"auto ({regime.name}): not run, and no previous {settings.mode} result holds it")
            continue
        data = DataConfig(model=settings.model, calib_samples=regime.calib_samples, seq_len=regime.seq_len,
                          heldout_samples=0)
        evaluation = EvalConfig(None, regime.eval_windows)
        specs = [SweepConfig(ratios=ratios, configs=(("rcpu", "auto"),), allocations=("uniform", "greedy")),
                 SweepConfig(ratios=ratios, configs=tuple(("rcpu", m) for m in FIXED))]
        say(f"auto ({regime.name}): {regime.calib_samples} x {regime.seq_len} calibration tokens, ratios "
            f"{list(ratios)}, {regime.eval_windows} evaluation windows")
        points, dense, missing = [], None, 0

        def on_point(done: int, total: int, row: dict, name=regime.name) -> None:
            where = "cached" if row.get("cached") else f"{row['timing_s']['total']:.0f} s"
            say(f"  [{name} {done}/{total}] {row['config']} ratio {row['ratio']}: ppl {row['ppl']:.3f} ({where})")

        for spec in specs:
            result = run_sweep(lm, data, spec, evaluation, on_point=on_point, compute=not cached_only)
            dense = result["dense"] or dense
            points += result["points"]
            missing += result["missing"]
        rows = _rows(points)
        tokens_per_dim = regime.calib_samples * regime.seq_len / lm.adapter.num_units(0, "down_proj")
        tables[regime.name] = {"date": now(), "calib_samples": regime.calib_samples, "seq_len": regime.seq_len,
                               "tokens_per_down_proj_input": tokens_per_dim, "eval_windows": regime.eval_windows,
                               "dense": dense, "rows": rows, "missing_points": missing}
    goals = [g for name, table in tables.items() for g in _goals(table["rows"], name)]
    for g in goals:
        say("  " + format_goal(g))
    return write_result(out_dir, "auto", settings, {"ratios": list(ratios), "score": "rcpu", "folds": FOLDS,
                                                    "tables": tables, "goals": goals}, started)
