"""RCPU as its authors released it: their score's statistics, LS + ridge toward W_K, truncated unit
counts, and the canonical (closest to the identity) rotation when M is rank-deficient."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rcpu.compensate import compensate, numerical_rank, procrustes
from rcpu.scores import num_pruned, select
from rcpu.stats import LayerStats, StatsAccumulator

pytestmark = pytest.mark.usefixtures("one_thread")


def problem(seed: int = 0, d_out: int = 12, d_in: int = 20, n: int = 300, keep: int = 8):
    """W (d_out, d_in), X (d_in, n) with means and correlations, kept columns; ``keep < d_out``
    makes M = W G[:, K] W_K^T rank-deficient, as on ``o_proj`` once a head goes."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    mix = torch.eye(d_in, dtype=torch.float64) + 0.3 * torch.randn(d_in, d_in, generator=g, dtype=torch.float64)
    x = mix @ torch.randn(d_in, n, generator=g, dtype=torch.float64) + torch.randn(d_in, 1, generator=g,
                                                                                   dtype=torch.float64)
    kept = torch.sort(torch.randperm(d_in, generator=g)[:keep]).values
    return w, x, kept


# Statistics and the score ---------------------------------------------------------------------


def test_abs_sum_streams_like_the_other_sums():
    x = torch.randn(300, 7, dtype=torch.float64) - 0.5
    acc = StatsAccumulator(7, sample_size=0)
    for part in torch.split(x, 41):
        acc.add(part)
    stats = acc.finish()
    np.testing.assert_allclose(stats.abs_total.numpy(), np.abs(x.numpy()).sum(axis=0), rtol=1e-13)
    np.testing.assert_allclose(stats.mean_abs.numpy(), np.abs(x.numpy()).mean(axis=0), rtol=1e-13)
    again = LayerStats.from_arrays(stats.to_arrays())
    assert torch.equal(again.abs_total, stats.abs_total)


def test_the_two_rcpu_scores_can_keep_different_units():
    """E|x| and sqrt(mean x^2) rank dimensions differently when a dimension has rare large values."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 400, generator=g, dtype=torch.float64)
    x[0] = 0.0
    x[0, 0] = 36.0  # one spike in 400 tokens: E|x| 0.09 (others ~0.8), RMS 1.8 (others ~1)
    stats = LayerStats.from_inputs(x)
    w = torch.ones(3, 6, dtype=torch.float64)
    kept = select(w, stats, "rcpu", 1 / 6).kept.tolist()
    kept_rms = select(w, stats, "rcpu_rms", 1 / 6).kept.tolist()
    assert 0 not in kept and 0 in kept_rms


# ls_ridge --------------------------------------------------------------------------------------


@pytest.mark.parametrize("lam", [1e-5, 1e-4, 1.0, 1e3, 1e5])
def test_ls_ridge_is_the_explicit_solve_toward_the_kept_weights(lam):
    w, x, kept = problem(keep=14)
    comp = compensate("ls_ridge", w, LayerStats.from_inputs(x), kept, lam=lam)
    xk, y, wk = x[kept].numpy(), (w @ x).numpy(), w[:, kept].numpy()
    # B = (Y X_K^T + lambda W_K)(X_K X_K^T + lambda I)^-1, lambda absolute on the summed Gram
    expected = np.linalg.solve(xk @ xk.T + lam * np.eye(len(kept)), (y @ xk.T + lam * wk).T).T
    np.testing.assert_allclose(comp.weight.numpy(), expected, rtol=1e-8, atol=1e-10)


def test_ls_ridge_runs_from_ls_to_the_kept_weights():
    w, x, kept = problem(keep=14)
    stats = LayerStats.from_inputs(x)
    ls = compensate("ls", w, stats, kept).weight
    assert torch.allclose(compensate("ls_ridge", w, stats, kept, lam=1e-9).weight, ls, atol=1e-8)
    far = compensate("ls_ridge", w, stats, kept, lam=1e12).weight
    assert torch.allclose(far, w[:, kept], atol=1e-6)  # shrunk to W_K, not to zero


# Unit counts -----------------------------------------------------------------------------------


def test_truncation_is_the_authors_int_of_ratio_times_units():
    for units in (9, 32, 1536, 11008):
        for ratio in (0.1, 0.2, 0.25, 0.29, 0.3, 0.5):
            assert num_pruned(units, ratio, "truncate") == int(ratio * units)
    assert (num_pruned(9, 0.2, "nearest"), num_pruned(9, 0.2, "truncate")) == (2, 1)
    assert num_pruned(32, 0.2, "truncate") == 6 and num_pruned(11008, 0.2, "truncate") == 2201


# The canonical rotation -------------------------------------------------------------------------


def _cross(w, x, kept):
    return (w @ x) @ (w[:, kept] @ x[kept]).T  # M = Y Z^T


def test_every_optimal_q_is_at_least_as_far_from_the_identity():
    w, x, kept = problem(keep=8)  # M of rank 8 in 12 dimensions
    m = _cross(w, x, kept)
    q, s = procrustes(m)
    assert numerical_rank(s) == 8
    eye = torch.eye(12, dtype=torch.float64)
    assert torch.allclose(q.T @ q, eye, atol=1e-12)
    objective = float(torch.trace(q.T @ m))
    u, _, vh = torch.linalg.svd(m)
    rng = np.random.default_rng(0)
    for _ in range(100):  # every other optimum: U_r V_r^T + U_perp R V_perp^T
        r, _ = np.linalg.qr(rng.standard_normal((4, 4)))
        other = u[:, :8] @ vh[:8] + u[:, 8:] @ torch.from_numpy(r) @ vh[8:]
        assert float(torch.trace(other.T @ m)) == pytest.approx(objective, rel=1e-12)
        assert torch.linalg.matrix_norm(other - eye) >= torch.linalg.matrix_norm(q - eye) - 1e-12


def test_the_rotation_does_not_move_with_rounding_level_changes():
    """A relative 1e-13 change of the inputs (another BLAS, another thread count) leaves Q, its
    angles and held-out errors where they were, although the null spaces' bases move freely."""
    w, x, kept = problem(keep=8, n=10)  # fewer tokens than outputs, too
    calib, held = LayerStats.from_inputs(x), LayerStats.from_inputs(problem(seed=5, keep=8)[1])
    base = compensate("rotation", w, calib, kept)
    g = torch.Generator().manual_seed(9)
    nudged = LayerStats.from_inputs(x * (1 + 1e-13 * torch.randn(x.shape, generator=g, dtype=torch.float64)))
    other = compensate("rotation", w, nudged, kept)
    assert base.rank == other.rank == 8
    torch.testing.assert_close(other.rotation, base.rotation, rtol=0, atol=1e-9)
    from rcpu.diagnostics import relative_error, rotation_angles_deg

    torch.testing.assert_close(rotation_angles_deg(other.rotation), rotation_angles_deg(base.rotation),
                               rtol=0, atol=1e-5)  # degrees; angles near 0 are acos-conditioned
    assert relative_error(w, held, kept, other.weight) == pytest.approx(
        relative_error(w, held, kept, base.weight), rel=1e-9)


