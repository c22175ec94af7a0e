"""One compensation problem: a sublayer's weight, one token set's statistics, a kept set.

Compensation (method page, section 3) and the error and covariance of the
compensated outputs (section 5) are all built from the same few products of
``W`` and ``G``: ``W G``, its kept columns ``W G[:, K]`` and ``G[K, K]``. A
``KeptProblem`` computes each on first use and keeps it, so comparing several
methods on one selection computes them once.
"""

from __future__ import annotations

import math
from functools import cached_property

import torch
from torch import Tensor

from .stats import LayerStats, all_finite


def inner(a: Tensor, b: Tensor) -> float:
    """``tr(A^T B)``, the sum of the entries of ``A * B``, as one dot product (no temporary matrix)."""
    dtype = torch.promote_types(a.dtype, b.dtype)
    return float(torch.dot(a.reshape(-1).to(dtype), b.reshape(-1).to(dtype)))


def complement(kept: Tensor, d_in: int) -> Tensor:
    """The column indices not in ``kept`` (the pruned set P), ascending."""
    mask = torch.ones(d_in, dtype=torch.bool)
    mask[kept] = False
    return torch.nonzero(mask).reshape(-1)


def few_pruned(kept: Tensor, d_in: int) -> Tensor | None:
    """P when it has fewer than half as many columns as K, else None. Then ``W_K B[K] = W B - W_P B[P]``
    from a product ``W B`` made anyway costs a product over P instead of one over K."""
    if (d_in - kept.numel()) * 2 >= kept.numel():
        return None
    return complement(kept, d_in)


