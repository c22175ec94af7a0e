"""Streaming statistics of a linear sublayer's inputs (method page, section 1).

Everything the method needs is a function of the Gram matrix ``G = X X^T``, the
sum ``s = X 1``, the sum of absolute values ``a = |X| 1`` (the authors' score) and
the count ``n``, accumulated in float64 without keeping ``X``. A small seeded
subsample of tokens is kept only for pictures.

Speed: each batch's Gram product is computed in the inputs' own float32 (half the
cost of float64, and only the blocks on and above the diagonal: about 2/3 of a full
product at d_in = 1536) and summed into the float64 total; the diagonal, the sums and
the count stay exact float64. Float64 inputs, and batches too small for it to matter
(``FLOAT32_FROM``), keep a float64 product. The error
against an all-float64 Gram on the embedded model is measured by
``python -m benchmarks floor`` (``docs/benchmarks.md``, section 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

GRAM_BLOCK = 512  # columns per block of the triangular Gram product
# Batches whose product has fewer multiply-adds (tokens x d_in^2) than this stay all-float64: cheap
# anyway (tiny models, tests), and exact. The embedded model's batches (4096 x 576^2) are 80x above it.
FLOAT32_FROM = 2**24


def all_finite(tensor: Tensor) -> bool:
    """Whether ``tensor`` holds no inf/NaN. A finite sum proves it (an inf or NaN entry makes the sum
    inf or NaN) at a fraction of an element-wise check's cost, which runs only when the sum is not
    finite (an entry may be inf or NaN, or finite values may overflow)."""
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def batch_gram(x: Tensor, block: int = GRAM_BLOCK) -> Tensor:
    """``X^T X`` (d, d) of rows ``x`` (N, d) in ``x``'s dtype, computing only the blocks on and above
    the diagonal (the rest is their transpose): (b+1)/(2b) of the full product for b blocks."""
    d = x.shape[1]
    blocks = max(1, math.ceil(d / block))
    if blocks == 1:
        return x.T @ x
    size = math.ceil(d / blocks)
    out = torch.empty(d, d, dtype=x.dtype, device=x.device)
    for start in range(0, d, size):
        strip = x[:, start : start + size].T @ x[:, start:]  # (size, d - start)
        out[start : start + size, start:] = strip
        out[start + size :, start : start + size] = strip[:, size:].T
    return out


@dataclass
class LayerStats:
    gram: Tensor  # (d_in, d_in) float64
    total: Tensor  # (d_in,) float64, sum of inputs over tokens
    count: int  # number of tokens N
    sample: Tensor  # (d_in, m) float32, seeded token subsample for pictures
    abs_total: Tensor | None = None  # (d_in,) float64, sum of |inputs| over tokens
    folds: list[LayerStats] | None = None  # each non-empty calibration fold's (whole windows); they sum to these

    @property
    def d_in(self) -> int:
        return self.gram.shape[0]

    @cached_property
    def finite(self) -> bool:
        """Whether ``G`` and ``s`` hold no inf/NaN (checked once per statistics object, which is never
        changed in place: every ratio, score and method of the explorer shares it)."""
        return all_finite(self.gram) and all_finite(self.total)

    @property
    def mean(self) -> Tensor:
        return self.total / max(self.count, 1)

    @property
    def mean_abs(self) -> Tensor:
        """``E|x_j|``: the mean absolute input of each dimension."""
        if self.abs_total is None:
            raise ValueError("these statistics were gathered without the sum of absolute inputs")
        return self.abs_total / max(self.count, 1)

    @property
    def var(self) -> Tensor:
        """Per-dimension variance ``G_jj / n - mu_j^2``; exactly 0 where it is rounding noise.

        The difference cancels for a (near-)constant dimension and leaves rounding error of the
        size of ``eps * G_jj / n`` (growing slowly with n), not a variance: that is set to 0.
        """
        n = max(self.count, 1)
        second = torch.diagonal(self.gram) / n
        var = second - self.mean**2
        noise = 16 * math.sqrt(n) * torch.finfo(torch.float64).eps * second
        return torch.where(var > noise, var, torch.zeros_like(var))

    def to_arrays(self) -> dict:
        arrays = {
            "gram": self.gram.cpu().numpy(),
            "total": self.total.cpu().numpy(),
            "count": torch.tensor(self.count).numpy(),
            "sample": self.sample.cpu().numpy(),
        }
        if self.abs_total is not None:
            arrays["abs_total"] = self.abs_total.cpu().numpy()
        return arrays

    @classmethod
    def from_arrays(cls, arrays: dict) -> LayerStats:
        return cls(
            gram=torch.from_numpy(arrays["gram"]).to(torch.float64),
            total=torch.from_numpy(arrays["total"]).to(torch.float64),
            count=int(arrays["count"]),
            sample=torch.from_numpy(arrays["sample"]).to(torch.float32),
            abs_total=torch.from_numpy(arrays["abs_total"]).to(torch.float64) if "abs_total" in arrays else None,
        )

    @classmethod
    def from_inputs(cls, inputs: Tensor, sample_size: int = 1024, seed: int = 0) -> LayerStats:
        """Statistics of an explicit input matrix ``X`` (d_in, N); for tests and small data."""
        acc = StatsAccumulator(inputs.shape[0], sample_size=sample_size, seed=seed)
        acc.add(inputs.T)
        return acc.finish()


class StatsAccumulator:
    """Accumulates G, s, n from batches of token rows, plus a reservoir of sampled tokens.

    The sample is a seeded reservoir (Algorithm R over token order), so it does not
    depend on how tokens are split into batches.
    """

    def __init__(self, d_in: int, sample_size: int = 1024, seed: int = 0, float32_from: float = FLOAT32_FROM,
                 device: torch.device | str = "cpu", folds: int = 0):
        self.float32_from = float32_from  # math.inf: every product in float64 (the reference for float32's error)
        # The sums live where the inputs are (a CUDA model: products on the GPU); the sample on the CPU.
        self.gram = torch.zeros(d_in, d_in, dtype=torch.float64, device=device)
        self.squares = torch.zeros(d_in, dtype=torch.float64, device=device)  # the exact diagonal of G
        self.total = torch.zeros(d_in, dtype=torch.float64, device=device)
        self.abs_total = torch.zeros(d_in, dtype=torch.float64, device=device)
        self.count = 0
        # With ``folds``, window w goes to fold ``w % folds`` (windows counted in the order they
        # arrive); one Gram per fold, the full one their sum, so folds cost no extra products.
        self._folds = [StatsAccumulator(d_in, 0, seed, float32_from, device) for _ in range(folds)] if folds > 1 else []
        self._windows = 0
        self.sample_size = sample_size
        self._gen = torch.Generator().manual_seed(seed)
        self._sample = torch.zeros(sample_size, d_in, dtype=torch.float32)
        self._filled = 0
        self._nonfinite = 0

    def add(self, rows: Tensor) -> None:
        """Add tokens given as rows, shape (..., d_in); with folds, (windows, tokens, d_in)."""
        if self._folds:
            windows = rows.reshape(-1, *rows.shape[-2:]) if rows.dim() >= 3 else rows[None]
            for window in windows:
                self._folds[self._windows % len(self._folds)].add(window)
                self._windows += 1
            flat = windows.reshape(-1, windows.shape[-1]).detach()
            start = self.count
            self.count += flat.shape[0]
            if self.sample_size:
                self._reservoir(flat.to("cpu", torch.float32), start)
            return
        rows = rows.reshape(-1, rows.shape[-1]).detach()
        if rows.device != self.gram.device:
            rows = rows.to(self.gram.device)
        x = rows.to(torch.float64)
        if not bool(torch.isfinite(x.sum())):  # cheap check; the row mask only when needed
            finite = torch.isfinite(x).all(dim=1)
            self._nonfinite += int((~finite).sum())
            x = x[finite]
            rows = rows[finite]
        if rows.dtype == torch.float64 or x.shape[0] * x.shape[1] ** 2 < self.float32_from:
            self.gram.addmm_(x.T, x)
        else:  # one float32 product per batch, summed in float64
            self.gram += batch_gram(rows.to(torch.float32))
        self.squares += (x * x).sum(dim=0)
        self.total += x.sum(dim=0)
        self.abs_total += x.abs().sum(dim=0)
        start = self.count
        self.count += x.shape[0]
        if self.sample_size:
            self._reservoir(rows.to("cpu", torch.float32), start)

    def _reservoir(self, rows: Tensor, start: int) -> None:
        n = rows.shape[0]
        free = min(self.sample_size - self._filled, n)
        if free > 0:
            self._sample[self._filled : self._filled + free] = rows[:free]
            self._filled += free
        if free < n:
            idx = torch.arange(start + free, start + n, dtype=torch.float64)
            # Token t replaces a random slot with probability sample_size / (t + 1).
            draws = torch.rand(n - free, generator=self._gen, dtype=torch.float64)
            slots = torch.floor(draws * (idx + 1)).long()
            take = slots < self.sample_size
            if bool(take.any()):
                self._sample[slots[take]] = rows[free:][take]

    @property
    def nonfinite_tokens(self) -> int:
        return self._nonfinite + sum(f.nonfinite_tokens for f in self._folds)

    def finish(self) -> LayerStats:
        if self._folds:
            folds = [f.finish() for f in self._folds]
            return LayerStats(
                gram=sum(f.gram for f in folds), total=sum(f.total for f in folds), count=sum(f.count for f in folds),
                sample=self._sample[: self._filled].T.contiguous(), abs_total=sum(f.abs_total for f in folds),
                folds=[f for f in folds if f.count > 0],  # a fold no window reached would validate nothing
            )
        self.gram.diagonal().copy_(self.squares)  # exact: variances of near-constant inputs stay 0
        return LayerStats(
            gram=self.gram,
            total=self.total,
            count=self.count,
            sample=self._sample[: self._filled].T.contiguous(),
            abs_total=self.abs_total,
        )