def test_rotation_so_is_free_when_m_is_rank_deficient():
    """A reflection is moved into the unconstrained part: det +1 at no cost to the fit."""
    for seed in range(20):
        w, x, kept = problem(seed=seed, keep=8)
        m = _cross(w, x, kept)
        q, _ = procrustes(m)
        proper, _ = procrustes(m, proper=True)
        assert float(torch.linalg.det(proper)) == pytest.approx(1.0, abs=1e-9)
        assert float(torch.trace(proper.T @ m)) == pytest.approx(float(torch.trace(q.T @ m)), rel=1e-12)
        if torch.linalg.det(q) > 0:
            torch.testing.assert_close(proper, q, rtol=0, atol=1e-12)


def test_full_rank_rotation_is_the_classic_procrustes():
    w, x, kept = problem(keep=18)
    m = _cross(w, x, kept)
    q, s = procrustes(m)
    u, _, vh = np.linalg.svd(m.numpy())
    assert numerical_rank(s) == 12
    np.testing.assert_allclose(q.numpy(), u @ vh, atol=1e-10)


@pytest.mark.slow
def test_o_proj_rotation_is_the_same_q_on_one_and_two_threads(embedded, tmp_cache):
    """On a real o_proj (M of rank 448 of 576 once a head goes), Q itself, not only Q W_K, is the
    same whatever the BLAS thread count, and no other optimal Q is closer to the identity."""
    from rcpu.calibration import layer_stats
    from rcpu.config import DataConfig
    from rcpu.problem import KeptProblem

    data = DataConfig(calib_samples=4, seq_len=128, heldout_samples=1)
    stats = layer_stats(embedded, data.data, data.sampling, 15).calibration["o_proj"]
    weight = embedded.adapter.sublayer(15, "o_proj").weight
    kept = select(weight, stats, "rcpu", 0.2, unit_size=embedded.adapter.head_dim).kept
    results = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        results[threads] = compensate("rotation", weight, stats, kept)
    one, two = results[1], results[2]
    assert one.rank == two.rank == len(kept) < weight.shape[0]
    torch.testing.assert_close(one.rotation, two.rotation, rtol=0, atol=1e-8)
    m = KeptProblem(weight, stats, kept).target @ weight.double()[:, kept].T
    u, _, vh = torch.linalg.svd(m)
    r, eye = one.rank, torch.eye(m.shape[0], dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        rot, _ = torch.linalg.qr(torch.randn(m.shape[0] - r, m.shape[0] - r, generator=gen, dtype=torch.float64))
        other = u[:, :r] @ vh[:r] + u[:, r:] @ rot @ vh[r:]
        assert torch.linalg.matrix_norm(other - eye) >= torch.linalg.matrix_norm(one.rotation - eye)
