"""One sublayer: score, select, compensate and diagnose, from statistics alone.

``analyze_sublayer`` is what ``rcpu layer``, the app's layer explorer and the
benchmarks call; it takes the weight and statistics and returns plain results.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .compensate import DEFAULT_ALPHA, Compensation, check_method, compensate
from .diagnostics import (
    explained_variance,
    input_covariance,
    output_covariance,
    principal_angles,
    principal_directions,
    relative_error,
    rotation_diagnostics,
    compensated_outputs,
    sample_outputs,
    token_geometry,
)
from .errors import RcpuError
from .scores import check_score, score_columns, select_units, unit_scores, units_to_columns
from .stats import LayerStats

TOP_DIRECTIONS = 8  # r: principal angles between top-r output subspaces


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


def select(
    weight: Tensor, stats: LayerStats, score: str, ratio: float, unit_size: int = 1, seed: int = 0,
    what: str = "units",
) -> Selection:
    """Score columns, sum them per unit, prune the lowest ``ratio`` of units."""
    check_score(score)
    if stats.count == 0:  # e.g. every token was left out of the statistics for inf/NaN inputs
        raise RcpuError(
            "no calibration tokens with finite inputs reach this sublayer (activations overflow to "
            "inf/NaN earlier in the model); load the model in float32 or check its weights"
        )
    columns = score_columns(score, weight, stats, seed)
    units = unit_scores(columns, unit_size)
    kept_units, pruned_units = select_units(units, ratio, what)
    return Selection(
        score, ratio, unit_size, columns, units, kept_units, pruned_units,
        units_to_columns(kept_units, unit_size), units_to_columns(pruned_units, unit_size),
    )


@dataclass
class MethodResult:
    method: str
    compensation: Compensation
    error_calibration: float
    error_heldout: float
    geometry: dict  # norm ratio / cosine (values and summaries), gram distortion
    rotation: dict  # orthogonality error, distance from identity, angles, spectrum of M
    explained_variance: Tensor  # of Yhat, descending
    principal_angles_deg: Tensor  # between top-r subspaces of Y and Yhat
    projection: Tensor  # (2, m) sample tokens of Yhat on Y's top two components
    inner_products: Tensor  # (pairs,) <yhat_t, yhat_u>
    seconds: dict = field(default_factory=dict)


@dataclass
class SublayerAnalysis:
    d_in: int
    d_out: int
    selection: Selection
    variance: Tensor  # var_j of calibration inputs (d_in,)
    mean: Tensor  # mu_j (d_in,)
    explained_variance_y: Tensor
    explained_variance_z: Tensor
    principal_angles_z_deg: Tensor
    projection_y: Tensor  # (2, m)
    projection_z: Tensor  # (2, m)
    inner_products_y: Tensor  # (pairs,) <y_t, y_u>
    error_uncompensated: dict  # calibration / heldout
    methods: dict[str, MethodResult]


def _pairs(m: int, count: int = 2000, seed: int = 0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    first = torch.randint(0, m, (count,), generator=gen)
    second = torch.randint(0, m, (count,), generator=gen)
    keep = first != second
    return first[keep], second[keep]


def analyze_sublayer(
    weight: Tensor,
    calibration: LayerStats,
    heldout: LayerStats,
    *,
    score: str,
    ratio: float,
    methods: list[str],
    unit_size: int = 1,
    alpha: float = DEFAULT_ALPHA,
    seed: int = 0,
    what: str = "units",
) -> SublayerAnalysis:
    """Everything the method page's pictures need for one sublayer and several methods."""
    for m in methods:
        check_method(m)
    weight = weight.detach().to(torch.float64)
    sel = select(weight, calibration, score, ratio, unit_size, seed, what)
    kept = sel.kept
    sample = heldout.sample if heldout.sample.shape[1] > 1 else calibration.sample
    first, second = _pairs(sample.shape[1], seed=seed)

    none = Compensation(weight=weight[:, kept])
    wg = {"calibration": weight @ calibration.gram, "heldout": weight @ heldout.gram}  # W G, reused
    cov = input_covariance(calibration)
    cov_kk = cov[kept][:, kept]
    cov_y = output_covariance(weight, cov)
    cov_z = output_covariance(weight[:, kept], cov_kk)
    evals_y, evecs_y = principal_directions(cov_y)
    evals_z, evecs_z = principal_directions(cov_z)
    top = evecs_y[:, :TOP_DIRECTIONS]
    y, z, _ = sample_outputs(weight, sample, kept, none)
    sample_kept = sample[kept].to(torch.float64)  # X_K on sample tokens, shared by every method
    centre = y.mean(dim=1, keepdim=True)
    pc2 = evecs_y[:, :2]

    results = {}
    for name in methods:
        t0 = time.perf_counter()
        comp = compensate(name, weight, calibration, kept, alpha)
        t1 = time.perf_counter()
        yhat = compensated_outputs(comp, sample_kept)
        cov_yhat = output_covariance(comp.weight, cov_kk)
        evals_yhat, evecs_yhat = principal_directions(cov_yhat)
        results[name] = MethodResult(
            method=name,
            compensation=comp,
            error_calibration=relative_error(
                weight, calibration, kept, comp.weight, comp.bias, wg["calibration"]
            ),
            error_heldout=relative_error(weight, heldout, kept, comp.weight, comp.bias, wg["heldout"]),
            geometry=token_geometry(y, yhat),
            rotation=rotation_diagnostics(comp),
            explained_variance=explained_variance(evals_yhat),
            principal_angles_deg=principal_angles(top, evecs_yhat[:, :TOP_DIRECTIONS]),
            projection=pc2.T @ (yhat - centre),
            inner_products=torch.sum(yhat[:, first] * yhat[:, second], dim=0),
            seconds={"compensate": t1 - t0, "diagnostics": time.perf_counter() - t1},
        )

    return SublayerAnalysis(
        d_in=weight.shape[1],
        d_out=weight.shape[0],
        selection=sel,
        variance=calibration.var,
        mean=calibration.mean,
        explained_variance_y=explained_variance(evals_y),
        explained_variance_z=explained_variance(evals_z),
        principal_angles_z_deg=principal_angles(top, evecs_z[:, :TOP_DIRECTIONS]),
        projection_y=pc2.T @ (y - centre),
        projection_z=pc2.T @ (z - centre),
        inner_products_y=torch.sum(y[:, first] * y[:, second], dim=0),
        error_uncompensated={
            "calibration": relative_error(weight, calibration, kept, none.weight, wg=wg["calibration"]),
            "heldout": relative_error(weight, heldout, kept, none.weight, wg=wg["heldout"]),
        },
        methods=results,
    )


def _list(t: Tensor | None, limit: int | None = None) -> list | None:
    if t is None:
        return None
    values = t.detach().cpu().to(torch.float64)
    if limit is not None:
        values = values[:limit]
    return [round(float(v), 8) for v in values]


def summary(analysis: SublayerAnalysis, method: str) -> dict:
    """The JSON-ready result of one method on one sublayer (``rcpu layer --json``)."""
    res = analysis.methods[method]
    sel = analysis.selection
    geo = res.geometry
    rot = res.rotation
    return {
        "ratio": sel.ratio,
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
