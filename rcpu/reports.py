"""The results of the two workflows as JSON: one shape for the CLI, the app and the benchmarks.

``LayerReport`` is one sublayer's analysis (``rcpu layer --json``, the layer explorer);
``PruneReport`` is a whole-model prune with perplexities (``rcpu prune --json``, the
whole-model page's download, every sweep point).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from .adapters import DecoderAdapter
from .analysis import SublayerAnalysis
from .calibration import LayerData
from .config import DataConfig, EvalConfig, LayerConfig
from .prune import PruneResult
from .scores import Selection, select, unit_seed


def _list(t: Tensor | None, limit: int | None = None) -> list | None:
    if t is None:
        return None
    values = t.detach().cpu().to(torch.float64)
    if limit is not None:
        values = values[:limit]
    return [round(float(v), 8) for v in values]


def method_summary(analysis: SublayerAnalysis, method: str) -> dict:
    """One method on one sublayer: selection, errors, geometry, rotation and spectra."""
    res = analysis.methods[method].complete()
    sel = analysis.selection
    geo = res.geometry
    rot = res.rotation
    return {
        "ratio": sel.ratio,
        "rounding": sel.rounding,
        "score": sel.score,
        "method": method,
        "d_in": analysis.d_in,
        "d_out": analysis.d_out,
        "unit_size": sel.unit_size,
        "kept": sel.kept.tolist(),
        "pruned": sel.pruned.tolist(),
        "kept_units": sel.kept_units.tolist(),
        "pruned_units": sel.pruned_units.tolist(),
        "error": {"calibration": res.error_calibration, "heldout": res.error_heldout},
        "error_uncompensated": dict(analysis.error_uncompensated),
        "orthogonality_error": rot["orthogonality_error"],
        "distance_from_identity": rot["distance_from_identity"],
        "condition_number_M": rot["condition_number_M"],
        "rank_M": rot["rank_M"],
        "singular_values_M": _list(rot["singular_values_M"]),
        "rotation_angles_deg": _list(rot["rotation_angles_deg"]),
        "norm_ratio": geo["norm_ratio"],
        "cosine": geo["cosine"],
        "gram_distortion": geo["gram_distortion"],
        "principal_angles_deg": _list(res.principal_angles_deg),
        "principal_angles_uncompensated_deg": _list(analysis.principal_angles_z_deg),
        "explained_variance": {
            "original": _list(analysis.explained_variance_y, 32),
            "pruned": _list(analysis.explained_variance_z, 32),
            "compensated": _list(res.explained_variance, 32),
        },
        "timing_s": dict(res.seconds),
    }


@dataclass
class LayerReport:
    """One sublayer of a loaded model: its statistics and the analysis of the requested methods."""

    data: DataConfig
    config: LayerConfig
    stats: LayerData
    analysis: SublayerAnalysis
    seconds: float  # statistics and analysis, from the call's start

    @property
    def calibration_tokens(self) -> int:
        return self.stats.calibration[self.config.sublayer].count

    @property
    def heldout_tokens(self) -> int:
        return self.stats.heldout[self.config.sublayer].count

    def kept_set(self, score: str) -> Selection:
        """The selection another score makes at the same ratio (to compare kept sets)."""
        sel = self.analysis.selection
        return select(self.analysis.basis.weight, self.stats.calibration[self.config.sublayer], score,
                      sel.ratio, sel.unit_size, unit_seed(self.data.seed, self.config.layer, self.config.sublayer),
                      rounding=sel.rounding)

    def to_json(self, method: str | None = None) -> dict:
        """The ``rcpu layer`` JSON of ``method`` (default: the config's), with settings and timings."""
        cfg, data = self.config, self.data
        report = {"layer": cfg.layer, "sublayer": cfg.sublayer, "model": data.model, "data": data.data}
        report.update(method_summary(self.analysis, method or cfg.method))
        report["alpha"] = cfg.alpha
        report["lambda"] = cfg.lam
        report["settings"] = {
            "calib_samples": data.calib_samples,
            "seq_len": data.seq_len,
            "seed": data.seed,
            "heldout_samples": data.heldout_samples,
            "calibration_tokens": self.calibration_tokens,
            "heldout_tokens": self.heldout_tokens,
            # what decides whether least squares or rotation wins (method page, section 8)
            "calibration_tokens_per_input_dim": self.calibration_tokens / self.analysis.d_in,
        }
        report["timing_s"].update(
            {"statistics": self.stats.seconds, "statistics_from_cache": self.stats.from_cache,
             "total": self.seconds}
        )
        return report


def units_removed_text(summary: dict) -> str:
    """``"2 of 9 heads, 307 of 1536 channels per layer"`` from a ``PruneReport`` JSON; with a non-uniform
    allocation the totals over all layers and the range per layer."""
    allocated = summary.get("allocated") or {}
    if allocated.get("rule", "uniform") != "uniform":
        return ", ".join(f"{a['total_removed']} of {sum(a['units'])} {DecoderAdapter.unit_name(s)} in all layers "
                         f"({min(a['removed'])} to {max(a['removed'])} per layer)"
                         for s in summary["units_pruned"] for a in [allocated[s]])
    return ", ".join(f"{summary['units_pruned'][s]} of {summary['units'][s]} {DecoderAdapter.unit_name(s)}"
                     for s in summary["units_pruned"]) + " per layer"


def spread_text(spread: dict | None) -> str:
    """What the greedy allocation's choice of spread was made on, in a sentence (empty without one)."""
    if not spread:
        return ""
    losses = ", ".join(f"{s}x {nll:.4f}" for s, nll in spread["heldback_nll"].items())
    return (f"No sublayer lost more than {spread['chosen']:g}x the uniform count: of the spreads tried "
            f"(1x is uniform), the one whose trial prune ({spread['trial_method']}, fitted on "
            f"{spread['fit_windows']} calibration windows) had the lowest loss on the "
            f"{spread['heldback_windows']} held-back calibration windows (mean NLL: {losses}).")


def auto_wins(layers: list[dict], sublayers: tuple[str, ...]) -> dict:
    """How many layers each ``auto`` candidate won, per sublayer."""
    wins: dict = {}
    for sub in sublayers:
        for layer in layers:
            if "auto" in layer.get(sub, {}):
                name = layer[sub]["auto"]["candidate"]
                wins.setdefault(sub, {})[name] = wins.get(sub, {}).get(name, 0) + 1
    return wins


def layer_errors(layers: list[dict]) -> list[dict]:
    """The relative output errors of ``PruneResult.layers`` records, per layer and sublayer, and nothing else:
    ``[{"layer": i, "down_proj": {"error_calibration", "error_uncompensated_calibration", and, where the prune
    had held-out windows, "error_heldout", "error_uncompensated_heldout"}, ...}]`` (what a sweep point keeps)."""
    out = []
    for record in layers:
        row: dict = {"layer": record["layer"]}
        for sub, values in record.items():
            if isinstance(values, dict) and any(k.startswith("error_") for k in values):
                row[sub] = {k: float(v) for k, v in values.items() if k.startswith("error_")}
        out.append(row)
    return out


@dataclass
class PruneReport:
    """A whole-model prune and the perplexity of the dense and the pruned model on the same windows."""

    result: PruneResult
    evaluation: EvalConfig
    dense: dict  # perplexity() of the source model
    pruned: dict  # perplexity() of the pruned model
    seconds: float  # the whole workflow
    stock: dict = field(default_factory=dict)  # stock_loadable, and stock_class or why_not_stock

    def settings(self) -> dict:
        """What was done and measured: the record saved in a pruned model's config."""
        r, data = self.result, self.result.data
        settings = asdict(r.config)
        settings["lambda"] = settings.pop("lam")
        first = r.layers[0]
        return {
            **settings,
            "config": r.config.label,
            "model": data.model,
            "data": data.data,
            "calib_samples": data.calib_samples,
            "seq_len": data.seq_len,
            "seed": data.seed,
            "heldout_samples": data.heldout_samples,
            "eval_data": self.evaluation.describe(data),
            "eval_windows": self.evaluation.eval_windows,
            "ppl": self.pruned["ppl"],
            "ppl_dense": self.dense["ppl"],
            "params_before": r.params_before,
            "params_after": r.params_after,
            "params_removed_fraction": 1 - r.params_after / r.params_before,
            "eval_tokens": self.pruned["eval_tokens"],
            # per sublayer, in the first layer (every layer has the same shapes and tokens)
            "units_pruned": {sub: first[sub]["pruned_units"] for sub in r.config.sublayers},
            "units": {sub: first[sub]["pruned_units"] + first[sub]["kept_units"] for sub in r.config.sublayers},
            "calibration_tokens_per_input_dim": {
                sub: first[sub]["calibration_tokens_per_input_dim"] for sub in r.config.sublayers
            },
            # [before, after] summed over layers: what the pruned model really holds
            "shape": {what: [sum(layer["shape"][what][k] for layer in r.layers) for k in (0, 1)]
                      for what in first["shape"]},
            # units removed per layer and in total against the uniform ratio's (same totals, exactly)
            "allocated": r.allocation,
            **({"auto_wins": auto_wins(r.layers, r.config.sublayers)} if r.config.method == "auto" else {}),
            **self.stock,
        }

    def to_json(self) -> dict:
        """Settings, perplexities, parameters, per-layer errors and timings."""
        timing = {k: v for k, v in self.result.timing_s.items() if k != "total"}
        return {
            **self.settings(),
            "eval_tokens_per_s": self.pruned["tokens_per_s"],
            "layers": self.result.layers,
            "timing_s": {**timing, "prune": self.result.timing_s["total"], "eval": self.pruned["seconds"],
                         "total": self.seconds},
        }
