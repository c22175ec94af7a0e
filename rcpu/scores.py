"""Importance scores per input column and unit selection (method page, section 2).

A unit is one column (``down_proj`` channel) or ``head_dim`` consecutive columns
(``o_proj`` query head). A unit's score is the sum of its columns' scores; the
lowest-scoring units are pruned.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal

import torch
from torch import Tensor

from .errors import RcpuError
from .stats import LayerStats


def column_norms(weight: Tensor) -> Tensor:
    """``||W[:, j]||`` for every input column j."""  # (d_in,)
    return torch.linalg.vector_norm(weight.to(torch.float64), dim=0)


def input_norms(stats: LayerStats) -> Tensor:
    """``||X[j, :]|| = sqrt(G_jj)``."""  # (d_in,)
    return torch.diagonal(stats.gram).clamp_min(0.0).sqrt()


def _magnitude(weight: Tensor, stats: LayerStats, seed: int) -> Tensor:
    return column_norms(weight)


def _wanda_sp(weight: Tensor, stats: LayerStats, seed: int) -> Tensor:
    return column_norms(weight) * input_norms(stats)


def _fluctuation(weight: Tensor, stats: LayerStats, seed: int) -> Tensor:
    return stats.var * column_norms(weight) ** 2


def _rcpu(weight: Tensor, stats: LayerStats, seed: int) -> Tensor:
    """The authors' released score: ``||W[:,j]|| * E|x_j| * var_j``."""
    return column_norms(weight) * stats.mean_abs * stats.var


def _rcpu_rms(weight: Tensor, stats: LayerStats, seed: int) -> Tensor:
    """The same idea with the input's L2 norm ``sqrt(G_jj)`` in place of ``E|x_j|``."""
    return column_norms(weight) * input_norms(stats) * stats.var


def unit_seed(seed: int, layer: int, sublayer: str) -> int:
    """The seed of the ``random`` score for one sublayer: each layer and sublayer draws its own units."""
    return seed * 1_000_003 + 2 * layer + (sublayer == "down_proj")


