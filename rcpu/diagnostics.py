"""Diagnostics of one compensated sublayer (method page, section 5).

Errors come from the statistics alone (the error-from-Gram formula); pictures and
token-level geometry come from the small token sample. ``Yhat = W'_K X_K + b``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .compensate import Compensation
from .problem import KeptProblem
from .stats import LayerStats


def relative_error(
    weight: Tensor, stats: LayerStats, kept: Tensor, new_weight: Tensor, bias: Tensor | None = None,
    wg: Tensor | None = None,
) -> float:
    """``||Y - Yhat||_F / ||Y||_F`` from G, s and n alone (``KeptProblem.relative_error``)."""
    return KeptProblem(weight, stats, kept, wg).relative_error(new_weight.to(torch.float64), bias)


def compensated_outputs(comp: Compensation, inputs_kept: Tensor) -> Tensor:
    """``Yhat = W'_K X_K + b`` (d_out, m) for kept inputs ``X_K`` (k, m), float64."""
    yhat = comp.weight @ inputs_kept.to(torch.float64)
    return yhat + comp.bias[:, None] if comp.bias is not None else yhat


def sample_outputs(weight: Tensor, sample: Tensor, kept: Tensor, comp: Compensation):
    """(Y, Z, Yhat) on sample tokens, each (d_out, m) float64."""
    w = weight.to(torch.float64)
    x = sample.to(torch.float64)
    return w @ x, w[:, kept] @ x[kept], compensated_outputs(comp, x[kept])


def _summary(values: Tensor) -> dict:
    v = values[torch.isfinite(values)]
    if v.numel() == 0:
        return {"mean": None, "p05": None, "p95": None}
    return {
        "mean": float(v.mean()),
        "p05": float(torch.quantile(v, 0.05)),
        "p95": float(torch.quantile(v, 0.95)),
    }


def token_geometry(y: Tensor, yhat: Tensor, token_gram: Tensor | None = None,
                   token_gram_hat: Tensor | None = None) -> dict:
    """Per-token norm ratio and cosine, and relative Gram distortion over tokens.

    ``token_gram`` (``Y^T Y``) and ``token_gram_hat`` (``Yhat^T Yhat``) may be passed when known.
    """
    y_norm = torch.linalg.vector_norm(y, dim=0)
    yhat_norm = (torch.linalg.vector_norm(yhat, dim=0) if token_gram_hat is None
                 else token_gram_hat.diagonal().clamp_min(0.0).sqrt())
    valid = y_norm > 0
    ratio = yhat_norm[valid] / y_norm[valid]
    cosine = torch.sum(y * yhat, dim=0)[valid] / (y_norm[valid] * yhat_norm[valid]).clamp_min(1e-300)
    return {
        "norm_ratio_values": ratio,
        "cosine_values": cosine,
        "norm_ratio": _summary(ratio),
        "cosine": _summary(cosine),
        "gram_distortion": gram_distortion(y, yhat, token_gram, token_gram_hat),
    }


def gram_distortion(y: Tensor, yhat: Tensor, token_gram: Tensor | None = None,
                    token_gram_hat: Tensor | None = None) -> float:
    """``||Yhat^T Yhat - Y^T Y||_F / ||Y^T Y||_F`` over sample tokens (either token Gram may be passed in)."""
    token_gram = y.T @ y if token_gram is None else token_gram
    denom = torch.linalg.matrix_norm(token_gram)
    if denom == 0:
        return 0.0
    token_gram_hat = yhat.T @ yhat if token_gram_hat is None else token_gram_hat
    return float(torch.linalg.matrix_norm(token_gram_hat - token_gram) / denom)


def principal_directions(cov: Tensor, count: int | None = None) -> tuple[Tensor, Tensor]:
    """(eigenvalues descending, eigenvectors as columns) of a symmetric covariance; the largest ``count``.

    Each eigenvector's sign is fixed so that its largest-magnitude entry is positive,
    so that projections on it do not flip between runs or equivalent inputs.
    """
    # torch's full solver: scipy's subset solver computes less, but its OpenBLAS threads keep
    # spinning after the call and slow torch's next products down by half on 2 cores.
    evals, evecs = torch.linalg.eigh((cov + cov.T) / 2)
    evals, evecs = evals.flip(0)[:count], evecs.flip(1)[:, :count]  # eigh sorts ascending
    peak = evecs.gather(0, evecs.abs().argmax(dim=0, keepdim=True))
    return evals.clamp_min(0.0), evecs * torch.where(peak < 0, -1.0, 1.0).to(evecs.dtype)


def explained_variance(evals: Tensor, total: float | None = None) -> Tensor:
    """``evals / total``; ``total`` (the covariance's trace) defaults to the sum of ``evals``."""
    total = float(evals.sum()) if total is None else total
    return evals / total if total > 0 else torch.zeros_like(evals)


def principal_angles(basis_a: Tensor, basis_b: Tensor) -> Tensor:
    """Principal angles in degrees between the column spans of two orthonormal bases."""
    cosines = torch.linalg.svdvals(basis_a.T @ basis_b).clamp(-1.0, 1.0)
    return torch.rad2deg(torch.arccos(cosines))


def rotation_angles_deg(q: Tensor) -> Tensor:
    """How far an orthogonal ``Q`` turns: its rotation angles in degrees, descending.

    Eigenvalues of an orthogonal Q are exp(+-i theta) (and +-1); those of its symmetric
    part are cos(theta): the same angles from a symmetric eigensolver, ~100x faster.
    """
    cosines = torch.linalg.eigvalsh((q + q.T) / 2).clamp(-1.0, 1.0)
    return torch.sort(torch.rad2deg(torch.arccos(cosines)), descending=True).values


def rotation_diagnostics(comp: Compensation) -> dict:
    """How far Q is from the identity and from orthogonality; the spectrum of M."""
    if comp.rotation is None:
        return {
            "orthogonality_error": None,
            "distance_from_identity": None,
            "rotation_angles_deg": None,
            "singular_values_M": None,
            "condition_number_M": None,
            "rank_M": None,
        }
    q = comp.rotation
    eye = torch.eye(q.shape[0], dtype=q.dtype)
    s = comp.singular_values
    rank = comp.rank if comp.rank is not None else int((s > 0).sum())
    # None (JSON null): M is rank-deficient, its smallest singular values are rounding noise
    cond = float(s[0] / s[-1]) if rank == s.numel() and s[-1] > 0 else None
    return {
        "orthogonality_error": float(torch.linalg.matrix_norm(q.T @ q - eye)),
        "distance_from_identity": float(torch.linalg.matrix_norm(q - eye)),
        "rotation_angles_deg": rotation_angles_deg(q),
        "singular_values_M": s,
        "condition_number_M": cond,
        "rank_M": rank,
    }
