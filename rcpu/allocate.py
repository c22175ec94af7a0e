"""Per-layer pruning ratios from one global budget, chosen on calibration folds.

``uniform`` removes the same share of units from every layer. ``greedy`` removes the same
total number of units of each sublayer kind (so, in a model whose layers all have the same
shapes, exactly the same number of parameters), but spends them where the measured cost is
smallest: for each layer and sublayer the cross-validation error of the compensated sublayer
(fit on all calibration folds but one, measured on that one, as ``auto`` does) is measured at a few
pruning levels on the dense model, divided by the energy of the residual stream entering the
layer (a sublayer's output is added to it, so this is the relative perturbation it causes),
and units are removed one step at a time where the interpolated cost rises least.

The evaluation text is never used; the statistics come from one extra pass of the dense
model over the calibration windows.
"""

from __future__ import annotations

import heapq
import logging
from itertools import pairwise

import torch

from .compensate import AUTO_RIDGE_GRID, Regularisation, ridge_lambda, validation_errors
from .flow import LayerFlow, layer_input_stats
from .problem import KeptProblem
from .scores import num_pruned, select, unit_seed

log = logging.getLogger("rcpu")

ALLOCATIONS = ("uniform", "greedy")
# Calibration windows go round eight folds (auto and greedy cross-validate on them): each fit holds 7/8
# of the tokens, close to the refit's all (four folds' 3/4 chose worse: docs/auto.md).
FOLDS = 8
GRID_FACTORS = (0.5, 1.0, 1.5, 2.0, 2.5)  # pruning levels measured, as multiples of the uniform count
MAX_SHARE = 0.8  # no sublayer loses more than this share of its units


def check_allocation(name: str) -> None:
    from .errors import RcpuError

    if name not in ALLOCATIONS:
        raise RcpuError(f"unknown allocation {name!r}; choose one of: {', '.join(ALLOCATIONS)}")


def curve_candidates(method: str, gram_kk: torch.Tensor, lam: float) -> list[tuple[str, float, str]]:
    """The fit whose validation error is a sublayer's cost: the method itself, or for ``auto`` one
    cheap stand-in for its candidate set (ls_ridge in the middle of its grid)."""
    if method == "auto":
        a = AUTO_RIDGE_GRID[len(AUTO_RIDGE_GRID) // 2]
        return [("ls_ridge", ridge_lambda(gram_kk, a), "ls_ridge")]
    return [(method, lam, method)]


def greedy_counts(costs: dict[tuple[int, str], list[tuple[int, float]]], steps: dict[tuple[int, str], int],
                  totals: dict[str, int]) -> dict[tuple[int, str], int]:
    """Units removed per (layer, sublayer): for each sublayer kind exactly ``totals[kind]`` units,
    removed ``steps`` at a time where the cost, linear between the measured (count, cost) points,
    rises least. A sublayer never goes past its last measured count."""
    counts = {key: 0 for key in costs}
    for kind, total in totals.items():
        keys = sorted(k for k in costs if k[1] == kind)
        heap: list[tuple[float, int, tuple[int, str]]] = []

        def push(key, heap=heap):
            step = steps[key]
            nxt = counts[key] + step
            points = costs[key]
            if nxt > points[-1][0]:
                return
            heapq.heappush(heap, ((_interp(points, nxt) - _interp(points, counts[key])) / step, key[0], key))

        for key in keys:
            push(key)
        removed = 0
        while removed < total and heap:
            _, _, key = heapq.heappop(heap)
            step = min(steps[key], total - removed)
            counts[key] += step
            removed += step
            push(key)
        if removed != total:
            raise RuntimeError(f"greedy allocation placed {removed} of {total} {kind} units")
    return counts


def _interp(points: list[tuple[int, float]], n: int) -> float:
    for (n0, c0), (n1, c1) in pairwise(points):
        if n0 <= n <= n1:
            return c0 + (c1 - c0) * (n - n0) / (n1 - n0) if n1 > n0 else c0
    return points[-1][1]


def grid_counts(uniform: int, units: int, step: int) -> list[int]:
    """0 and the measured pruning levels around the uniform count, in whole steps, at most MAX_SHARE."""
    cap = max(step, min(units - step, int(MAX_SHARE * units) // step * step))
    levels = {0, min(uniform, cap)}
    for f in GRID_FACTORS:
        levels.add(min(cap, round(f * uniform / step) * step))
    return sorted(levels)


def allocate(lm, tokens, cfg, seed: int, batch_size: int = 8, progress=None) -> dict:
    """Units to remove per layer and sublayer for ``cfg.allocation`` (``uniform``: ``cfg.ratio`` each).

    Returns {"counts": {(layer, sub): n}, "uniform": {(layer, sub): n}, "units": {(layer, sub): n}}.
    """
    adapter = lm.adapter
    uniform, units, steps = {}, {}, {}
    for index in range(adapter.num_layers):
        for sub in cfg.sublayers:
            n_units = adapter.num_units(index, sub)
            group = cfg.head_group(adapter, index) if sub == "o_proj" else None
            per_group = num_pruned(group, cfg.ratio, cfg.rounding) if group else None
            units[index, sub] = n_units
            uniform[index, sub] = per_group * (n_units // group) if group else num_pruned(n_units, cfg.ratio,
                                                                                          cfg.rounding)
            steps[index, sub] = n_units // group if group else 1  # one head from every KV group at a time
    if cfg.allocation == "uniform":
        return {"counts": dict(uniform), "uniform": uniform, "units": units}
    flow = LayerFlow(adapter, tokens.calibration, batch_size)
    costs: dict[tuple[int, str], list[tuple[int, float]]] = {}
    for index in range(adapter.num_layers):
        if progress:
            progress(index, adapter.num_layers, f"allocation: layer {index}")
        residual = sum(float(hidden.to(torch.float64).pow(2).sum()) for hidden, _ in flow.batches)
        stats = layer_input_stats(flow, index, 0, seed, update=True, folds=FOLDS)
        for sub in cfg.sublayers:
            key = (index, sub)
            linear = adapter.sublayer(index, sub)
            weight = linear.weight.detach().to(torch.float64)
            fold_wg = [weight @ fold.gram for fold in stats[sub].folds]  # shared by every pruning level
            points = []
            for count in grid_counts(uniform[key], units[key], steps[key]):
                if count == 0:
                    points.append((0, 0.0))
                    continue
                group = cfg.head_group(adapter, index) if sub == "o_proj" else None
                sel = select(linear.weight, stats[sub], cfg.score, count / units[key], adapter.unit_size(sub),
                             unit_seed(seed, index, sub), adapter.unit_name(sub), "nearest", group=group)
                problem = KeptProblem(weight, stats[sub], sel.kept, sum(fold_wg))
                errors = validation_errors(problem, Regularisation(cfg.alpha, cfg.lam),
                                           lambda g: curve_candidates(cfg.method, g, cfg.lam), fold_wg)
                points.append((count, min(errors.values()) ** 2 * problem.reference / max(residual, 1e-300)))
            costs[key] = points
    totals: dict[str, int] = {}
    for (index, sub), n in uniform.items():
        totals[sub] = totals.get(sub, 0) + n
    return {"counts": greedy_counts(costs, steps, totals), "uniform": uniform, "units": units, "costs": costs}
