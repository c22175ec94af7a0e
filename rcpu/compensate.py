"""Compensation of the kept weights after pruning (method page, section 3).

Every method is computed from the statistics alone, in float64. ``weight`` is the
full ``W`` (d_out, d_in); ``kept`` the kept column indices K (size k). A method
returns the new kept weights ``W'_K`` (d_out, k), an optional added bias (d_out,),
and, for rotation methods, ``Q`` and the singular values of ``M``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import RcpuError
from .problem import KeptProblem, complement
from .stats import LayerStats, all_finite

DEFAULT_ALPHA = 0.01  # ridge: lambda = alpha * trace(G[K,K]) / k
DEFAULT_LAMBDA = 1e-4  # ls_ridge: absolute, on the summed Gram (the authors' default)
LSTSQ_RCOND = 1e-12  # relative cut-off of the least-norm solver on singular Gram matrices
# Singular values of M below this share of the largest are rounding noise of M's products
# (~1e-13 at d_out = 4096), not data; and one that small moves the Procrustes objective by
# less than 1e-9 of its value, so leaving its direction alone costs nothing measurable.
RANK_RTOL = 1e-10


@dataclass(frozen=True)
class Regularisation:
    """The strengths of the regularised fits: ``ridge`` (relative) and ``ls_ridge`` (absolute)."""

    alpha: float = DEFAULT_ALPHA
    lam: float = DEFAULT_LAMBDA


@dataclass
class Compensation:
    weight: Tensor  # (d_out, k) float64, W'_K
    bias: Tensor | None = None  # (d_out,) float64, added to the sublayer's output
    rotation: Tensor | None = None  # (d_out, d_out) Q
    singular_values: Tensor | None = None  # (d_out,) of M, descending
    kept_scale: float | None = None  # set when weight == kept_scale * Q @ W_K (a rotated, scaled Z)
    rank: int | None = None  # numerical rank of M (rotation methods)
    choice: dict | None = None  # ``auto``: the winner and every candidate's validation error
    # ``W'_K G[K,K]`` on the tokens the weight was fitted to, where the fit's normal equations give it
    # (ls, ridge, ls_ridge solved exactly): the error and covariance on those tokens need no product.
    fit_gram: Tensor | None = None


def numerical_rank(singular_values: Tensor) -> int:
    """How many singular values (descending) exceed ``RANK_RTOL`` of the largest."""
    if singular_values.numel() == 0 or not singular_values[0] > 0:
        return 0
    return int((singular_values > RANK_RTOL * singular_values[0]).sum())


def procrustes(cross: Tensor, proper: bool = False) -> tuple[Tensor, Tensor]:
    """The orthogonal ``Q`` maximising ``tr(Q^T M)`` that is closest to the identity.

    With ``M = U S V^T`` of numerical rank ``r``, every optimal ``Q`` is
    ``U_r V_r^T + U_perp R V_perp^T`` with ``R`` orthogonal; the data fix only the
    first part. The canonical choice maximises ``tr(Q)`` (minimises ``||Q - I||_F``):
    ``R = Z P^T`` for ``V_perp^T U_perp = P Sigma Z^T`` (Procrustes once more), so that
    directions the calibration data do not constrain are turned as little as
    possible, and ``Q`` does not depend on how LAPACK fills the null spaces.

    With ``proper`` the result has ``det Q = +1``: where ``M`` is rank-deficient a
    reflection is moved into the free part at no cost to the objective (the
    weakest pair of ``Sigma`` flips); at full rank the smallest singular pair of
    ``M`` flips, as the classic constrained Procrustes does.
    Returns (Q, singular values of M).
    """
    u, s, vh = torch.linalg.svd(cross)
    r = numerical_rank(s)
    q = u[:, :r] @ vh[:r]
    if r < s.numel():
        u_perp, v_perp = u[:, r:], vh[r:].T  # (d, d - r) bases of the two null spaces
        p, _, zh = torch.linalg.svd(v_perp.T @ u_perp)
        if proper and torch.linalg.det(q + u_perp @ (zh.T @ p.T) @ v_perp.T) < 0:
            zh = zh.clone()
            zh[-1] = -zh[-1]  # the weakest pair: the least trace lost
        q = q + u_perp @ (zh.T @ p.T) @ v_perp.T
    elif proper and torch.linalg.det(q) < 0:
        u = u.clone()
        u[:, -1] = -u[:, -1]
        q = u @ vh
    return q, s


def _solve_psd(matrix: Tensor, rhs_t: Tensor) -> tuple[Tensor, bool]:
    """``X = rhs_t @ matrix^-1`` for symmetric PSD ``matrix``, least-norm when singular; and whether
    ``X matrix = rhs_t`` holds (to rounding: the exact solve), which the least-norm solution does not."""
    try:
        chol = torch.linalg.cholesky(matrix)
    except RuntimeError:
        chol = None
    if chol is not None:
        # Cholesky can "succeed" on a numerically singular matrix with rounding-level pivots
        # (a column dependent on earlier ones); its solution is then arbitrary, not least-norm.
        # A pivot ratio is the share of a column's energy outside the span of the earlier ones;
        # rounding error in it grows like eps / (an earlier small ratio), so below sqrt(eps) it
        # cannot be told from zero: such a matrix goes to the least-norm solver.
        residual = torch.diagonal(chol) ** 2 / torch.diagonal(matrix)
        if bool(residual.min() > torch.finfo(matrix.dtype).eps ** 0.5):
            return torch.cholesky_solve(rhs_t.T, chol).T, True
    # Eigenvalues of a Gram matrix below ~1e-12 of the largest are rounding noise of its
    # accumulation (the default cut, n * eps, keeps some of them and the solution is then not
    # least-norm); a direction that weak carries no measurable share of the output either.
    return torch.linalg.lstsq(matrix, rhs_t.T, rcond=LSTSQ_RCOND, driver="gelsd").solution.T, False


def _none(p: KeptProblem, reg: Regularisation) -> Compensation:
    return Compensation(weight=p.w_kept.clone())


def _bias(p: KeptProblem, reg: Regularisation) -> Compensation:
    pruned = complement(p.kept, p.w.shape[1])
    return Compensation(weight=p.w_kept.clone(), bias=p.w[:, pruned] @ p.stats.mean[pruned])


def _fitted(p: KeptProblem, lam: float, towards: Tensor | None) -> Compensation:
    """``W'_K = (W G[:, K] + lam B)(G[K, K] + lam I)^-1``, ``B`` = ``towards`` (or 0). Where solved exactly,
    ``W'_K G[K, K] = W G[:, K] + lam (B - W'_K)`` (the normal equations) is the fit's ``fit_gram``."""
    rhs = p.target if towards is None else p.target + lam * towards
    matrix = p.gram_kk if lam == 0 else p.gram_kk + lam * torch.eye(p.gram_kk.shape[0], dtype=p.gram_kk.dtype)
    weight, exact = _solve_psd(matrix, rhs)
    fit_gram = None
    if exact:
        fit_gram = p.target if lam == 0 else rhs - lam * weight
    return Compensation(weight=weight, fit_gram=fit_gram)


