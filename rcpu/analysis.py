"""One sublayer: score, select, compensate and diagnose, from statistics alone.

``analyze_sublayer`` is what the layer explorer (``rcpu.explorer``) and the
benchmarks call; it takes the weight and statistics and returns plain results.
What does not depend on the selection (``prepare_sublayer``) can be kept and
passed back in, and each method's diagnostics beyond its errors are computed on
first use, so that the explorer redraws a view in well under a second.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from .compensate import (
    DEFAULT_ALPHA,
    DEFAULT_LAMBDA,
    Compensation,
    check_alpha,
    check_lambda,
    check_method,
    compensate_problem,
    split_errors,
    weight_gram,
)
from .diagnostics import (
    compensated_outputs,
    explained_variance,
    principal_angles,
    principal_directions,
    rotation_diagnostics,
    token_geometry,
)
from .problem import KeptProblem, covariance_from_gram, few_pruned, output_covariance
from .scores import Selection, check_has_tokens, select
from .stats import LayerStats

TOP_DIRECTIONS = 8  # r: principal angles between top-r output subspaces
# Sample tokens behind the pictures (projection, per-token geometry, inner products of pairs): a
# seeded subset of the up to 1024 the statistics keep (the token Gram of the geometry costs m^2).
# Errors never use the sample (they come from the Gram matrices of every token).
PICTURE_TOKENS = 512
SPECTRUM_COMPONENTS = 64  # explained-variance spectra keep the largest this many components


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
    output_gram: Tensor  # (d_out, d_out) W G W^T on the calibration tokens
    evals_y: Tensor  # largest eigenvalues of Y's covariance, descending
    variance_y: float  # trace of Y's covariance: the total the spectrum is a share of
    top: Tensor  # (d_out, r) Y's top-r principal directions
    sample: Tensor  # (d_in, m) float64 tokens for the pictures
    y: Tensor  # (d_out, m) W x on the sample
    token_gram_y: Tensor  # (m, m) Y^T Y
    centre: Tensor  # (d_out, 1) mean of y over the sample
    pairs: tuple[Tensor, Tensor]  # token pairs for the inner products

    def project(self, outputs: Tensor) -> Tensor:
        """Sample outputs (d_out, m) on Y's top two principal components, centred on Y's sample mean."""
        return self.top[:, :2].T @ (outputs - self.centre)

    def kept_outputs(self, kept: Tensor) -> Tensor:
        """``Z = W_K X_K`` (d_out, m) on the sample: ``Y`` less the pruned columns' part when they are few."""
        pruned = few_pruned(kept, self.weight.shape[1])
        if pruned is None:
            return self.weight[:, kept] @ self.sample[kept]
        return self.y - self.weight[:, pruned] @ self.sample[pruned]

    def inner_products(self, token_gram: Tensor) -> Tensor:
        """``<o_t, o_u>`` for the token pairs, read from the outputs' token Gram ``O^T O`` (m, m)."""
        first, second = self.pairs
        return token_gram[first, second]


def prepare_sublayer(weight: Tensor, calibration: LayerStats, heldout: LayerStats, seed: int = 0) -> SublayerBasis:
    """The selection-independent part of ``analyze_sublayer`` (W G, Y's principal directions, sample)."""
    check_has_tokens(calibration)
    w = weight.detach().to(torch.float64)
    wg = {"calibration": w @ calibration.gram, "heldout": w @ heldout.gram}
    output_gram = wg["calibration"] @ w.T  # Y Y^T = W G W^T
    cov_y = output_covariance(output_gram, w @ calibration.mean, calibration.count)
    evals_y, evecs_y = principal_directions(cov_y, SPECTRUM_COMPONENTS)
    sample = heldout.sample if heldout.sample.shape[1] > 1 else calibration.sample
    if sample.shape[1] > PICTURE_TOKENS:  # the reservoir's slots are not in random order: draw a subset
        pick = torch.randperm(sample.shape[1], generator=torch.Generator().manual_seed(seed))[:PICTURE_TOKENS]
        sample = sample[:, torch.sort(pick).values]
    sample = sample.to(torch.float64)
    y = w @ sample
    return SublayerBasis(
        weight=w, wg=wg, output_gram=output_gram, evals_y=evals_y, variance_y=float(torch.trace(cov_y)),
        top=evecs_y[:, :TOP_DIRECTIONS],
        sample=sample, y=y, token_gram_y=y.T @ y, centre=y.mean(dim=1, keepdim=True),
        pairs=_pairs(sample.shape[1], seed=seed),
    )


