"""Streaming statistics: batching, reservoir sample, non-finite rows, derived quantities."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rcpu.stats import LayerStats, StatsAccumulator


def tokens(n: int = 500, d: int = 7, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * 3 + torch.arange(d, dtype=torch.float32)


def accumulate(
    rows: torch.Tensor, splits: list[int], sample_size: int = 16, seed: int = 0, exact: bool = False
) -> LayerStats:
    acc = StatsAccumulator(rows.shape[1], sample_size=sample_size, seed=seed, float32_from=math.inf if exact else 0)
    start = 0
    for size in splits:
        acc.add(rows[start : start + size])
        start += size
    assert start == len(rows)
    return acc.finish()


def reference_reservoir(rows: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    """Algorithm R token by token: the draw for token t (t >= size) replaces slot floor(u (t+1))."""
    gen = torch.Generator().manual_seed(seed)
    draws = torch.rand(max(len(rows) - size, 0), generator=gen, dtype=torch.float64).tolist()
    sample: list[torch.Tensor] = []
    for t, row in enumerate(rows):
        if t < size:
            sample.append(row)
        else:
            slot = int(draws[t - size] * (t + 1))
            if slot < size:
                sample[slot] = row
    return torch.stack(sample).T if sample else torch.zeros(rows.shape[1], 0)


SPLITS = [[500], [1] * 500, [100, 0, 400], [7, 93, 250, 150], [16, 1, 483], [499, 1]]


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("splits", SPLITS)
def test_batched_equals_one_shot(splits, exact):
    """Float64 products (``exact``) agree to float64 rounding; float32 products per batch (the default
    for float32 inputs of real size) to float32 rounding of each product, with an exact diagonal."""
    rows = tokens()
    one = accumulate(rows, [len(rows)], exact=exact)
    many = accumulate(rows, splits, exact=exact)
    x = rows.to(torch.float64)
    reference = x.T @ x
    scale = torch.sqrt(torch.outer(reference.diagonal(), reference.diagonal()))  # Cauchy-Schwarz bound
    tol = 1e-12 if exact else 1e-6
    assert bool(((one.gram - reference).abs() <= tol * scale + 1e-9).all())
    assert bool(((many.gram - one.gram).abs() <= 2 * tol * scale + 1e-9).all())
    assert torch.allclose(many.gram.diagonal(), reference.diagonal(), rtol=1e-12)
    assert torch.allclose(many.total, x.sum(dim=0), rtol=1e-12, atol=1e-9)
    assert many.count == one.count == len(rows)
    assert many.gram.dtype == many.total.dtype == torch.float64
    assert torch.equal(many.sample, one.sample)


def test_batches_of_any_leading_shape():
    rows = tokens(120, 5)
    acc = StatsAccumulator(5, sample_size=8)
    acc.add(rows.reshape(4, 30, 5))  # (batch, seq, d) as hooks see it
    stats = acc.finish()
    assert stats.count == 120
    assert torch.allclose(stats.gram, rows.double().T @ rows.double(), rtol=1e-6)


@pytest.mark.parametrize("d", [5, 513, 1100])
def test_triangular_batch_gram(d):
    """The blockwise product (blocks on and above the diagonal, mirrored) is X^T X."""
    from rcpu.stats import batch_gram

    x = torch.randn(300, d, generator=torch.Generator().manual_seed(d), dtype=torch.float64)
    assert torch.allclose(batch_gram(x), x.T @ x, rtol=1e-12, atol=1e-10)
    assert torch.allclose(batch_gram(x, block=64), x.T @ x, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("size, seed", [(1, 0), (3, 1), (16, 2), (64, 3), (600, 4)])
def test_reservoir_matches_algorithm_r(size, seed):
    rows = tokens(500)
    stats = accumulate(rows, [3, 197, 300], sample_size=size, seed=seed)
    expected = reference_reservoir(rows, size, seed)
    assert stats.sample.shape == (rows.shape[1], min(size, len(rows)))
    assert torch.equal(stats.sample, expected)


def test_reservoir_independent_of_split_and_seeded():
    rows = tokens(800)
    samples = [
        accumulate(rows, splits, sample_size=32, seed=5).sample
        for splits in ([800], [1] * 800, [31, 1, 768], [400, 400])
    ]
    for s in samples[1:]:
        assert torch.equal(s, samples[0])
    again = accumulate(rows, [800], sample_size=32, seed=5).sample
    other = accumulate(rows, [800], sample_size=32, seed=6).sample
    assert torch.equal(again, samples[0])
    assert not torch.equal(other, samples[0])


def test_reservoir_sample_rows_are_real_distinct_tokens():
    rows = tokens(400)
    sample = accumulate(rows, [400], sample_size=50, seed=1).sample.T
    as_list = [tuple(r.tolist()) for r in rows]
    picked = [as_list.index(tuple(r.tolist())) for r in sample]
    assert len(set(picked)) == 50  # no token twice
    assert max(picked) >= 50  # later tokens did replace early ones


def test_reservoir_is_roughly_uniform():
    """Each token lands in the sample with probability size / N."""
    n, size, trials = 60, 10, 400
    rows = torch.arange(n, dtype=torch.float32)[:, None]
    hits = np.zeros(n)
    for seed in range(trials):
        sample = accumulate(rows, [n], sample_size=size, seed=seed).sample
        hits[sample[0].long().numpy()] += 1
    freq = hits / trials
    assert abs(freq[:size].mean() - size / n) < 0.05
    assert abs(freq[-size:].mean() - size / n) < 0.05


def test_fewer_tokens_than_sample_size():
    rows = tokens(5)
    stats = accumulate(rows, [2, 3], sample_size=100)
    assert torch.equal(stats.sample, rows.T)


def test_nonfinite_rows_skipped_and_counted():
    rows = tokens(50).clone()
    rows[3, 1] = float("nan")
    rows[10, 0] = float("inf")
    rows[40, 6] = -float("inf")
    acc = StatsAccumulator(rows.shape[1], sample_size=100)
    acc.add(rows[:20])
    acc.add(rows[20:])
    stats = acc.finish()
    good = torch.tensor([i not in (3, 10, 40) for i in range(50)])
    clean = rows[good].double()
    assert acc.nonfinite_tokens == 3
    assert stats.count == 47
    assert torch.isfinite(stats.gram).all() and torch.isfinite(stats.total).all()
    assert torch.allclose(stats.gram, clean.T @ clean, rtol=1e-12)
    assert torch.allclose(stats.total, clean.sum(dim=0), rtol=1e-12)
    assert torch.isfinite(stats.sample).all() and stats.sample.shape[1] == 47


def test_all_nonfinite_batch():
    acc = StatsAccumulator(3, sample_size=4)
    acc.add(torch.full((5, 3), float("nan")))
    stats = acc.finish()
    assert acc.nonfinite_tokens == 5 and stats.count == 0
    assert torch.equal(stats.gram, torch.zeros(3, 3, dtype=torch.float64))
    assert torch.equal(stats.mean, torch.zeros(3, dtype=torch.float64))


def test_mean_and_var():
    rows = tokens(300, 6, seed=3)
    stats = LayerStats.from_inputs(rows.T)
    x = rows.double().numpy()
    assert np.allclose(stats.mean.numpy(), x.mean(axis=0), rtol=1e-12)
    assert np.allclose(stats.var.numpy(), x.var(axis=0), rtol=1e-9)
    assert stats.d_in == 6


def test_var_of_constant_dimension_is_zero_not_negative():
    x = torch.ones(4, 100, dtype=torch.float64) * torch.tensor(
        [[0.1], [1e3], [-7.3], [0.0]], dtype=torch.float64
    )
    stats = LayerStats.from_inputs(x)
    assert bool((stats.var >= 0).all())
    assert torch.allclose(stats.var, torch.zeros(4, dtype=torch.float64), atol=1e-9)


def test_arrays_round_trip():
    stats = LayerStats.from_inputs(tokens(100, 4).T, sample_size=10, seed=2)
    back = LayerStats.from_arrays(stats.to_arrays())
    assert torch.equal(back.gram, stats.gram)
    assert torch.equal(back.total, stats.total)
    assert back.count == stats.count == 100 and isinstance(back.count, int)
    assert torch.equal(back.sample, stats.sample)
    assert back.sample.dtype == torch.float32 and back.gram.dtype == torch.float64