def _ls(p: KeptProblem, reg: Regularisation) -> Compensation:
    return _fitted(p, 0.0, None)  # W G[:, K] G[K, K]^-1


def ridge_lambda(gram_kk: Tensor, alpha: float) -> float:
    """``lambda = alpha * trace(G[K,K]) / k``."""
    return float(alpha * torch.trace(gram_kk) / gram_kk.shape[0])


def _ridge(p: KeptProblem, reg: Regularisation) -> Compensation:
    return _fitted(p, ridge_lambda(p.gram_kk, reg.alpha), None)


def _ls_ridge(p: KeptProblem, reg: Regularisation) -> Compensation:
    """The paper's LS + ridge: ``(W G[:, K] + lambda W_K)(G[K, K] + lambda I)^-1``, toward ``W_K``."""
    return _fitted(p, reg.lam, p.w_kept)


def _rotation_parts(p: KeptProblem, centred: bool = False, proper: bool = False) -> tuple[Tensor, Tensor]:
    """``Q`` and the singular values of ``M = W G[:, K] W_K^T`` (``C`` for ``G`` when centred); kept on
    the problem, so rotation and rotation + scale (``auto`` tries both) share one SVD."""
    key = (centred, proper)
    if key not in p.rotations:
        cross = (p.centred_target if centred else p.target) @ p.w_kept.T  # (d_out, d_out)
        p.rotations[key] = procrustes(cross, proper=proper)
    return p.rotations[key]


