"""Per-layer pruning ratios from one global budget, chosen on calibration folds.

``uniform`` removes the same share of units from every layer. ``greedy`` removes the same
total number of units of each sublayer kind (so, in a model whose layers all have the same
shapes, exactly the same number of parameters), but spends them where the measured cost is
smallest: for each layer and sublayer the cross-validation error of the compensated sublayer
(fit on all calibration folds but one, measured on that one, as ``auto`` does) is measured at a few
pruning levels on the dense model, divided by the energy of the residual stream entering the
layer (a sublayer's output is added to it, so this is the relative perturbation it causes),
and units are removed one step at a time where the interpolated cost rises least.

That cost is measured one sublayer at a time, so it cannot see what removing most of several
consecutive layers does downstream. How far a sublayer may go above the uniform count (the
*spread*, 1x to 2.5x; 1x is uniform) is therefore chosen by the loss of the pruned model: every
``HOLD_BACK``-th calibration window is held back, the costs and one trial prune per spread (``auto``
by the stand-in of its cost) are fitted on the windows that share no token with those, and the
spread whose trial model has the lowest loss on the held-back windows wins. The final prune uses
every calibration window.

The evaluation text is never used; the statistics come from the calibration windows only.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Callable
from itertools import pairwise

import torch

from .compensate import AUTO_RIDGE_GRID, METHODS, Compensation, Regularisation, ridge_lambda, validation_errors
from .errors import RcpuError
from .flow import LayerFlow, layer_input_stats
from .problem import KeptProblem
from .scores import num_pruned, select, unit_seed

log = logging.getLogger("rcpu")

ALLOCATIONS = ("uniform", "greedy")
# Calibration windows go round eight folds (auto and greedy cross-validate on them): each fit holds 7/8
# of the tokens, close to the refit's all (four folds' 3/4 chose worse: docs/auto.md).
FOLDS = 8
GRID_FACTORS = (0.5, 1.0, 1.5, 2.0, 2.5)  # pruning levels measured, as multiples of the uniform count
SPREADS = tuple(f for f in GRID_FACTORS if f >= 1.0)  # the caps greedy tries; 1.0 places exactly uniform's counts
MAX_SHARE = 0.8  # no sublayer loses more than this share of its units
HOLD_BACK = 4  # greedy holds back every 4th calibration window to choose its spread
STAND_IN_ALPHA = AUTO_RIDGE_GRID[len(AUTO_RIDGE_GRID) // 2]  # ridge in the middle of auto's grid
ALLOCATION_VERSION = 4  # in the keys of cached points: 4 chooses the spread on held-back windows

# (counts per (layer, sublayer), fit windows, held-back windows, what to show) -> mean NLL on the held-back ones
TrialLoss = Callable[[dict, torch.Tensor, torch.Tensor, str], float]


def check_allocation(name: str) -> None:
    if name not in ALLOCATIONS:
        raise RcpuError(f"unknown allocation {name!r}; choose one of: {', '.join(ALLOCATIONS)}")


def curve_candidates(method: str, gram_kk: torch.Tensor, lam: float) -> list[tuple[str, float, str]]:
    """The fit whose validation error is a sublayer's cost: the method itself, or for ``auto`` one
    cheap stand-in for its candidate set (ls_ridge toward W_K, at STAND_IN_ALPHA relative strength)."""
    if method == "auto":
        return [("ls_ridge", ridge_lambda(gram_kk, STAND_IN_ALPHA), "ls_ridge")]
    return [(method, lam, method)]


def trial_fit(cfg) -> Callable[[KeptProblem], Compensation] | None:
    """How a spread's trial prune compensates: ``auto`` (eight fits per candidate) by the stand-in its cost
    uses, any other method by itself (None)."""
    if cfg.method != "auto":
        return None

    def stand_in(problem: KeptProblem) -> Compensation:
        method, lam, _ = curve_candidates("auto", problem.gram_kk, cfg.lam)[0]
        return METHODS[method](problem, Regularisation(cfg.alpha, lam))

    return stand_in


def trial_label(cfg) -> str:
    return f"ls_ridge at relative strength {STAND_IN_ALPHA:g}" if cfg.method == "auto" else cfg.method


def check_windows(allocation: str, calib_samples: int) -> None:
    """Refuse a greedy allocation with too few calibration windows to hold one back."""
    if allocation != "uniform" and calib_samples < HOLD_BACK:
        raise RcpuError(f"the greedy allocation holds back every {HOLD_BACK}th calibration window to choose how "
                        f"far from uniform it may go, so it needs at least {HOLD_BACK} calibration windows "
                        f"(--calib-samples); got {calib_samples}")


def heldback_split(windows: torch.Tensor, starts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit, held back): every HOLD_BACK-th calibration window is held back. With the windows' ``starts`` in
    the text, a window that shares a token with a held-back one is not a fit window either (random windows
    can overlap, and a held-back loss on tokens the trial was fitted to would favour the closest fit)."""
    check_windows("greedy", len(windows))
    held = torch.arange(len(windows)) % HOLD_BACK == HOLD_BACK - 1
    fit = ~held
    if starts is not None:
        fit &= ~((starts[:, None] - starts[None, held]).abs() < windows.shape[1]).any(dim=1)
        if not fit.any():
            raise RcpuError("every calibration window overlaps a held-back one, so the greedy allocation has none "
                            "to fit its trials on: use a longer calibration text or fewer, shorter windows")
    return windows[fit], windows[held]


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
    return sorted({0} | {_level(f, uniform, units, step) for f in GRID_FACTORS})