def _random(weight: Tensor, stats: LayerStats, seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(weight.shape[1], generator=gen, dtype=torch.float64)


ScoreFn = Callable[[Tensor, LayerStats, int], Tensor]

SCORES: dict[str, ScoreFn] = {
    "magnitude": _magnitude,
    "wanda_sp": _wanda_sp,
    "fluctuation": _fluctuation,
    "rcpu": _rcpu,
    "rcpu_rms": _rcpu_rms,
    "random": _random,
}


def check_score(name: str) -> None:
    if name not in SCORES:
        raise RcpuError(f"unknown score {name!r}; choose one of: {', '.join(SCORES)}")


def score_columns(name: str, weight: Tensor, stats: LayerStats, seed: int = 0) -> Tensor:
    """Per-column importance, float64, shape (d_in,)."""
    check_score(name)
    scores = SCORES[name](weight, stats, seed)
    return torch.nan_to_num(scores.to(torch.float64), nan=0.0, posinf=torch.finfo(torch.float64).max)


def unit_scores(column_scores: Tensor, unit_size: int) -> Tensor:
    """Sum of the column scores of each unit of ``unit_size`` consecutive columns."""
    if column_scores.numel() % unit_size:
        raise ValueError(f"{column_scores.numel()} columns do not split into units of {unit_size}")
    return column_scores.reshape(-1, unit_size).sum(dim=1)


ROUNDINGS = ("nearest", "truncate")


def check_rounding(rounding: str) -> None:
    if rounding not in ROUNDINGS:
        raise RcpuError(f"unknown rounding {rounding!r}; choose one of: {', '.join(ROUNDINGS)}")


def num_pruned(n_units: int, ratio: float, rounding: str = "nearest") -> int:
    """Units removed for a ratio: ``nearest`` rounds half up; ``truncate`` is the authors'
    ``int(ratio * units)`` (in floating point, as their code computes it)."""
    check_ratio(ratio)
    check_rounding(rounding)
    if rounding == "truncate":
        return int(float(ratio) * n_units)
    # Decimal of the ratio as written (0.29, not 0.28999...), so exact halves round up.
    return int((Decimal(repr(float(ratio))) * n_units).to_integral_value(rounding=ROUND_HALF_UP))


def check_ratio(ratio: float) -> None:
    if not (isinstance(ratio, numbers.Real) and math.isfinite(ratio) and 0.0 <= ratio < 1.0):
        raise RcpuError(f"ratio must be in [0, 1), got {ratio!r}")


def check_keeps_some(n_units: int, ratio: float, what: str = "units", rounding: str = "nearest") -> int:
    """Units pruned at ``ratio``; raises if none of the ``n_units`` would be left."""
    n_pruned = num_pruned(n_units, ratio, rounding)
    if n_pruned >= n_units:
        raise RcpuError(f"ratio {ratio} would remove all {n_units} {what} of a layer; use a smaller ratio")
    return n_pruned


def select_units(scores: Tensor, ratio: float, what: str = "units", rounding: str = "nearest") -> tuple[Tensor, Tensor]:
    """(kept, pruned) unit indices, each sorted; the lowest scores are pruned.

    Ties break by index (lower index pruned first), so selection is deterministic.
    """
    n_pruned = check_keeps_some(scores.numel(), ratio, what, rounding)
    order = torch.sort(scores, stable=True).indices
    pruned = torch.sort(order[:n_pruned]).values
    kept = torch.sort(order[n_pruned:]).values
    return kept, pruned


def units_to_columns(units: Tensor, unit_size: int) -> Tensor:
    """Column indices covered by the given units (units of consecutive columns)."""
    offsets = torch.arange(unit_size)
    return (units[:, None] * unit_size + offsets[None, :]).reshape(-1)


@dataclass
class Selection:
    score: str
    ratio: float
    unit_size: int
    column_scores: Tensor  # (d_in,)
    unit_scores: Tensor  # (n_units,)
    kept_units: Tensor
    pruned_units: Tensor
    kept: Tensor  # kept columns K, sorted
    pruned: Tensor  # pruned columns P, sorted
    rounding: str = "nearest"  # how ratio * units became a whole number of units


def check_has_tokens(stats: LayerStats) -> None:
    if stats.count == 0:  # e.g. every token was left out of the statistics for inf/NaN inputs
        raise RcpuError(
            "no calibration tokens with finite inputs reach this sublayer (activations overflow to "
            "inf/NaN earlier in the model); load the model in float32 or check its weights"
        )


def select_units_in_groups(scores: Tensor, ratio: float, group: int, what: str = "units",
                           rounding: str = "nearest") -> tuple[Tensor, Tensor]:
    """``select_units`` within each run of ``group`` consecutive units (the query heads of one KV
    head): every group loses the same number, so GQA stays even and stock-loadable."""
    kept, pruned = [], []
    for start in range(0, scores.numel(), group):
        k, p = select_units(scores[start : start + group], ratio, what, rounding)
        kept.append(k + start)
        pruned.append(p + start)
    return torch.cat(kept), torch.cat(pruned)


def select(
    weight: Tensor, stats: LayerStats, score: str, ratio: float, unit_size: int = 1, seed: int = 0,
    what: str = "units", rounding: str = "nearest", group: int | None = None,
) -> Selection:
    """Score columns, sum them per unit, prune the lowest ``ratio`` of units (of each ``group`` of
    consecutive units when given: GQA-balanced head selection)."""
    check_score(score)
    check_has_tokens(stats)
    columns = score_columns(score, weight, stats, seed)
    units = unit_scores(columns, unit_size)
    if group is None:
        kept_units, pruned_units = select_units(units, ratio, what, rounding)
    else:
        kept_units, pruned_units = select_units_in_groups(units, ratio, group, what, rounding)
    return Selection(
        score, ratio, unit_size, columns, units, kept_units, pruned_units,
        units_to_columns(kept_units, unit_size), units_to_columns(pruned_units, unit_size), rounding,
    )