def _rotated(p: KeptProblem, q: Tensor, s: Tensor, scale: float | None = 1.0, weight: Tensor | None = None,
             bias: Tensor | None = None) -> Compensation:
    """A rotation method's result: ``W'_K`` (default ``scale * Q W_K``), ``Q``, ``M``'s spectrum and rank."""
    weight = (q @ p.w_kept if scale == 1.0 else scale * (q @ p.w_kept)) if weight is None else weight
    return Compensation(weight=weight, bias=bias, rotation=q, singular_values=s, kept_scale=scale,
                        rank=numerical_rank(s))


def _rotation(p: KeptProblem, reg: Regularisation) -> Compensation:
    q, s = _rotation_parts(p)
    return _rotated(p, q, s)


def rotation_scale_factor(singular_values: Tensor, kept_own: float) -> float:
    """``s = trace(S) / trace(W_K G[K,K] W_K^T)``: least-squares isotropic scale (``kept_own`` the trace)."""
    return float(singular_values.sum() / kept_own) if kept_own > 0 else 1.0


def _rotation_scale(p: KeptProblem, reg: Regularisation) -> Compensation:
    q, s = _rotation_parts(p)
    return _rotated(p, q, s, scale=rotation_scale_factor(s, p.kept_own))


def _rotation_so(p: KeptProblem, reg: Regularisation) -> Compensation:
    q, s = _rotation_parts(p, proper=True)
    return _rotated(p, q, s)


def _rotation_bias(p: KeptProblem, reg: Regularisation) -> Compensation:
    q, s = _rotation_parts(p, centred=True)
    bias = p.output_mean - q @ (p.w_kept @ p.mean_kept)  # b = W mu - Q W_K mu_K
    return _rotated(p, q, s, bias=bias)


def _rotation_diag(p: KeptProblem, reg: Regularisation) -> Compensation:
    q, s = _rotation_parts(p)
    rotated = q @ p.w_kept  # (d_out, k)
    # Per output channel i: d_i = <Y_i, (QZ)_i> / ||(QZ)_i||^2.
    numer = torch.sum(p.target * rotated, dim=1)
    denom = torch.sum(p.weight_gram(rotated) * rotated, dim=1)
    scale = torch.where(denom > 0, numer / denom.clamp_min(1e-300), torch.ones_like(denom))
    return _rotated(p, q, s, scale=None, weight=scale[:, None] * rotated)


# ``auto``'s candidates; ls_ridge is tried at each strength of AUTO_RIDGE_GRID, given relative to
# the fit's trace(G[K,K]) / k. The winner is refitted on all tokens with the *absolute* lambda its
# folds used: lambda on the summed Gram is the noise-to-prior ratio of ridge toward W_K and does not
# depend on the token count, so a strength relative to the fit's size would over-regularise the refit
# by the ratio of their token counts.
AUTO_CANDIDATES = ("rotation", "rotation_scale", "rotation_bias", "bias", "ls")
AUTO_RIDGE_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def auto_candidates(gram_kk: Tensor) -> list[tuple[str, float, str]]:
    """(method, absolute lambda on ``gram_kk``, name) for every candidate of ``auto``."""
    fixed = [(m, DEFAULT_LAMBDA, m) for m in AUTO_CANDIDATES]
    return fixed + [("ls_ridge", ridge_lambda(gram_kk, a), f"ls_ridge@{a:g}") for a in AUTO_RIDGE_GRID]


Candidates = Callable[[Tensor], list[tuple[str, float, str]]]  # G[K,K] of the fit -> (method, lambda, name)