def _level(factor: float, uniform: int, units: int, step: int) -> int:
    """``factor`` times the uniform count in whole steps, at most MAX_SHARE of the units.

    A uniform count is itself a whole number of steps (``allocate``), so factor 1 gives it back exactly.
    """
    cap = max(step, min(units - step, int(MAX_SHARE * units) // step * step))
    return min(cap, round(factor * uniform / step) * step)


def capped(costs: dict[tuple[int, str], list[tuple[int, float]]], spread: float, uniform: dict, units: dict,
           steps: dict) -> dict[tuple[int, str], list[tuple[int, float]]]:
    """The measured points of each sublayer up to ``spread`` times its uniform count."""
    return {key: [p for p in points if p[0] <= _level(spread, uniform[key], units[key], steps[key])]
            for key, points in costs.items()}


def allocate(lm, tokens, cfg, seed: int, batch_size: int = 8, progress=None, trial: TrialLoss | None = None) -> dict:
    """Units to remove per layer and sublayer for ``cfg.allocation`` (``uniform``: ``cfg.ratio`` each).

    ``trial`` (greedy only): the held-back loss of a trial prune with given counts (``rcpu.prune`` gives it).
    Returns {"counts": {(layer, sub): n}, "uniform": {(layer, sub): n}, "units": {(layer, sub): n}}, and for
    greedy also "costs", "placements" (the counts of each spread tried) and "spread" (the spread chosen, each
    one's held-back loss, the windows used).
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
    if trial is None:
        raise ValueError("the greedy allocation needs a trial loss to choose its spread")
    fit, held = heldback_split(tokens.calibration, tokens.calibration_starts)
    costs = sublayer_costs(adapter, fit, cfg, seed, uniform, units, steps, batch_size, progress)
    totals: dict[str, int] = {}
    for (index, sub), n in uniform.items():
        totals[sub] = totals.get(sub, 0) + n
    placements = {spread: greedy_counts(capped(costs, spread, uniform, units, steps), steps, totals)
                  for spread in SPREADS}
    tried: list[tuple[dict, float]] = []  # (counts, held-back NLL); a spread that places the same counts is not re-run
    losses: dict[str, float] = {}
    for spread, counts in placements.items():
        nll = next((nll for c, nll in tried if c == counts), None)
        if nll is None:
            nll = trial(counts, fit, held, f"spread {spread:g}x")
            tried.append((counts, nll))
        losses[f"{spread:g}"] = nll
    best = min(SPREADS, key=lambda f: losses[f"{f:g}"])  # the first (closest to uniform) on a tie
    log.info("greedy allocation: spread %gx (held-back NLL %s)", best, losses)
    spread = {"chosen": best, "heldback_nll": losses, "fit_windows": len(fit), "heldback_windows": len(held),
              "trial_method": trial_label(cfg)}
    return {"counts": placements[best], "uniform": uniform, "units": units, "costs": costs, "spread": spread,
            "placements": placements}


def sublayer_costs(adapter, windows: torch.Tensor, cfg, seed: int, uniform: dict, units: dict, steps: dict,
                   batch_size: int, progress=None) -> dict[tuple[int, str], list[tuple[int, float]]]:
    """Each sublayer's cost at its measured pruning levels: the cross-validation error of the compensated
    sublayer on the dense model's inputs over ``windows``, relative to the residual stream's energy."""
    flow = LayerFlow(adapter, windows, batch_size)
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
    return costs