@dataclass(frozen=True)
class FromKept:
    """``W'_K = scale * R * W_K``: a compensation that rotates and scales the pruned outputs ``Z``.

    ``rotation`` ``R`` is ``Q`` (the rotation methods), or ``None`` for the identity (``none``,
    ``bias``). Then ``cov(Yhat) = scale^2 R cov(Z) R^T`` and ``W'_K G[K,K] = scale R (W_K G[K,K])``:
    the spectrum, principal directions and products follow from ``Z``'s without new ones.
    """

    base: MethodResult  # the uncompensated result, Z = W_K X_K
    rotation: Tensor | None
    scale: float

    def rotate(self, matrix: Tensor) -> Tensor:
        """``R @ matrix``."""
        return matrix if self.rotation is None else self.rotation @ matrix

    def apply(self, matrix: Tensor) -> Tensor:
        """``scale * R @ matrix`` for a (d_out, n) matrix of ``Z``'s."""
        rotated = self.rotate(matrix)
        return rotated if self.scale == 1.0 else self.scale * rotated


class MethodResult:
    """One compensation method on one selection, and its diagnostics.

    The errors are computed at once (from the Gram matrices); the spectrum, principal
    angles, token-level geometry and rotation diagnostics on first use, so a page that
    shows one view pays only for that view. ``weight_grams``: ``W'_K G[K,K]`` per split,
    shared by the errors and the covariance (None with ``from_kept`` and for ``Z`` itself).
    ``from_kept``: how ``W'_K`` follows from ``W_K``, when it does, so that the spectrum follows
    from ``Z``'s.
    """

    def __init__(
        self, method: str, compensation: Compensation, basis: SublayerBasis, problems: dict[str, KeptProblem],
        weight_grams: dict[str, Tensor] | None, from_kept: FromKept | None = None, seconds: dict | None = None,
    ):
        start = time.perf_counter()
        self.method = method
        self.compensation = compensation
        self._basis = basis
        self._from_kept = from_kept
        calib = problems["calibration"]
        self._calibration = calib  # K, mu_K, n, and Z's output Gram for the uncompensated result's covariance
        self._is_kept = compensation.weight is calib.w_kept  # W'_K = W_K: the uncompensated result
        # Kept for the spectrum (not dropped after it: results are shared between app sessions'
        # threads, and one must not see it gone while another computes the spectrum).
        self._weight_gram = None if weight_grams is None else weight_grams["calibration"]
        errors = split_errors(compensation, problems, weight_grams)
        self.error_calibration: float = errors["calibration"]
        self.error_heldout: float = errors["heldout"]
        self.seconds = {**(seconds or {}), "errors": time.perf_counter() - start}

    @cached_property
    def _eigen(self) -> tuple[Tensor, Tensor, float]:
        """Largest eigenvalues (descending), top-r eigenvectors and trace of ``Yhat``'s covariance."""
        if self._from_kept is not None:
            evals, top, total = self._from_kept.base._eigen
            square = self._from_kept.scale**2
            return square * evals, self._from_kept.rotate(top), square * total
        p = self._calibration
        if self._is_kept:  # Z itself: its output Gram comes from Y's less the pruned columns' part
            cov = output_covariance(p.kept_output_gram, p.w_kept @ p.mean_kept, p.count)
        else:
            cov = covariance_from_gram(self.compensation.weight, self._weight_gram, p.mean_kept, p.count)
        evals, evecs = principal_directions(cov, SPECTRUM_COMPONENTS)
        return evals, evecs[:, :TOP_DIRECTIONS], float(torch.trace(cov))

    @property
    def explained_variance(self) -> Tensor:
        """Explained-variance ratios of ``Yhat``'s largest components, descending."""
        evals, _, total = self._eigen
        return explained_variance(evals, total)

    @property
    def top_directions(self) -> Tensor:
        """(d_out, r) ``Yhat``'s top-r principal directions (unit columns, by decreasing variance)."""
        return self._eigen[1]

    @cached_property
    def principal_angles_deg(self) -> Tensor:
        """Principal angles between the top-r output subspaces of ``Y`` and ``Yhat``."""
        return principal_angles(self._basis.top, self._eigen[1])

    @cached_property
    def _weight_outputs(self) -> Tensor:
        """``W'_K X_K`` on the sample (d_out, m), kept for the results that have their own ``W'_K``."""
        if self._is_kept:
            return self._basis.kept_outputs(self._calibration.kept)
        return compensated_outputs(Compensation(weight=self.compensation.weight),
                                   self._basis.sample[self._calibration.kept])

    @cached_property
    def outputs(self) -> Tensor:
        """``Yhat = W'_K X_K + b`` (d_out, m) on the sample tokens (the projection and the geometry share it)."""
        if self._from_kept is not None:  # s R Z: not kept, Z's outputs are
            outputs = self._from_kept.apply(self._from_kept.base._weight_outputs)
        else:
            outputs = self._weight_outputs
        bias = self.compensation.bias
        return outputs if bias is None else outputs + bias[:, None]

    def _shares_outputs(self) -> bool:
        """Whether ``Yhat`` is ``Z`` itself (``none``)."""
        f = self._from_kept
        return f is not None and f.rotation is None and f.scale == 1.0 and self.compensation.bias is None

    @cached_property
    def projection(self) -> Tensor:
        """(2, m) sample tokens of ``Yhat`` on ``Y``'s top two principal components."""
        if self._shares_outputs():
            return self._from_kept.base.projection
        return self._basis.project(self.outputs)

    @cached_property
    def _token_gram(self) -> Tensor:
        """``Yhat^T Yhat`` (m, m) over the sample tokens; ``s^2 Z^T Z`` for a rotated, scaled ``Z``."""
        f = self._from_kept
        if f is not None and self.compensation.bias is None:
            base = f.base._token_gram
            return base if f.scale == 1.0 else f.scale**2 * base
        outputs = self.outputs
        return outputs.T @ outputs

    @cached_property
    def _token_diagnostics(self) -> tuple[Tensor, dict]:
        if self._shares_outputs():
            return self._from_kept.base._token_diagnostics
        gram = self._token_gram
        return (self._basis.inner_products(gram),
                token_geometry(self._basis.y, self.outputs, self._basis.token_gram_y, gram))

    @property
    def inner_products(self) -> Tensor:
        """(pairs,) ``<yhat_t, yhat_u>`` for the basis's token pairs."""
        return self._token_diagnostics[0]

    @property
    def geometry(self) -> dict:
        """Norm ratio and cosine per sample token (values and summaries), Gram distortion."""
        return self._token_diagnostics[1]

    @cached_property
    def rotation(self) -> dict:
        """Orthogonality error, distance from identity, rotation angles, spectrum of ``M``."""
        return rotation_diagnostics(self.compensation)

    def complete(self) -> MethodResult:
        """Compute every diagnostic now; ``seconds["diagnostics"]`` says how long that took."""
        start = time.perf_counter()
        for name in ("principal_angles_deg", "projection", "_token_diagnostics", "rotation"):
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
        return explained_variance(self.basis.evals_y, self.basis.variance_y)

    @property
    def projection_y(self) -> Tensor:  # (2, m)
        return self.basis.project(self.basis.y)

    @property
    def inner_products_y(self) -> Tensor:  # (pairs,) <y_t, y_u>
        return self.basis.inner_products(self.basis.token_gram_y)

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

    def complete(self) -> SublayerAnalysis:
        """Compute every diagnostic of every method now (reports and benchmarks want them all)."""
        for result in (self.uncompensated, *self.methods.values()):
            result.complete()
        return self