def fold_problems(p: KeptProblem, fold_wg: list[Tensor] | None = None) -> list[tuple[KeptProblem, KeptProblem]]:
    """(fit, held) per calibration fold: the fit on every other fold (their Grams add up, so the
    fit's are the full ones less the fold's), the held-back fold itself."""
    folds = p.stats.folds
    if not folds or len(folds) < 2:
        raise RcpuError("method 'auto' needs calibration statistics split into at least two folds "
                        "(a whole-model prune with at least two calibration windows)")
    fold_wg = fold_wg or [p.w @ fold.gram for fold in folds]  # the fits' are p.wg less each
    pairs = []
    for fold, wg in zip(folds, fold_wg, strict=True):
        rest = LayerStats(gram=p.stats.gram - fold.gram, total=p.stats.total - fold.total,
                          count=p.stats.count - fold.count, sample=fold.sample)
        pairs.append((KeptProblem(p.w, rest, p.kept, p.wg - wg), KeptProblem(p.w, fold, p.kept, wg)))
    return pairs


def validation_errors(p: KeptProblem, reg: Regularisation, candidates: Candidates | None = None,
                      fold_wg: list[Tensor] | None = None) -> dict[str, float]:
    """Cross-validation over the calibration folds: each candidate fitted on all folds but one and
    measured on that one, summed over folds: ``sqrt(sum ||Y - Yhat||^2 / sum ||Y||^2)`` on the
    held-back folds, from their Grams alone. ``candidates`` defaults to ``auto``'s; ``fold_wg``
    (``W G`` per fold) may be shared across kept sets."""
    candidates = candidates or auto_candidates
    pairs = fold_problems(p, fold_wg)
    errors: dict[str, float] = {}
    reference: dict[str, float] = {}
    for train, held in pairs:
        for method, lam, name in candidates(train.gram_kk):
            comp = METHODS[method](train, Regularisation(reg.alpha, lam))
            err, ref = held.error(comp.weight, comp.bias, own=kept_norm(comp, train.w_kept, held))
            errors[name] = errors.get(name, 0.0) + err
            reference[name] = reference.get(name, 0.0) + ref
    return {name: math.sqrt(err / reference[name]) if reference[name] > 0 else 0.0 for name, err in errors.items()}


def kept_norm(comp: Compensation, w_kept: Tensor, problem: KeptProblem) -> float | None:
    """``||W' X_K||^2`` on ``problem``'s tokens without a product with its ``G[K,K]``, where ``W'`` follows
    from the ``W_K`` it was fitted to: ``s Q W_K`` (``Q`` orthogonal keeps norms: ``s^2 ||W_K X_K||^2``) or
    ``W_K`` itself (none, bias). None for any other ``W'`` (the error formula then makes the product)."""
    if comp.rotation is not None and comp.kept_scale is not None:
        return comp.kept_scale**2 * problem.kept_own
    if comp.rotation is None and comp.weight.shape == w_kept.shape and torch.equal(comp.weight, w_kept):
        return problem.kept_own
    return None


FIT_SPLIT = "calibration"  # the split of the statistics every compensation is fitted on


def fitted_gram(comp: Compensation, split: str) -> Tensor | None:
    """``W'_K G[K,K]`` on ``split``'s tokens where the fit carries it (its own tokens, ``fit_gram``), else None."""
    return comp.fit_gram if split == FIT_SPLIT else None


def weight_gram(comp: Compensation, split: str, problem: KeptProblem) -> Tensor:
    """``W'_K G[K,K]`` on ``problem``'s tokens (``split``): the fit's own where it has one, else the product."""
    gram = fitted_gram(comp, split)
    return problem.weight_gram(comp.weight) if gram is None else gram


def split_errors(comp: Compensation, problems: dict[str, KeptProblem],
                 weight_grams: dict[str, Tensor] | None = None) -> dict[str, float]:
    """``comp``'s relative output error on each split's problem (``problems[FIT_SPLIT]``: the tokens it was
    fitted to). A product with ``G[K,K]`` only where needed: none for a rotated, scaled or kept ``Z``
    (``kept_norm``) or on the fit's own tokens (``fit_gram``); ``weight_grams`` when already made."""
    return {
        split: p.relative_error(comp.weight, comp.bias,
                                fitted_gram(comp, split) if weight_grams is None else weight_grams[split],
                                own=kept_norm(comp, p.w_kept, p))
        for split, p in problems.items()
    }


