"""One sublayer: score, select, compensate and diagnose, from statistics alone.

``analyze_sublayer`` is what ``rcpu layer``, the app's layer explorer and the
benchmarks call; it takes the weight and statistics and returns plain results.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from .compensate import DEFAULT_ALPHA, Compensation, check_alpha, check_method, compensate_problem
from .diagnostics import (
    compensated_outputs,
    explained_variance,
    principal_angles,
    principal_directions,
    rotation_diagnostics,
    token_geometry,
)
from .errors import RcpuError
from .problem import KeptProblem, covariance_from_gram
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


def check_has_tokens(stats: LayerStats) -> None:
    if stats.count == 0:  # e.g. every token was left out of the statistics for inf/NaN inputs
        raise RcpuError(
            "no calibration tokens with finite inputs reach this sublayer (activations overflow to "
            "inf/NaN earlier in the model); load the model in float32 or check its weights"
        )


def select(
    weight: Tensor, stats: LayerStats, score: str, ratio: float, unit_size: int = 1, seed: int = 0,
    what: str = "units",
) -> Selection:
    """Score columns, sum them per unit, prune the lowest ``ratio`` of units."""
    check_score(score)
    check_has_tokens(stats)
    columns = score_columns(score, weight, stats, seed)
    units = unit_scores(columns, unit_size)
    kept_units, pruned_units = select_units(units, ratio, what)
    return Selection(
        score, ratio, unit_size, columns, units, kept_units, pruned_units,
        units_to_columns(kept_units, unit_size), units_to_columns(pruned_units, unit_size),
    )


def _pairs(m: int, count: int = 2000, seed: int = 0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    first = torch.randint(0, m, (count,), generator=gen)
    second = torch.randint(0, m, (count,), generator=gen)
    keep = first != second
    return first[keep], second[keep]


@dataclass
class SublayerBasis:
    """What the analysis of one sublayer needs that does not depend on the selection.

    ``prepare_sublayer`` builds it; ``analyze_sublayer`` reuses one across ratios,
    scores and methods on the same weight and statistics.
    """

    weight: Tensor  # W, float64
    wg: dict[str, Tensor]  # split -> W G
    evals_y: Tensor  # eigenvalues of Y's covariance, descending
    top: Tensor  # (d_out, r) Y's top-r principal directions
    sample: Tensor  # (d_in, m) float64 tokens for the pictures
    y: Tensor  # (d_out, m) W x on the sample
    token_gram_y: Tensor  # (m, m) Y^T Y
    centre: Tensor  # (d_out, 1) mean of y over the sample
    pairs: tuple[Tensor, Tensor]  # token pairs for the inner products

    def project(self, outputs: Tensor) -> Tensor:
        """Sample outputs (d_out, m) on Y's top two principal components, centred on Y's sample mean."""
        return self.top[:, :2].T @ (outputs - self.centre)

    def inner_products(self, outputs: Tensor) -> Tensor:
        first, second = self.pairs
        return torch.sum(outputs[:, first] * outputs[:, second], dim=0)


def prepare_sublayer(weight: Tensor, calibration: LayerStats, heldout: LayerStats, seed: int = 0) -> SublayerBasis:
    """The selection-independent part of ``analyze_sublayer`` (W G, Y's principal directions, sample)."""
    check_has_tokens(calibration)
    w = weight.detach().to(torch.float64)
    wg = {"calibration": w @ calibration.gram, "heldout": w @ heldout.gram}
    everything = torch.arange(w.shape[1])
    cov_y = KeptProblem(w, calibration, everything, wg["calibration"]).covariance(w, wg["calibration"])
    evals_y, evecs_y = principal_directions(cov_y)
    sample = (heldout.sample if heldout.sample.shape[1] > 1 else calibration.sample).to(torch.float64)
    y = w @ sample
    return SublayerBasis(
        weight=w, wg=wg, evals_y=evals_y, top=evecs_y[:, :TOP_DIRECTIONS], sample=sample, y=y,
        token_gram_y=y.T @ y, centre=y.mean(dim=1, keepdim=True), pairs=_pairs(sample.shape[1], seed=seed),
    )


class MethodResult:
    """One compensation method on one selection, and its diagnostics.

    The errors are computed at once (from the Gram matrices); the spectrum, principal
    angles, token-level geometry and rotation diagnostics on first use, so a page that
    shows one view pays only for that view. ``like``: a result with the same ``W'_K``
    (the uncompensated one, for ``none`` and ``bias``), whose spectrum this one shares.
    ``weight_grams``: ``W'_K G[K,K]`` per split, which the errors and the covariance share.
    """

    def __init__(
        self, method: str, compensation: Compensation, basis: SublayerBasis, problems: dict[str, KeptProblem],
        weight_grams: dict[str, Tensor], like: "MethodResult | None" = None, seconds: dict | None = None,
    ):
        start = time.perf_counter()
        self.method = method
        self.compensation = compensation
        self._basis = basis
        self._like = like
        calib = problems["calibration"]
        self._kept, self._mean_kept, self._count = calib.kept, calib.mean_kept, calib.count
        self._weight_gram = None if like is not None else weight_grams["calibration"]  # until the spectrum
        errors = {
            split: p.relative_error(compensation.weight, compensation.bias, weight_grams[split])
            for split, p in problems.items()
        }
        self.error_calibration: float = errors["calibration"]
        self.error_heldout: float = errors["heldout"]
        self.seconds = {**(seconds or {}), "errors": time.perf_counter() - start}

    @cached_property
    def _spectrum(self) -> tuple[Tensor, Tensor]:
        if self._like is not None:
            return self._like._spectrum
        cov = covariance_from_gram(self.compensation.weight, self._weight_gram, self._mean_kept, self._count)
        self._weight_gram = None
        evals, evecs = principal_directions(cov)
        return explained_variance(evals), principal_angles(self._basis.top, evecs[:, :TOP_DIRECTIONS])

    @property
    def explained_variance(self) -> Tensor:
        """Explained-variance ratios of ``Yhat``'s covariance, descending."""
        return self._spectrum[0]

    @property
    def principal_angles_deg(self) -> Tensor:
        """Principal angles between the top-r output subspaces of ``Y`` and ``Yhat``."""
        return self._spectrum[1]

    @property
    def outputs(self) -> Tensor:
        """``Yhat`` (d_out, m) on the sample tokens (computed on each use, not kept)."""
        bias = self.compensation.bias
        if self._like is not None:
            base = self._like.outputs
            return base if bias is None else base + bias[:, None]
        return compensated_outputs(self.compensation, self._basis.sample[self._kept])

    @cached_property
    def _sample_diagnostics(self) -> tuple[Tensor, Tensor, dict]:
        if self._like is not None and self.compensation.bias is None:
            return self._like._sample_diagnostics
        outputs = self.outputs
        return (self._basis.project(outputs), self._basis.inner_products(outputs),
                token_geometry(self._basis.y, outputs, self._basis.token_gram_y))

    @property
    def projection(self) -> Tensor:
        """(2, m) sample tokens of ``Yhat`` on ``Y``'s top two principal components."""
        return self._sample_diagnostics[0]

    @property
    def inner_products(self) -> Tensor:
        """(pairs,) ``<yhat_t, yhat_u>`` for the basis's token pairs."""
        return self._sample_diagnostics[1]

    @property
    def geometry(self) -> dict:
        """Norm ratio and cosine per sample token (values and summaries), Gram distortion."""
        return self._sample_diagnostics[2]

    @cached_property
    def rotation(self) -> dict:
        """Orthogonality error, distance from identity, rotation angles, spectrum of ``M``."""
        return rotation_diagnostics(self.compensation)

    def complete(self) -> "MethodResult":
        """Compute every diagnostic now; ``seconds["diagnostics"]`` says how long that took."""
        start = time.perf_counter()
        for name in ("_spectrum", "_sample_diagnostics", "rotation"):
            getattr(self, name)
        self.seconds.setdefault("diagnostics", time.perf_counter() - start)
        return self


@dataclass
class SublayerAnalysis:
    d_in: int
    d_out: int
    selection: Selection
    variance: Tensor  # var_j of calibration inputs (d_in,)
    mean: Tensor  # mu_j (d_in,)
    basis: SublayerBasis
    uncompensated: MethodResult  # Z = W_K X_K
    methods: dict[str, MethodResult]

    @property
    def explained_variance_y(self) -> Tensor:
        return explained_variance(self.basis.evals_y)

    @property
    def projection_y(self) -> Tensor:  # (2, m)
        return self.basis.project(self.basis.y)

    @property
    def inner_products_y(self) -> Tensor:  # (pairs,) <y_t, y_u>
        return self.basis.inner_products(self.basis.y)

    @property
    def explained_variance_z(self) -> Tensor:
        return self.uncompensated.explained_variance

    @property
    def principal_angles_z_deg(self) -> Tensor:
        return self.uncompensated.principal_angles_deg

    @property
    def projection_z(self) -> Tensor:  # (2, m)
        return self.uncompensated.projection

    @property
    def error_uncompensated(self) -> dict:  # calibration / heldout
        return {"calibration": self.uncompensated.error_calibration, "heldout": self.uncompensated.error_heldout}

    def complete(self) -> "SublayerAnalysis":
        """Compute every diagnostic of every method now (reports and benchmarks want them all)."""
        for result in (self.uncompensated, *self.methods.values()):
            result.complete()
        return self


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
    basis: SublayerBasis | None = None,
) -> SublayerAnalysis:
    """Everything the method page's pictures need for one sublayer and several methods.

    ``basis`` (from ``prepare_sublayer`` on the same weight, statistics and seed) skips
    the selection-independent work when the same sublayer is analysed again.
    """
    for m in methods:
        check_method(m)
    check_alpha(alpha)
    if basis is None:
        basis = prepare_sublayer(weight, calibration, heldout, seed)
    sel = select(basis.weight, calibration, score, ratio, unit_size, seed, what)
    problems = {
        split: KeptProblem(basis.weight, stats, sel.kept, basis.wg[split])
        for split, stats in (("calibration", calibration), ("heldout", heldout))
    }
    w_kept = problems["calibration"].w_kept
    grams_kept = {split: p.weight_gram(w_kept) for split, p in problems.items()}  # W_K G[K,K]
    uncompensated = MethodResult("none", Compensation(weight=w_kept), basis, problems, grams_kept)
    results = {}
    for name in methods:
        start = time.perf_counter()
        comp = compensate_problem(name, problems["calibration"], alpha)
        seconds = {"compensate": time.perf_counter() - start}
        if torch.equal(comp.weight, w_kept):  # none, bias: Z's covariance and products
            results[name] = MethodResult(name, comp, basis, problems, grams_kept, like=uncompensated,
                                         seconds=seconds)
        else:
            grams = {split: p.weight_gram(comp.weight) for split, p in problems.items()}
            results[name] = MethodResult(name, comp, basis, problems, grams, seconds=seconds)
    return SublayerAnalysis(
        d_in=basis.weight.shape[1],
        d_out=basis.weight.shape[0],
        selection=sel,
        variance=calibration.var,
        mean=calibration.mean,
        basis=basis,
        uncompensated=uncompensated,
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
    res = analysis.methods[method].complete()
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
