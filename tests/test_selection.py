"""Unit selection: whole heads, round-half-up counts, GQA bookkeeping, user errors."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

import pytest
import torch

from rcpu.errors import RcpuError
from rcpu.scores import (
    check_ratio,
    num_pruned,
    score_columns,
    select,
    select_units,
    unit_scores,
    units_to_columns,
)
from rcpu.stats import LayerStats
from rcpu.surgery import kv_head_of


def half_up(ratio: float, n: int) -> int:
    """Round-half-up of ratio * n, with the ratio taken as the decimal the user wrote."""
    return int((Decimal(str(ratio)) * n).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def head_case(heads: int = 9, head_dim: int = 8, d_out: int = 16, n: int = 300, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    d_in = heads * head_dim
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    x = torch.randn(d_in, n, generator=g, dtype=torch.float64) * (
        torch.rand(d_in, 1, generator=g) + 0.1
    )
    return w, LayerStats.from_inputs(x)


# Counts -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, ratio, expected",
    [
        (10, 0.25, 3),
        (10, 0.24, 2),
        (10, 0.0, 0),
        (9, 0.2, 2),
        (9, 0.15, 1),
        (9, 0.5, 5),
        (1536, 0.2, 307),
        (50, 0.29, 15),
        (25, 0.58, 15),
        (90, 0.35, 32),
        (4, 0.125, 1),
    ],
)
def test_num_pruned_rounds_half_up(n, ratio, expected):
    assert num_pruned(n, ratio) == expected == half_up(ratio, n)


def test_num_pruned_matches_decimal_half_up_on_a_grid():
    for n in (1, 2, 3, 7, 9, 10, 25, 50, 64, 100, 128, 333, 1536):
        for r in range(0, 1000, 5):
            ratio = r / 1000
            assert num_pruned(n, ratio) == half_up(ratio, n), (n, ratio)


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, float("nan"), float("inf"), -1e-12])
def test_ratio_outside_range_raises(ratio):
    with pytest.raises(RcpuError, match="ratio must be in"):
        check_ratio(ratio)
    with pytest.raises(RcpuError):
        select_units(torch.arange(10, dtype=torch.float64), ratio)


def test_ratio_removing_all_units_raises():
    scores = torch.arange(3, dtype=torch.float64)
    # 0.9 * 3 = 2.7 -> 3 of 3
    with pytest.raises(RcpuError, match="would remove all 3 heads"):
        select_units(scores, 0.9, what="heads")
    with pytest.raises(RcpuError, match="remove all"):
        select_units(torch.ones(1, dtype=torch.float64), 0.5)
    kept, pruned = select_units(scores, 0.8)  # 2.4 -> 2 of 3
    assert kept.tolist() == [2] and pruned.tolist() == [0, 1]


# Which units ----------------------------------------------------------------------------


def test_select_units_prunes_lowest_and_partitions():
    g = torch.Generator().manual_seed(0)
    for n in (5, 9, 64, 333):
        scores = torch.rand(n, generator=g, dtype=torch.float64)
        for ratio in (0.0, 0.1, 0.2, 0.5, 0.75):
            kept, pruned = select_units(scores, ratio)
            assert len(pruned) == half_up(ratio, n)
            assert torch.equal(kept, torch.sort(kept).values)
            assert torch.equal(pruned, torch.sort(pruned).values)
            assert set(kept.tolist()).isdisjoint(pruned.tolist())
            assert sorted(kept.tolist() + pruned.tolist()) == list(range(n))
            if len(pruned):
                assert scores[pruned].max() <= scores[kept].min()
            # the pruned set is exactly the lowest-scoring ones
            assert set(pruned.tolist()) == set(torch.argsort(scores)[: len(pruned)].tolist())


def test_ties_break_by_index():
    kept, pruned = select_units(torch.zeros(6, dtype=torch.float64), 0.5)
    assert pruned.tolist() == [0, 1, 2] and kept.tolist() == [3, 4, 5]
    kept, pruned = select_units(torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0], dtype=torch.float64), 0.6)
    assert pruned.tolist() == [0, 1, 3]


def test_units_to_columns():
    assert units_to_columns(torch.tensor([0, 2]), 3).tolist() == [0, 1, 2, 6, 7, 8]
    assert units_to_columns(torch.tensor([4, 1]), 1).tolist() == [4, 1]
    assert units_to_columns(torch.tensor([], dtype=torch.long), 4).numel() == 0


def test_unit_scores_sum_columns():
    cols = torch.arange(12, dtype=torch.float64)
    assert unit_scores(cols, 4).tolist() == [6.0, 22.0, 38.0]
    with pytest.raises(ValueError):
        unit_scores(cols, 5)


@pytest.mark.parametrize("score", ["magnitude", "wanda_sp", "fluctuation", "rcpu", "rcpu_rms", "random"])
@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.34, 0.5, 0.8])
def test_head_selection_never_splits_a_head(score, ratio):
    heads, head_dim = 9, 8
    w, stats = head_case(heads, head_dim)
    sel = select(w, stats, score, ratio, unit_size=head_dim, what="heads")
    d_in = heads * head_dim
    assert len(sel.pruned_units) == half_up(ratio, heads)
    assert len(sel.pruned) == head_dim * len(sel.pruned_units)
    assert sorted(sel.kept.tolist() + sel.pruned.tolist()) == list(range(d_in))
    assert set(sel.kept.tolist()).isdisjoint(sel.pruned.tolist())
    # every pruned column's head is entirely pruned: whole head_dim blocks
    pruned_heads = {c // head_dim for c in sel.pruned.tolist()}
    assert pruned_heads == set(sel.pruned_units.tolist())
    for h in pruned_heads:
        assert set(range(h * head_dim, (h + 1) * head_dim)) <= set(sel.pruned.tolist())
    for h in sel.kept_units.tolist():
        assert set(range(h * head_dim, (h + 1) * head_dim)) <= set(sel.kept.tolist())
    # head score is the sum of its columns, and the lowest heads went
    cols = score_columns(score, w, stats)
    assert torch.allclose(sel.unit_scores, cols.reshape(heads, head_dim).sum(dim=1))
    if len(sel.pruned_units):
        assert sel.unit_scores[sel.pruned_units].max() <= sel.unit_scores[sel.kept_units].min()


def test_select_channels_unit_size_one():
    w, stats = head_case(heads=10, head_dim=4)
    sel = select(w, stats, "wanda_sp", 0.25, unit_size=1)
    assert len(sel.pruned) == 10 and torch.equal(sel.pruned, sel.pruned_units)
    cols = score_columns("wanda_sp", w, stats)
    assert set(sel.pruned.tolist()) == set(torch.argsort(cols)[:10].tolist())


def test_select_all_units_raises_with_unit_name():
    w, stats = head_case(heads=3, head_dim=4)
    with pytest.raises(RcpuError, match="heads"):
        select(w, stats, "rcpu", 0.9, unit_size=4, what="heads")


def test_select_unknown_score_raises():
    w, stats = head_case()
    with pytest.raises(RcpuError, match="unknown score 'bogus'"):
        select(w, stats, "bogus", 0.2, unit_size=8)


# GQA ------------------------------------------------------------------------------------


def kv_heads_kept(kept_heads, heads: int, kv_heads: int) -> torch.Tensor:
    """KV heads that still serve at least one kept query head, by the surgery's own rule."""
    return torch.unique(kv_head_of(kept_heads, heads // kv_heads))


def test_kv_heads_kept_gqa():
    heads, kv = 9, 3
    everything = torch.arange(heads)

    def kept_after_pruning(pruned):
        kept = torch.tensor([h for h in range(heads) if h not in pruned])
        return kv_heads_kept(kept, heads, kv).tolist()

    assert kv_heads_kept(everything, heads, kv).tolist() == [0, 1, 2]
    assert kept_after_pruning({0, 1, 2}) == [1, 2]  # the whole first group is gone
    assert kept_after_pruning({0, 1}) == [0, 1, 2]  # head 2 still uses KV head 0
    assert kept_after_pruning({3, 4, 5}) == [0, 2]
    assert kept_after_pruning({2, 5, 8}) == [0, 1, 2]
    assert kept_after_pruning({0, 1, 2, 6, 7, 8}) == [1]


def test_kv_heads_kept_mha_and_mqa():
    kept = torch.tensor([0, 2, 3])
    assert kv_heads_kept(kept, 4, 4).tolist() == [0, 2, 3]  # MHA: one KV head per query head
    assert kv_heads_kept(kept, 4, 1).tolist() == [0]  # MQA: one shared KV head