def _auto(p: KeptProblem, reg: Regularisation) -> Compensation:
    """The candidate with the lowest cross-validation error over the calibration folds, refitted on
    all calibration tokens (the evaluation text is never seen: folds split calibration windows)."""
    errors = validation_errors(p, reg)
    ranked = sorted(errors, key=errors.get)
    winner = ranked[0]
    method, lam_all, _ = next(c for c in auto_candidates(p.gram_kk) if c[2] == winner)
    # The folds' absolute lambda (see AUTO_CANDIDATES), averaged over the fits: each fit's Gram is the
    # full one less a fold, so together they hold (K-1)/K of it, and ridge_lambda is linear in it.
    folds = len(p.stats.folds)
    lam = lam_all * (folds - 1) / folds
    result = METHODS[method](p, Regularisation(reg.alpha, lam))
    runner_up = errors[ranked[1]] if len(ranked) > 1 else errors[winner]
    result.choice = {
        "method": method, "candidate": winner, "lambda": lam if method in LAMBDA_METHODS else None,
        "validation_error": errors[winner], "runner_up": ranked[1] if len(ranked) > 1 else None,
        "margin": runner_up - errors[winner],  # how much the winner beat the next candidate by
        "validation_errors": errors,
    }
    return result


MethodFn = Callable[[KeptProblem, Regularisation], Compensation]

METHODS: dict[str, MethodFn] = {
    "none": _none,
    "bias": _bias,
    "ls": _ls,
    "ridge": _ridge,
    "rotation": _rotation,
    "rotation_scale": _rotation_scale,
    "rotation_so": _rotation_so,
    "rotation_bias": _rotation_bias,
    "rotation_diag": _rotation_diag,
    "ls_ridge": _ls_ridge,  # last: the registry's order gives the figures' colours
}

# Methods that choose among the others; they need calibration folds (``LayerStats.folds``), which a
# whole-model prune gathers, so they are offered where a whole model is pruned (prune, sweeps).
SELECTORS: dict[str, MethodFn] = {"auto": _auto}
PRUNE_METHODS = (*METHODS, *SELECTORS)


LAMBDA_METHODS = ("ls_ridge",)  # the methods whose result depends on lambda


def check_alpha(alpha: float, name: str = "alpha") -> None:
    """A ridge strength must be a finite number >= 0 (NaN would reach LAPACK as an illegal value)."""
    if not (isinstance(alpha, numbers.Real) and math.isfinite(alpha) and alpha >= 0):
        raise RcpuError(f"{name} must be a finite number >= 0, got {alpha!r}")


def check_lambda(lam: float) -> None:
    check_alpha(lam, "lambda")


def check_method(name: str, choices=METHODS) -> None:
    if name not in choices:
        extra = " ('auto' only for a whole-model prune)" if name in SELECTORS else ""
        raise RcpuError(f"unknown method {name!r}{extra}; choose one of: {', '.join(choices)}")


def compensate(
    method: str, weight: Tensor, stats: LayerStats, kept: Tensor, alpha: float = DEFAULT_ALPHA,
    lam: float = DEFAULT_LAMBDA,
) -> Compensation:
    """Compensated kept weights for one sublayer; raises on non-finite results."""
    return compensate_problem(method, KeptProblem(weight, stats, kept), alpha, lam)


def compensate_problem(
    method: str, problem: KeptProblem, alpha: float = DEFAULT_ALPHA, lam: float = DEFAULT_LAMBDA
) -> Compensation:
    """``compensate`` on a ``KeptProblem``, whose shared products other methods reuse."""
    check_method(method, PRUNE_METHODS)
    check_alpha(alpha)
    check_lambda(lam)
    if not problem.inputs_finite:
        raise RcpuError(
            f"compensation {method!r} cannot use non-finite weights or statistics (inf/NaN)"
        )
    try:
        result = (METHODS.get(method) or SELECTORS[method])(problem, Regularisation(alpha, lam))
    except torch.linalg.LinAlgError as exc:
        raise RcpuError(f"compensation {method!r} failed: {str(exc).splitlines()[0]}") from None
    parts = [result.weight] + ([result.bias] if result.bias is not None else [])
    if not all(all_finite(p) for p in parts):
        raise RcpuError(
            f"compensation {method!r} produced non-finite weights (statistics contain inf/NaN "
            "or are degenerate); try method 'ridge' or more calibration tokens"
        )
    return result