class KeptProblem:
    """``W`` (d_out, d_in), statistics ``G, s, n`` of one token set, kept columns ``K``.

    ``wg = W G`` may be passed in when it is shared with other kept sets on the
    same statistics (it does not depend on ``K``).
    """

    def __init__(self, weight: Tensor, stats: LayerStats, kept: Tensor, wg: Tensor | None = None,
                 output_gram: Tensor | None = None):
        self.w = weight.detach().to(torch.float64)
        self.stats = stats
        self.kept = kept
        self._wg = wg
        self._output_gram = output_gram
        self.rotations: dict[tuple[bool, bool], tuple[Tensor, Tensor]] = {}  # (centred, proper) -> (Q, sigma)

    @property
    def count(self) -> int:
        return self.stats.count

    @cached_property
    def inputs_finite(self) -> bool:
        """Whether ``W``, ``G`` and ``s`` hold no inf/NaN."""
        return all_finite(self.w) and self.stats.finite

    @cached_property
    def wg(self) -> Tensor:
        """``W G`` (d_out, d_in)."""
        return self.w @ self.stats.gram if self._wg is None else self._wg

    @cached_property
    def output_gram(self) -> Tensor:
        """``W G W^T`` (d_out, d_out), ``Y``'s uncentred output Gram (may be passed in, like ``wg``)."""
        return self.wg @ self.w.T if self._output_gram is None else self._output_gram

    @cached_property
    def pruned(self) -> Tensor | None:
        """The pruned columns P where they are few enough for the routes over P (``few_pruned``), else None."""
        return few_pruned(self.kept, self.w.shape[1])

    @cached_property
    def _pruned_parts(self) -> tuple[Tensor, Tensor]:
        """``W_P`` and ``W_P G[P, P]``, the products over P that the routes below share."""
        w_p = self.w[:, self.pruned]
        return w_p, w_p @ self.stats.gram[self.pruned][:, self.pruned]

    @cached_property
    def w_kept(self) -> Tensor:
        """``W_K`` (d_out, k)."""
        return self.w[:, self.kept]

    @cached_property
    def gram_kk(self) -> Tensor:
        """``G[K, K]`` (k, k)."""
        return self.stats.gram[self.kept][:, self.kept]

    @cached_property
    def target(self) -> Tensor:
        """``W G[:, K]`` (d_out, k): the cross term of every fit of ``Y`` from ``X_K``."""
        return self.wg[:, self.kept]

    @cached_property
    def mean_kept(self) -> Tensor:
        """``mu_K`` (k,)."""
        return self.stats.mean[self.kept]

    @cached_property
    def output_mean(self) -> Tensor:
        """``W mu`` (d_out,): the mean of ``Y``."""
        return self.w @ self.stats.mean

    @cached_property
    def centred_target(self) -> Tensor:
        """``W C[:, K] = W G[:, K] - n (W mu) mu_K^T`` (d_out, k), ``C`` the centred Gram."""
        return self.target - self.count * torch.outer(self.output_mean, self.mean_kept)

    @cached_property
    def reference(self) -> float:
        """``||Y||_F^2 = tr(W G W^T)``."""
        return inner(self.wg, self.w)

    def weight_gram(self, new_weight: Tensor) -> Tensor:
        """``W' G[K, K]`` (d_out, k): shared by the error and the covariance of ``W' X_K``."""
        if new_weight is self.w_kept:
            return self.kept_weight_gram
        return new_weight @ self.gram_kk

    @cached_property
    def kept_weight_gram(self) -> Tensor:
        """``W_K G[K, K]`` (d_out, k), where no route over the pruned columns avoids it (many pruned)."""
        return self.w_kept @ self.gram_kk

    @cached_property
    def kept_own(self) -> float:
        """``||Z||_F^2 = tr(W_K G[K,K] W_K^T)`` (``Z = W_K X_K``). With few pruned columns, from
        ``Y = Z + Y_P`` (``Y_P = W_P X_P``): ``||Z||^2 = ||Y||^2 - 2 <Y, Y_P> + ||Y_P||^2``, products over P only."""
        if self.pruned is None:
            return inner(self.kept_weight_gram, self.w_kept)
        w_p, w_p_gpp = self._pruned_parts
        return self.reference - 2 * inner(self.wg[:, self.pruned], w_p) + inner(w_p_gpp, w_p)

    @cached_property
    def kept_output_gram(self) -> Tensor:
        """``Z Z^T = W_K G[K,K] W_K^T`` (d_out, d_out). With few pruned columns, ``Y Y^T`` less the blocks
        that hold P: ``Y Y^T - B - B^T - W_P G[P,P] W_P^T`` with ``B = W_K G[K,P] W_P^T``, and
        ``W_K G[K,P] = (W G)[:, P] - W_P G[P,P]``: products over P and the shared ``W G W^T``."""
        if self.pruned is None:
            return self.kept_weight_gram @ self.w_kept.T
        w_p, w_p_gpp = self._pruned_parts
        b = (self.wg[:, self.pruned] - w_p_gpp) @ w_p.T
        return self.output_gram - b - b.T - w_p_gpp @ w_p.T

    def error(
        self, new_weight: Tensor, bias: Tensor | None = None, weight_gram: Tensor | None = None,
        own: float | None = None,
    ) -> tuple[float, float]:
        """(``||Y - Yhat||_F^2``, ``||Y||_F^2``) for ``Yhat = W' X_K + b``, from G, s and n alone.

        ``||Y - Yhat||^2 = tr(W G W^T) - 2 tr(W' G[K,:] W^T) + tr(W' G[K,K] W'^T)
        - 2 b^T (W s - W' s_K) + n ||b||^2``.
        ``own`` (``tr(W' G[K,K] W'^T)``) may be passed when known without a product.
        """
        if new_weight is self.w_kept and own is None and weight_gram is None:
            own = self.kept_own
        if own is None:
            wg_kk = self.weight_gram(new_weight) if weight_gram is None else weight_gram
            own = inner(wg_kk, new_weight)
        cross = inner(self.target, new_weight)
        err = self.reference - 2 * float(cross) + float(own)
        if bias is not None:
            residual_total = self.count * (self.output_mean - new_weight @ self.mean_kept)  # W s - W' s_K
            err += float(-2 * torch.dot(bias, residual_total) + self.count * torch.dot(bias, bias))
        return max(err, 0.0), self.reference

    def relative_error(
        self, new_weight: Tensor, bias: Tensor | None = None, weight_gram: Tensor | None = None,
        own: float | None = None,
    ) -> float:
        """``||Y - Yhat||_F / ||Y||_F`` (0 when ``Y`` is 0)."""
        err, ref = self.error(new_weight, bias, weight_gram, own)
        return math.sqrt(err / ref) if ref > 0 else 0.0


def covariance_from_gram(new_weight: Tensor, weight_gram: Tensor, mean_kept: Tensor, count: int) -> Tensor:
    """``W' G[K,K] W'^T / n - (W' mu_K)(W' mu_K)^T``, symmetrised, from ``weight_gram = W' G[K,K]``."""
    return output_covariance(weight_gram @ new_weight.T, new_weight @ mean_kept, count)


def output_covariance(output_gram: Tensor, mean: Tensor, count: int) -> Tensor:
    """``O O^T / n - m m^T``, symmetrised: the covariance of outputs from their uncentred Gram and mean."""
    cov = output_gram / max(count, 1) - torch.outer(mean, mean)
    return (cov + cov.T) / 2
