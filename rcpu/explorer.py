"""Analyse one sublayer of a loaded model: the one route the CLI, the app and the benchmarks take.

A ``LayerExplorer`` keeps what it computed in memory: layer statistics (also
cached on disk), each sublayer's selection-independent basis, and each
method's analysis per (statistics, sublayer, ratio, score, strengths, rounding). Switching
ratio, score or method back and forth then costs nothing, and adding a method
computes only that method.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import replace

from .analysis import SublayerAnalysis, analyze_sublayer, prepare_sublayer
from .calibration import LayerData, layer_stats, stats_path
from .compensate import check_method
from .config import DataConfig, LayerConfig
from .errors import RcpuError
from .flow import Progress
from .memo import Memo
from .models import LoadedModel
from .reports import LayerReport
from .scores import unit_seed

DEFAULT_METHODS = ("none", "bias", "ls", "rotation")  # what the layer explorer compares at first

# Wraps work that runs the model (forward hooks): the app passes a lock shared by its sessions.
ModelGuard = Callable[[str], AbstractContextManager]


def _no_guard(what: str) -> AbstractContextManager:
    return contextlib.nullcontext()


class LayerExplorer:
    def __init__(self, max_stats: int = 6, max_analyses: int = 16, max_bases: int = 4):
        self._stats = Memo(max_stats)
        self._analyses = Memo(max_analyses)
        self._bases = Memo(max_bases)  # (stats, sublayer) -> SublayerBasis, shared by every ratio and score
        self._lock = threading.Lock()

    @staticmethod
    def _stats_key(lm: LoadedModel, data: DataConfig, layer: int) -> tuple:
        return (lm.fingerprint, data.data, data.sampling, layer)

    def layer_data(self, lm: LoadedModel, data: DataConfig, layer: int, progress: Progress | None = None,
                   guard: ModelGuard = _no_guard) -> LayerData:
        """A layer's statistics: from memory, from ``cache/``, or computed (inside ``guard``)."""
        lm.adapter.check_layer(layer)
        key = self._stats_key(lm, data, layer)
        hit = self._stats.get(key)
        if hit is not None:
            return hit
        if stats_path(lm, data.data, data.sampling, layer).exists():  # on disk: no forward pass
            result = layer_stats(lm, data.data, data.sampling, layer)
        else:
            with guard(f"the statistics of layer {layer}"):
                result = layer_stats(lm, data.data, data.sampling, layer, progress)
        self._stats.put(key, result)
        return result

    def analysis(self, lm: LoadedModel, data: DataConfig, stats: LayerData, cfg: LayerConfig,
                 methods: list[str]) -> SublayerAnalysis:
        """The analysis holding exactly ``methods`` in that order; new methods are computed together
        and merged into the stored analysis (the shared part depends only on the selection)."""
        methods = list(dict.fromkeys(methods or [cfg.method]))
        key = (self._stats_key(lm, data, cfg.layer), cfg.sublayer, float(cfg.ratio), cfg.score, cfg.alpha, cfg.lam,
               cfg.rounding)
        with self._lock:
            stored: SublayerAnalysis | None = self._analyses.get(key)
            missing = [m for m in methods if stored is None or m not in stored.methods]
            if missing:
                weight = lm.adapter.sublayer(cfg.layer, cfg.sublayer).weight
                calibration, heldout = stats.calibration[cfg.sublayer], stats.heldout[cfg.sublayer]
                basis = self._bases.get_or_compute(
                    (key[0], cfg.sublayer), lambda: prepare_sublayer(weight, calibration, heldout, data.seed)
                )
                fresh = analyze_sublayer(
                    weight, calibration, heldout, score=cfg.score, ratio=cfg.ratio, methods=missing,
                    unit_size=lm.adapter.unit_size(cfg.sublayer), alpha=cfg.alpha, lam=cfg.lam, seed=data.seed,
                    what=lm.adapter.unit_name(cfg.sublayer), rounding=cfg.rounding, basis=basis,
                    score_seed=unit_seed(data.seed, cfg.layer, cfg.sublayer),
                )
                stored = fresh if stored is None else replace(stored, methods={**stored.methods, **fresh.methods})
                self._analyses.put(key, stored)
        return replace(stored, methods={m: stored.methods[m] for m in methods})

    def explore(self, lm: LoadedModel, data: DataConfig, cfg: LayerConfig, methods: list[str] | None = None,
                progress: Progress | None = None, guard: ModelGuard = _no_guard) -> LayerReport:
        """Statistics of ``cfg.layer`` and the analysis of ``cfg.sublayer`` for ``methods``
        (default: ``cfg.method``); every setting is checked before any work."""
        start = time.perf_counter()
        methods = list(methods or [cfg.method])
        cfg.check(lm)
        for method in methods:
            check_method(method)
        if data.heldout_samples < 1:
            raise RcpuError("layer diagnostics need held-out tokens: use --heldout-samples 1 or more")
        stats = self.layer_data(lm, data, cfg.layer, progress, guard)
        analysis = self.analysis(lm, data, stats, cfg, methods)
        return LayerReport(data, cfg, stats, analysis, time.perf_counter() - start)
