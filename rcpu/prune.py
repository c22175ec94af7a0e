"""Whole-model sequential pruning (method page, section 4).

Layer by layer: statistics of layer ``l`` come from hidden states that already
went through the pruned layers ``0..l-1``; layer ``l`` is pruned and compensated,
then its outputs are recomputed with the pruned weights and flow on to ``l+1``.
The source model is never modified: the work happens on a copy.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .adapters import adapter_for
from .allocate import FOLDS, TrialLoss, allocate, trial_fit
from .calibration import TokenSet, prepare_tokens
from .compensate import Compensation, compensate_problem, split_errors
from .config import DataConfig, PruneConfig
from .evaluate import perplexity
from .flow import LayerFlow, Progress, layer_input_stats
from .models import LoadedModel, count_parameters
from .problem import KeptProblem
from .scores import select, unit_seed
from .surgery import SublayerPlan, apply_plan


@dataclass
class PruneResult:
    model: torch.nn.Module
    config: PruneConfig
    data: DataConfig
    plans: list[dict[str, SublayerPlan]]  # per layer, per sublayer
    layers: list[dict]  # per-layer records (errors, kept counts)
    params_before: int
    params_after: int
    timing_s: dict = field(default_factory=dict)
    allocation: dict = field(default_factory=dict)  # units removed per sublayer kind and layer, and uniform's


LayerCallback = Callable[[dict], None]
SHAPE_COUNTS = {  # per layer: [before, after] in the records
    "heads": lambda a, i: a.num_heads(i),
    "kv_heads": lambda a, i: a.num_kv_heads(i),
    "channels": lambda a, i: a.num_channels(i),
}


def _identity(weight: torch.Tensor, kept: torch.Tensor) -> Compensation:
    return Compensation(weight=weight.detach().to(torch.float64)[:, kept])


def prune_model(
    lm: LoadedModel,
    data: DataConfig,
    cfg: PruneConfig,
    *,
    tokens: TokenSet | None = None,
    progress: Progress | None = None,
    on_layer: LayerCallback | None = None,
    batch_size: int = 8,
    folds: int = FOLDS,
    counts: dict[tuple[int, str], int] | None = None,
    fit: Callable[[KeptProblem], Compensation] | None = None,
) -> PruneResult:
    """Prune every decoder layer of a copy of ``lm.model`` sequentially.

    ``progress(done, total, what)`` is called per layer; ``on_layer(record)`` gets each
    layer's errors as soon as it is pruned (the app draws them as the run goes). ``folds``: how
    many calibration folds ``auto`` cross-validates on. ``counts``: units to remove per (layer,
    sublayer), given instead of allocated, and ``fit``: the compensation instead of ``cfg.method`` (both
    for the greedy allocation's trial prunes).
    """
    cfg.check(lm)  # before any work: a ratio that leaves some layer nothing fails here
    start = time.perf_counter()
    tokens = tokens or prepare_tokens(lm, data.data, data.sampling)
    t_alloc = time.perf_counter()
    allocation: dict = {}
    if counts is None:  # the allocation runs trial prunes of its own: before this prune's copy of the model
        allocated = allocate(lm, tokens, cfg, data.seed, batch_size, progress,
                             trial=_trial_loss(lm, data, cfg, batch_size, progress))
        allocation = _allocation_summary(cfg, allocated, lm.adapter.num_layers)
        counts = None if cfg.allocation == "uniform" else allocated["counts"]
    seconds_allocating = time.perf_counter() - t_alloc
    model = copy.deepcopy(lm.model)
    adapter = adapter_for(model)
    folds = folds if cfg.method == "auto" else 0  # a Gram per calibration fold, summing to the full one
    flows = {"calibration": LayerFlow(adapter, tokens.calibration, batch_size)}
    if len(tokens.heldout):
        flows["heldout"] = LayerFlow(adapter, tokens.heldout, batch_size)
    timing = {"allocation": seconds_allocating, "statistics": 0.0, "compensation": 0.0, "recompute": 0.0}
    plans: list[dict[str, SublayerPlan]] = []
    records: list[dict] = []
    n_layers = adapter.num_layers
    for index in range(n_layers):
        if progress:
            progress(index, n_layers, f"layer {index}")
        layer_counts = None if counts is None else {sub: counts[index, sub] for sub in cfg.sublayers}
        layer_plans, record = prune_layer(adapter, index, flows, cfg, data.seed, timing, folds=folds,
                                          counts=layer_counts, fit=fit)
        plans.append(layer_plans)
        records.append(record)
        if on_layer:
            on_layer(record)
    if progress:
        progress(n_layers, n_layers, "done")
    timing["total"] = time.perf_counter() - start
    return PruneResult(
        model=model,
        config=cfg,
        data=data,
        plans=plans,
        layers=records,
        params_before=count_parameters(lm.model),
        params_after=count_parameters(model),
        timing_s=timing,
        allocation=allocation,
    )


def prune_layer(adapter, index: int, flows: dict[str, LayerFlow], cfg: PruneConfig, seed: int,
                timing: dict[str, float], folds: int = 0,
                counts: dict[str, int] | None = None,
                fit: Callable[[KeptProblem], Compensation] | None = None) -> tuple[dict[str, SublayerPlan], dict]:
    """Prune layer ``index`` of ``adapter``'s model in place and move every flow past it.

    The dense run records only the statistics the targets read (and stops after the last of
    them) and keeps the attention output; the pruned run reuses it (``rcpu.flow``). ``folds``:
    a Gram per calibration fold (``auto``); ``counts``: units to remove per sublayer (an
    allocation) instead of ``cfg.ratio``; ``fit``: the compensation instead of ``cfg.method``.
    Adds the seconds of each part to ``timing``; returns
    the layer's plans and its record."""
    sublayers = cfg.sublayers
    t0 = time.perf_counter()
    stats = {split: layer_input_stats(flow, index, 0, seed, sublayers=tuple(sublayers), keep_attention=True,
                                      folds=folds if split == "calibration" else 0)
             for split, flow in flows.items()}
    t1 = time.perf_counter()
    before = {what: count(adapter, index) for what, count in SHAPE_COUNTS.items()}
    layer_plans: dict[str, SublayerPlan] = {}
    record: dict = {"layer": index}
    for sub in sublayers:
        linear = adapter.sublayer(index, sub)
        calib = stats["calibration"][sub]
        n_units = adapter.num_units(index, sub)
        ratio, rounding = (cfg.ratio, cfg.rounding) if counts is None else (
            counts[sub] / n_units, "nearest")  # exactly the allocated count
        sel = select(
            linear.weight, calib, cfg.score, ratio, adapter.unit_size(sub), unit_seed(seed, index, sub),
            adapter.unit_name(sub), rounding,
            group=cfg.head_group(adapter, index) if sub == "o_proj" else None,
        )
        # One problem per split: compensation and the errors share W G and G[K,K]; the splits share W in float64.
        weight = linear.weight.detach().to(torch.float64)
        problems = {split: KeptProblem(weight, st[sub], sel.kept) for split, st in stats.items()}
        if len(sel.pruned) == 0 or not cfg.compensates(sub):
            comp = _identity(linear.weight, sel.kept)  # nothing removed, or left uncompensated (ablation)
        else:
            comp = fit(problems["calibration"]) if fit else compensate_problem(cfg.method, problems["calibration"],
                                                                                cfg.alpha, cfg.lam)
        plan = SublayerPlan(sub, sel.kept_units, sel.kept, comp)
        layer_plans[sub] = plan
        record[sub] = _errors(problems, comp)
        record[sub]["kept_units"] = len(sel.kept_units)
        record[sub]["pruned_units"] = len(sel.pruned_units)
        record[sub]["calibration_tokens_per_input_dim"] = calib.count / calib.d_in
        record[sub]["ratio"] = len(sel.pruned_units) / n_units
        if comp.choice is not None:
            record[sub]["auto"] = comp.choice
        del problems, weight  # the next sublayer's products and the recompute need none of this sublayer's
        for st in stats.values():
            del st[sub]
    t2 = time.perf_counter()
    for plan in layer_plans.values():
        apply_plan(adapter, index, plan)
    record["shape"] = {  # what the layer holds now against the source model
        what: [before[what], count(adapter, index)] for what, count in SHAPE_COUNTS.items()
    }
    kept_columns = layer_plans["o_proj"].kept if "o_proj" in layer_plans else None
    for flow in flows.values():
        flow.run_layer_reusing_attention(index, kept_columns)
    t3 = time.perf_counter()
    timing["statistics"] += t1 - t0
    timing["compensation"] += t2 - t1
    timing["recompute"] += t3 - t2
    return layer_plans, record


def _trial_loss(lm: LoadedModel, data: DataConfig, cfg: PruneConfig, batch_size: int,
                progress: Progress | None) -> TrialLoss:
    """The greedy allocation's trial: prune with the given counts on the fit windows (``auto`` by its
    stand-in), and return the pruned model's mean NLL on the held-back calibration windows."""
    stand_in = trial_fit(cfg)

    def loss(counts: dict, fit_windows: torch.Tensor, held: torch.Tensor, label: str) -> float:
        def trial_progress(done: int, total: int, what: str) -> None:
            if progress:
                progress(done, total, f"allocation, trial of {label}: {what}")

        fit_only = TokenSet(calibration=fit_windows, heldout=fit_windows[:0], heldout_ids=fit_windows.new_zeros(0))
        result = prune_model(lm, data, cfg, tokens=fit_only, progress=trial_progress, batch_size=batch_size,
                             folds=0, counts=counts, fit=stand_in)  # no folds: the stand-in needs none
        return perplexity(result.model, held)["nll"]

    return loss


def _allocation_summary(cfg: PruneConfig, plan: dict, n_layers: int) -> dict:
    """Units removed per sublayer kind, per layer and in total, against the uniform ratio's, and for
    greedy the spread it chose on held-back calibration windows."""
    out: dict = {"rule": cfg.allocation}
    if "spread" in plan:
        out["spread"] = plan["spread"]
    for sub in cfg.sublayers:
        counts = [plan["counts"][i, sub] for i in range(n_layers)]
        uniform = [plan["uniform"][i, sub] for i in range(n_layers)]
        out[sub] = {"removed": counts, "units": [plan["units"][i, sub] for i in range(n_layers)],
                    "total_removed": sum(counts), "uniform_total_removed": sum(uniform)}
    return out


def _errors(problems: dict[str, KeptProblem], comp: Compensation) -> dict:
    """Relative output errors, compensated and not, on each split's statistics."""
    errors = split_errors(comp, problems)
    out = {}
    for split, problem in problems.items():
        out[f"error_uncompensated_{split}"] = problem.relative_error(problem.w_kept)
        out[f"error_{split}"] = errors[split]
    return out
