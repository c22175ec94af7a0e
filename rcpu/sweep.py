"""Perplexity sweeps over (ratio, score:method) and calibration size, with a result cache.

Every finished point is written to ``cache/results/`` as soon as it is done, so a
re-run computes nothing and an interrupted sweep resumes where it stopped.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

from .cache import cache_root, key_of, load_json, save_json
from .config import DataConfig
from .errors import RcpuError
from .evaluate import evaluation_windows, perplexity
from .flow import Progress
from .models import LoadedModel, count_parameters
from .prune import PruneConfig, prune_model
from .text import text_fingerprint

RESULTS_VERSION = 1


@dataclass(frozen=True)
class EvalSpec:
    eval_data: str | None = None  # None: held-out part of the calibration text
    eval_windows: int | None = None  # None: all windows

    def fingerprint(self, data: DataConfig) -> dict:
        source = self.eval_data or data.data
        return {
            "text": text_fingerprint(source) if self.eval_data else "heldout:" + text_fingerprint(source),
            "windows": self.eval_windows,
            "seq_len": data.seq_len,
        }


def parse_configs(text: str) -> list[tuple[str, str]]:
    """``"rcpu:rotation,wanda_sp:none"`` -> [("rcpu", "rotation"), ("wanda_sp", "none")]."""
    pairs = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        score, sep, method = item.partition(":")
        if not sep:
            raise RcpuError(f"config {item!r} must be SCORE:METHOD, e.g. rcpu:rotation")
        PruneConfig(0.0, "both", score, method).check()
        pairs.append((score, method))
    if not pairs:
        raise RcpuError("no configs given")
    return pairs


def _result_path(kind: str, fields: dict) -> Path:
    return cache_root() / "results" / f"{kind}-{key_of({'v': RESULTS_VERSION, **fields})}.json"


def _eval_fields(lm: LoadedModel, data: DataConfig, spec: EvalSpec) -> dict:
    return {"model": lm.fingerprint, "data": text_fingerprint(data.data), "eval": spec.fingerprint(data)}


def dense_path(lm: LoadedModel, data: DataConfig, spec: EvalSpec) -> Path:
    return _result_path("dense", _eval_fields(lm, data, spec))


def point_path(lm: LoadedModel, data: DataConfig, spec: EvalSpec, cfg: PruneConfig) -> Path:
    return _result_path(
        "point", {**_eval_fields(lm, data, spec), "sampling": asdict(data.sampling), "prune": asdict(cfg)}
    )


def dense_result(lm: LoadedModel, data: DataConfig, spec: EvalSpec, progress: Progress | None = None,
                 compute: bool = True) -> dict | None:
    path = dense_path(lm, data, spec)
    cached = load_json(path)
    if cached is not None or not compute:
        return cached
    windows = evaluation_windows(lm, data, spec.eval_data, spec.eval_windows)
    result = perplexity(lm.model, windows, progress=progress)
    result["params"] = count_parameters(lm.model)
    save_json(path, result)
    return result


def prune_point(
    lm: LoadedModel, data: DataConfig, spec: EvalSpec, cfg: PruneConfig,
    progress: Progress | None = None, compute: bool = True,
) -> dict | None:
    """One point (cached): prune with ``cfg``, evaluate, return a flat row."""
    path = point_path(lm, data, spec, cfg)
    cached = load_json(path)
    if cached is not None:
        cached["cached"] = True
        return cached
    if not compute:
        return None
    dense = dense_result(lm, data, spec)
    start = time.perf_counter()
    # A sweep point needs perplexity only: skip the per-layer held-out statistics.
    result = prune_model(lm, replace(data, heldout_samples=0), cfg, progress=progress)
    windows = evaluation_windows(lm, data, spec.eval_data, spec.eval_windows)
    ev = perplexity(result.model, windows)
    row = {
        **asdict(cfg),
        "config": cfg.label,
        "calib_samples": data.calib_samples,
        "seq_len": data.seq_len,
        "seed": data.seed,
        "model": data.model,
        "data": data.data,
        "eval_data": spec.eval_data or f"{data.data} (held-out part)",
        "ppl": ev["ppl"],
        "ppl_dense": dense["ppl"],
        "params_before": result.params_before,
        "params_after": result.params_after,
        "eval_tokens": ev["eval_tokens"],
        "timing_s": {"prune": result.timing_s["total"], "eval": ev["seconds"],
                     "total": time.perf_counter() - start},
    }
    save_json(path, row)
    row["cached"] = False
    return row


@dataclass(frozen=True)
class SweepSpec:
    ratios: tuple[float, ...] = (0.1, 0.2, 0.3)
    configs: tuple[tuple[str, str], ...] = (("rcpu", "rotation"), ("wanda_sp", "none"), ("fluctuation", "bias"))
    calib_samples: tuple[int, ...] | None = None  # None: the DataConfig's
    targets: str = "both"
    alpha: float = 0.01

    def points(self, data: DataConfig) -> list[tuple[DataConfig, PruneConfig]]:
        sizes = self.calib_samples or (data.calib_samples,)
        return [
            (replace(data, calib_samples=n), PruneConfig(r, self.targets, s, m, self.alpha))
            for n in sizes
            for r in self.ratios
            for s, m in self.configs
        ]


PointCallback = Callable[[int, int, dict], None]


def run_sweep(
    lm: LoadedModel, data: DataConfig, spec: SweepSpec, evaluation: EvalSpec = EvalSpec(), *,
    compute: bool = True, progress: Progress | None = None, on_point: PointCallback | None = None,
) -> dict:
    """{dense, points}; with ``compute=False`` only what is cached (nothing runs)."""
    dense = dense_result(lm, data, evaluation, compute=compute)
    points = spec.points(data)
    rows = []
    for i, (d, cfg) in enumerate(points):
        row = prune_point(lm, d, evaluation, cfg, progress=progress, compute=compute)
        if row is not None:
            rows.append(row)
            if on_point:
                on_point(i + 1, len(points), row)
    return {"dense": dense, "points": rows, "missing": len(points) - len(rows)}


CSV_COLUMNS = ("config", "score", "method", "ratio", "targets", "calib_samples", "ppl", "ppl_dense",
               "params_before", "params_after", "eval_tokens", "cached")


def to_csv(rows: list[dict]) -> str:
    lines = [",".join(CSV_COLUMNS)]
    for row in rows:
        lines.append(",".join(str(row.get(c, "")) for c in CSV_COLUMNS))
    return "\n".join(lines) + "\n"
