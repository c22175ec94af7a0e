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
from .problem import KeptProblem
from .stats import LayerStats

DEFAULT_ALPHA = 0.01
LSTSQ_RCOND = 1e-12  # relative cut-off of the least-norm solver on singular Gram matrices


@dataclass
class Compensation:
    weight: Tensor  # (d_out, k) float64, W'_K
    bias: Tensor | None = None  # (d_out,) float64, added to the sublayer's output
    rotation: Tensor | None = None  # (d_out, d_out) Q
    singular_values: Tensor | None = None  # (d_out,) of M, descending
    kept_scale: float | None = None  # set when weight == kept_scale * Q @ W_K (a rotated, scaled Z)


def procrustes(cross: Tensor, proper: bool = False) -> tuple[Tensor, Tensor]:
    """Orthogonal ``Q`` maximising ``tr(Q^T M)`` for ``M = U S V^T``: ``Q = U V^T``.

    With ``proper`` the result is restricted to ``det Q = +1`` by flipping the
    sign of the last (smallest) singular pair when ``det(U V^T) < 0``.
    Returns (Q, singular values of M).
    """
    u, s, vh = torch.linalg.svd(cross)
    if proper and torch.linalg.det(u @ vh) < 0:
        u = u.clone()
        u[:, -1] = -u[:, -1]
    return u @ vh, s


def _solve_psd(matrix: Tensor, rhs_t: Tensor) -> Tensor:
    """``rhs_t @ matrix^-1`` for symmetric PSD ``matrix``; least-norm when singular."""
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
            return torch.cholesky_solve(rhs_t.T, chol).T
    # Eigenvalues of a Gram matrix below ~1e-12 of the largest are rounding noise of its
    # accumulation (the default cut, n * eps, keeps some of them and the solution is then not
    # least-norm); a direction that weak carries no measurable share of the output either.
    return torch.linalg.lstsq(matrix, rhs_t.T, rcond=LSTSQ_RCOND, driver="gelsd").solution.T


def _none(p: KeptProblem, alpha: float) -> Compensation:
    return Compensation(weight=p.w_kept.clone())


def _bias(p: KeptProblem, alpha: float) -> Compensation:
    pruned = _complement(p.kept, p.w.shape[1])
    return Compensation(weight=p.w_kept.clone(), bias=p.w[:, pruned] @ p.stats.mean[pruned])


def _ls(p: KeptProblem, alpha: float) -> Compensation:
    return Compensation(weight=_solve_psd(p.gram_kk, p.target))  # W G[:, K] G[K, K]^-1


def ridge_lambda(gram_kk: Tensor, alpha: float) -> float:
    """``lambda = alpha * trace(G[K,K]) / k``."""
    return float(alpha * torch.trace(gram_kk) / gram_kk.shape[0])


def _ridge(p: KeptProblem, alpha: float) -> Compensation:
    lam = ridge_lambda(p.gram_kk, alpha)
    regularised = p.gram_kk + lam * torch.eye(p.gram_kk.shape[0], dtype=p.gram_kk.dtype)
    return Compensation(weight=_solve_psd(regularised, p.target))


def _rotation_parts(p: KeptProblem, centred: bool = False, proper: bool = False) -> tuple[Tensor, Tensor]:
    """``Q`` and the singular values of ``M = W G[:, K] W_K^T`` (``C`` for ``G`` when centred)."""
    cross = (p.centred_target if centred else p.target) @ p.w_kept.T  # (d_out, d_out)
    return procrustes(cross, proper=proper)


def _rotation(p: KeptProblem, alpha: float) -> Compensation:
    q, s = _rotation_parts(p)
    return Compensation(weight=q @ p.w_kept, rotation=q, singular_values=s, kept_scale=1.0)


def rotation_scale_factor(singular_values: Tensor, w_kept: Tensor, gram_kk: Tensor) -> float:
    """``s = trace(S) / trace(W_K G[K,K] W_K^T)``: least-squares isotropic scale."""
    denom = torch.sum((w_kept @ gram_kk) * w_kept)
    return float(singular_values.sum() / denom) if denom > 0 else 1.0


def _rotation_scale(p: KeptProblem, alpha: float) -> Compensation:
    q, s = _rotation_parts(p)
    scale = rotation_scale_factor(s, p.w_kept, p.gram_kk)
    return Compensation(weight=scale * (q @ p.w_kept), rotation=q, singular_values=s, kept_scale=scale)


def _rotation_so(p: KeptProblem, alpha: float) -> Compensation:
    q, s = _rotation_parts(p, proper=True)
    return Compensation(weight=q @ p.w_kept, rotation=q, singular_values=s, kept_scale=1.0)


def _rotation_bias(p: KeptProblem, alpha: float) -> Compensation:
    q, s = _rotation_parts(p, centred=True)
    bias = p.output_mean - q @ (p.w_kept @ p.mean_kept)  # b = W mu - Q W_K mu_K
    return Compensation(weight=q @ p.w_kept, bias=bias, rotation=q, singular_values=s, kept_scale=1.0)


def _rotation_diag(p: KeptProblem, alpha: float) -> Compensation:
    q, s = _rotation_parts(p)
    rotated = q @ p.w_kept  # (d_out, k)
    # Per output channel i: d_i = <Y_i, (QZ)_i> / ||(QZ)_i||^2.
    numer = torch.sum(p.target * rotated, dim=1)
    denom = torch.sum(p.weight_gram(rotated) * rotated, dim=1)
    scale = torch.where(denom > 0, numer / denom.clamp_min(1e-300), torch.ones_like(denom))
    return Compensation(weight=scale[:, None] * rotated, rotation=q, singular_values=s)


MethodFn = Callable[[KeptProblem, float], Compensation]

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
}


def check_alpha(alpha: float) -> None:
    """The ridge strength must be a finite number >= 0 (NaN would reach LAPACK as an illegal value)."""
    if not (isinstance(alpha, numbers.Real) and math.isfinite(alpha) and alpha >= 0):
        raise RcpuError(f"alpha must be a finite number >= 0, got {alpha!r}")


def check_method(name: str) -> None:
    if name not in METHODS:
        raise RcpuError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")


def _complement(kept: Tensor, d_in: int) -> Tensor:
    mask = torch.ones(d_in, dtype=torch.bool)
    mask[kept] = False
    return torch.nonzero(mask).reshape(-1)


def compensate(
    method: str, weight: Tensor, stats: LayerStats, kept: Tensor, alpha: float = DEFAULT_ALPHA
) -> Compensation:
    """Compensated kept weights for one sublayer; raises on non-finite results."""
    return compensate_problem(method, KeptProblem(weight, stats, kept), alpha)


def compensate_problem(method: str, problem: KeptProblem, alpha: float = DEFAULT_ALPHA) -> Compensation:
    """``compensate`` on a ``KeptProblem``, whose shared products other methods reuse."""
    check_method(method)
    check_alpha(alpha)
    if not problem.inputs_finite:
        raise RcpuError(
            f"compensation {method!r} cannot use non-finite weights or statistics (inf/NaN)"
        )
    try:
        result = METHODS[method](problem, alpha)
    except torch.linalg.LinAlgError as exc:
        raise RcpuError(f"compensation {method!r} failed: {str(exc).splitlines()[0]}") from None
    parts = [result.weight] + ([result.bias] if result.bias is not None else [])
    if not all(bool(torch.isfinite(p).all()) for p in parts):
        raise RcpuError(
            f"compensation {method!r} produced non-finite weights (statistics contain inf/NaN "
            "or are degenerate); try method 'ridge' or more calibration tokens"
        )
    return result
