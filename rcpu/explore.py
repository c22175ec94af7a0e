"""One layer of a loaded model, end to end: cached statistics, then the analysis."""

from __future__ import annotations

import time

from .calibration import LayerData, layer_stats
from .config import DataConfig, LayerConfig
from .errors import RcpuError
from .flow import Progress
from .layer import SublayerAnalysis, analyze_sublayer, summary
from .models import LoadedModel
from .scores import check_keeps_some, check_ratio


def explore_layer(
    lm: LoadedModel,
    data: DataConfig,
    cfg: LayerConfig,
    methods: list[str] | None = None,
    progress: Progress | None = None,
) -> tuple[LayerData, SublayerAnalysis]:
    """Statistics of ``cfg.layer`` (cached) and the analysis of ``cfg.sublayer`` for ``methods``."""
    if cfg.sublayer not in ("o_proj", "down_proj"):
        raise RcpuError(f"unknown sublayer {cfg.sublayer!r}; choose o_proj or down_proj")
    check_ratio(cfg.ratio)
    lm.adapter.check_layer(cfg.layer)
    check_keeps_some(lm.adapter.num_units(cfg.layer, cfg.sublayer), cfg.ratio, lm.adapter.unit_name(cfg.sublayer))
    if data.heldout_samples < 1:
        raise RcpuError("layer diagnostics need held-out tokens: use --heldout-samples 1 or more")
    stats = layer_stats(lm, data.data, data.sampling, cfg.layer, progress)
    weight = lm.adapter.sublayer(cfg.layer, cfg.sublayer).weight
    analysis = analyze_sublayer(
        weight,
        stats.calibration[cfg.sublayer],
        stats.heldout[cfg.sublayer],
        score=cfg.score,
        ratio=cfg.ratio,
        methods=methods or [cfg.method],
        unit_size=lm.adapter.unit_size(cfg.sublayer),
        alpha=cfg.alpha,
        seed=data.seed,
        what=lm.adapter.unit_name(cfg.sublayer),
    )
    return stats, analysis


def layer_report(lm: LoadedModel, data: DataConfig, cfg: LayerConfig, progress: Progress | None = None) -> dict:
    """The ``rcpu layer`` JSON: one method on one sublayer, with settings and timings."""
    start = time.perf_counter()
    stats, analysis = explore_layer(lm, data, cfg, [cfg.method], progress)
    report = {"layer": cfg.layer, "sublayer": cfg.sublayer, "model": data.model, "data": data.data}
    report.update(summary(analysis, cfg.method))
    report["alpha"] = cfg.alpha
    report["settings"] = {
        "calib_samples": data.calib_samples,
        "seq_len": data.seq_len,
        "seed": data.seed,
        "heldout_samples": data.heldout_samples,
        "calibration_tokens": stats.calibration[cfg.sublayer].count,
        "heldout_tokens": stats.heldout[cfg.sublayer].count,
    }
    report["timing_s"].update(
        {"statistics": stats.seconds, "statistics_from_cache": stats.from_cache,
         "total": time.perf_counter() - start}
    )
    return report