def _from_kept(comp: Compensation, w_kept: Tensor, uncompensated: MethodResult) -> FromKept | None:
    """``comp``'s weight as ``scale * R * W_K``: the same ``W_K``, or a method that says it rotates it."""
    if comp.rotation is None and torch.equal(comp.weight, w_kept):  # none, bias
        return FromKept(uncompensated, None, 1.0)
    if comp.rotation is not None and comp.kept_scale is not None:
        return FromKept(uncompensated, comp.rotation, comp.kept_scale)
    return None


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
    lam: float = DEFAULT_LAMBDA,
    seed: int = 0,
    what: str = "units",
    rounding: str = "nearest",
    basis: SublayerBasis | None = None,
    score_seed: int | None = None,
) -> SublayerAnalysis:
    """Everything the method page's pictures need for one sublayer and several methods.

    ``basis`` (from ``prepare_sublayer`` on the same weight, statistics and seed) skips
    the selection-independent work when the same sublayer is analysed again. ``score_seed``
    (default ``seed``) seeds the ``random`` score.
    """
    for m in methods:
        check_method(m)
    check_alpha(alpha)
    check_lambda(lam)
    if basis is None:
        basis = prepare_sublayer(weight, calibration, heldout, seed)
    elif basis.weight.shape != weight.shape or basis.sample.shape[0] != calibration.d_in:
        raise ValueError("the basis was prepared for another sublayer")
    sel = select(basis.weight, calibration, score, ratio, unit_size, seed if score_seed is None else score_seed,
                 what, rounding)
    problems = {
        split: KeptProblem(basis.weight, stats, sel.kept, basis.wg[split],
                           basis.output_gram if split == "calibration" else None)
        for split, stats in (("calibration", calibration), ("heldout", heldout))
    }
    w_kept = problems["calibration"].w_kept
    # Z's errors need only ||Z||^2 (kept_own) and its covariance Z Z^T (kept_output_gram): no W_K G[K,K]
    uncompensated = MethodResult("none", Compensation(weight=w_kept), basis, problems, None)
    results = {}
    for name in methods:
        start = time.perf_counter()
        comp = compensate_problem(name, problems["calibration"], alpha, lam)
        seconds = {"compensate": time.perf_counter() - start}
        from_kept = _from_kept(comp, w_kept, uncompensated)
        grams = None if from_kept is not None else {split: weight_gram(comp, split, p) for split, p in problems.items()}
        results[name] = MethodResult(name, comp, basis, problems, grams, from_kept, seconds)
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
