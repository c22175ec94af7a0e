"""The method page's formulas, checked against explicit computations on small float64 data.

Every check recomputes the quantity independently from an explicit input matrix ``X``
(d_in x N) and weight ``W`` (numpy / plain torch), never from the library's own helpers.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.linalg import expm
from scipy.optimize import minimize_scalar

from rcpu.compensate import (
    METHODS,
    compensate,
    procrustes,
    ridge_lambda,
)
from rcpu.diagnostics import (
    gram_distortion,
    principal_angles,
    relative_error,
    rotation_diagnostics,
    token_geometry,
)
from rcpu.errors import RcpuError
from rcpu.scores import SCORES, score_columns
from rcpu.stats import LayerStats

D_OUT, D_IN, N = 12, 20, 200
ROTATIONS = ("rotation", "rotation_scale", "rotation_so", "rotation_bias", "rotation_diag")
NO_BIAS = ("none", "ls", "ridge", "rotation", "rotation_scale", "rotation_so", "rotation_diag")


def output_error(weight, stats, kept, new_weight, bias=None):
    """(``||Y - Yhat||_F^2``, ``||Y||_F^2``) through the library's error-from-Gram formula."""
    from rcpu.problem import KeptProblem

    return KeptProblem(weight, stats, kept).error(new_weight.to(torch.float64), bias)


pytestmark = pytest.mark.usefixtures("one_thread")


def make_data(seed: int = 0, d_out: int = D_OUT, d_in: int = D_IN, n: int = N):
    """W (d_out, d_in), X (d_in, N) with non-zero means and unequal scales, kept columns K."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    scales = torch.rand(d_in, generator=g, dtype=torch.float64) * 2 + 0.2
    offsets = torch.randn(d_in, generator=g, dtype=torch.float64)
    mix = torch.eye(d_in, dtype=torch.float64) + 0.3 * torch.randn(
        d_in, d_in, generator=g, dtype=torch.float64
    )
    x = (
        mix @ (torch.randn(d_in, n, generator=g, dtype=torch.float64) * scales[:, None])
        + offsets[:, None]
    )
    kept = torch.sort(torch.randperm(d_in, generator=g)[: (d_in * 7) // 10]).values
    return w, x, kept


def err2(y: torch.Tensor, yhat: torch.Tensor) -> float:
    return float(torch.sum((y - yhat) ** 2))


def outputs(w, x, kept, comp):
    y = w @ x
    yhat = comp.weight @ x[kept]
    if comp.bias is not None:
        yhat = yhat + comp.bias[:, None]
    return y, yhat


def random_orthogonal(d: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def random_skew(d: int, rng: np.random.Generator) -> np.ndarray:
    a = rng.standard_normal((d, d))
    return (a - a.T) / 2


@pytest.fixture
def data():
    w, x, kept = make_data(0)
    return w, x, kept, LayerStats.from_inputs(x)


# Orthogonality -------------------------------------------------------------------


@pytest.mark.parametrize("method", ROTATIONS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_q_is_orthogonal(method, seed):
    w, x, kept = make_data(seed)
    comp = compensate(method, w, LayerStats.from_inputs(x), kept)
    q = comp.rotation
    eye = torch.eye(D_OUT, dtype=torch.float64)
    assert q.shape == (D_OUT, D_OUT)
    assert torch.allclose(q.T @ q, eye, atol=1e-10, rtol=0)
    assert torch.allclose(q @ q.T, eye, atol=1e-10, rtol=0)
    assert abs(abs(float(torch.linalg.det(q))) - 1) < 1e-10
    assert rotation_diagnostics(comp)["orthogonality_error"] < 1e-10


@pytest.mark.parametrize("method", ["none", "bias", "ls", "ridge"])
def test_non_rotation_methods_have_no_q(data, method):
    w, _x, kept, stats = data
    comp = compensate(method, w, stats, kept)
    assert comp.rotation is None and comp.singular_values is None
    assert rotation_diagnostics(comp)["orthogonality_error"] is None


def test_rotation_weight_is_q_times_kept_weight(data):
    w, _x, kept, stats = data
    for method in ("rotation", "rotation_so", "rotation_bias"):
        comp = compensate(method, w, stats, kept)
        assert torch.allclose(comp.weight, comp.rotation @ w[:, kept], atol=1e-12)


def reflection_case():
    """Data where the best orthogonal map is a reflection: Y = H Z with H = diag(-1, 1, ...).

    Inputs are duplicated (X = [A; A]) so the pruned half can carry ``(H - I) W_K``.
    """
    g = torch.Generator().manual_seed(5)
    d_out, k, n = 6, 10, 200
    a = torch.randn(k, n, generator=g, dtype=torch.float64)
    x = torch.cat([a, a])
    w_kept = torch.randn(d_out, k, generator=g, dtype=torch.float64)
    h = torch.diag(torch.tensor([-1.0] + [1.0] * (d_out - 1), dtype=torch.float64))
    w = torch.cat([w_kept, (h - torch.eye(d_out, dtype=torch.float64)) @ w_kept], dim=1)
    kept = torch.arange(k)
    return w, x, kept, h


def test_rotation_so_flips_a_reflection():
    w, x, kept, h = reflection_case()
    stats = LayerStats.from_inputs(x)
    plain = compensate("rotation", w, stats, kept)
    proper = compensate("rotation_so", w, stats, kept)
    # The unconstrained optimum is exactly the reflection, det -1 ...
    assert float(torch.linalg.det(plain.rotation)) == pytest.approx(-1.0, abs=1e-10)
    assert torch.allclose(plain.rotation, h, atol=1e-8)
    # ... and rotation_so is a proper rotation that differs from it.
    q = proper.rotation
    assert float(torch.linalg.det(q)) == pytest.approx(1.0, abs=1e-10)
    assert torch.allclose(q.T @ q, torch.eye(q.shape[0], dtype=torch.float64), atol=1e-10)
    assert not torch.allclose(q, plain.rotation, atol=1e-3)
    # It is optimal among proper rotations: beats identity and random proper rotations.
    y, z = w @ x, w[:, kept] @ x[kept]
    best = err2(y, q @ z)
    assert best >= err2(y, plain.rotation @ z) - 1e-9
    rng = np.random.default_rng(0)
    for _ in range(200):
        r = random_orthogonal(q.shape[0], rng)
        if np.linalg.det(r) < 0:
            r[:, 0] = -r[:, 0]
        assert err2(y, torch.from_numpy(r) @ z) >= best - 1e-9
    for eps in (1e-4, 1e-2, 0.3):
        p = torch.from_numpy(q.numpy() @ expm(eps * random_skew(q.shape[0], rng)))
        assert err2(y, p @ z) >= best - 1e-9


def test_rotation_so_equals_rotation_when_det_positive():
    for seed in range(10):
        w, x, kept = make_data(seed)
        stats = LayerStats.from_inputs(x)
        plain = compensate("rotation", w, stats, kept)
        proper = compensate("rotation_so", w, stats, kept)
        if torch.linalg.det(plain.rotation) > 0:
            assert torch.allclose(plain.rotation, proper.rotation, atol=1e-12)
        else:
            assert float(torch.linalg.det(proper.rotation)) == pytest.approx(1.0, abs=1e-10)


def test_procrustes_proper_flag_on_explicit_matrix():
    rng = np.random.default_rng(3)
    for _ in range(20):
        m = torch.from_numpy(rng.standard_normal((7, 7)))
        q, s = procrustes(m)
        qp, _ = procrustes(m, proper=True)
        u, sv, vh = np.linalg.svd(m.numpy())
        assert np.allclose(q.numpy(), u @ vh, atol=1e-12)
        assert np.allclose(s.numpy(), sv, atol=1e-12) and np.all(np.diff(sv) <= 0)
        assert float(torch.linalg.det(qp)) == pytest.approx(1.0, abs=1e-10)
        # tr(Q^T M) of the proper solution: trace(S), less twice the smallest if flipped
        expected = sv.sum() if np.linalg.det(u @ vh) > 0 else sv.sum() - 2 * sv[-1]
        assert float(torch.trace(qp.T @ m)) == pytest.approx(expected, rel=1e-10)


# Rotation is the Procrustes optimum -------------------------------------------------


def test_rotation_beats_random_orthogonal_and_perturbations(data):
    w, x, kept, stats = data
    comp = compensate("rotation", w, stats, kept)
    q = comp.rotation.numpy()
    y, z = (w @ x).numpy(), (w[:, kept] @ x[kept]).numpy()

    def error(r):
        return float(np.linalg.norm(y - r @ z))

    best = error(q)
    assert best < error(np.eye(D_OUT))
    rng = np.random.default_rng(0)
    for _ in range(200):
        assert error(random_orthogonal(D_OUT, rng)) > best
    for eps in (1e-5, 1e-3, 1e-1, 1.0):
        for _ in range(10):
            assert error(q @ expm(eps * random_skew(D_OUT, rng))) >= best * (1 - 1e-12)


def test_rotation_matches_explicit_procrustes(data):
    w, x, kept, stats = data
    comp = compensate("rotation", w, stats, kept)
    y, z = (w @ x).numpy(), (w[:, kept] @ x[kept]).numpy()
    u, s, vh = np.linalg.svd(y @ z.T)
    assert np.allclose(comp.rotation.numpy(), u @ vh, atol=1e-10)
    assert np.allclose(comp.singular_values.numpy(), s, rtol=1e-10)


def test_rotation_preserves_token_gram(data):
    w, x, kept, stats = data
    z = w[:, kept] @ x[kept]
    for method in ("rotation", "rotation_so", "rotation_bias"):
        comp = compensate(method, w, stats, kept)
        rz = comp.weight @ x[kept]
        assert torch.allclose(rz.T @ rz, z.T @ z, rtol=1e-10, atol=1e-9)
        assert gram_distortion(z, rz) < 1e-12
    # A non-orthogonal method does not.
    ls = compensate("ls", w, stats, kept).weight @ x[kept]
    assert not torch.allclose(ls.T @ ls, z.T @ z, rtol=1e-3)


# Least squares and ridge --------------------------------------------------------------


def test_ls_equals_numpy_lstsq(data):
    w, x, kept, stats = data
    comp = compensate("ls", w, stats, kept)
    y, xk = (w @ x).numpy(), x[kept].numpy()
    sol, *_ = np.linalg.lstsq(xk.T, y.T, rcond=None)
    assert np.allclose(comp.weight.numpy(), sol.T, rtol=1e-8, atol=1e-10)
    assert comp.bias is None


def test_ls_is_optimal_under_perturbation(data):
    w, x, kept, stats = data
    comp = compensate("ls", w, stats, kept)
    y = w @ x
    best = err2(y, comp.weight @ x[kept])
    g = torch.Generator().manual_seed(1)
    for eps in (1e-6, 1e-3, 1e-1):
        for _ in range(20):
            delta = torch.randn(comp.weight.shape, generator=g, dtype=torch.float64) * eps
            assert err2(y, (comp.weight + delta) @ x[kept]) > best


def test_ls_is_least_norm_on_singular_gram():
    """A dependent input dimension makes G[K,K] singular; Cholesky often still "succeeds" on
    it by rounding. The result must nevertheless be the least-norm solution (numpy lstsq)."""
    spurious = 0
    for seed in range(60):
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(6, 12, generator=g, dtype=torch.float64)
        x = torch.randn(12, 40, generator=g, dtype=torch.float64)
        x[7] = 0.3 * x[2] - 1.7 * x[4]
        stats = LayerStats.from_inputs(x)
        kept = torch.arange(10)
        spurious += int(torch.linalg.cholesky_ex(stats.gram[kept][:, kept]).info) == 0
        comp = compensate("ls", w, stats, kept)
        sol, *_ = np.linalg.lstsq(x[kept].numpy().T, (w @ x).numpy().T, rcond=None)
        assert np.allclose(comp.weight.numpy(), sol.T, rtol=1e-6, atol=1e-8), seed
    assert spurious >= 5  # the case really exercises a Cholesky that does not fail


@pytest.mark.parametrize("method", ["ls", "ridge", "ls_ridge"])
def test_fit_gram_is_the_product_with_the_fits_gram(method):
    """The solved fits carry ``W'_K G[K,K]`` from their normal equations: the same matrix as the
    product, to the solve's rounding (relative to ``||W'_K|| ||G[K,K]||``, which bounds both)."""
    from rcpu.compensate import compensate_problem
    from rcpu.problem import KeptProblem

    w, x, kept = make_data(seed=3)
    problem = KeptProblem(w, LayerStats.from_inputs(x), kept)
    comp = compensate_problem(method, problem, alpha=0.05, lam=3.0)
    direct = comp.weight @ problem.gram_kk
    scale = float(torch.linalg.matrix_norm(comp.weight, 2) * torch.linalg.matrix_norm(problem.gram_kk, 2))
    cond = float(torch.linalg.cond(problem.gram_kk))
    eps = torch.finfo(torch.float64).eps
    assert comp.fit_gram is not None
    assert float(torch.linalg.matrix_norm(comp.fit_gram - direct)) <= 10 * D_IN * eps * scale
    assert cond > 10  # not a trivially conditioned case


def test_least_norm_fit_has_no_fit_gram():
    """On a singular ``G[K,K]`` the least-norm solution does not satisfy the normal equations with
    the target as given, so no product may be taken from them."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(6, 12, generator=g, dtype=torch.float64)
    x = torch.randn(12, 40, generator=g, dtype=torch.float64)
    x[7] = 0.0  # a dead input: G[K,K] singular, Cholesky fails outright
    comp = compensate("ls", w, LayerStats.from_inputs(x), torch.arange(10))
    assert comp.fit_gram is None


def test_all_finite_is_the_element_wise_check():
    from rcpu.stats import all_finite

    big = torch.full((4,), 1e308, dtype=torch.float64)  # finite entries whose sum overflows
    assert all_finite(big) and not torch.isfinite(big.sum())
    for bad in (math.inf, -math.inf, math.nan):
        t = torch.ones(5, dtype=torch.float64)
        t[2] = bad
        assert not all_finite(t)
    t = torch.tensor([math.inf, -math.inf])  # inf - inf sums to NaN
    assert not all_finite(t)
    assert all_finite(torch.zeros(0))


def test_ls_beats_every_method_without_bias_on_calibration(data):
    w, _x, kept, stats = data
    ls = relative_error(w, stats, kept, compensate("ls", w, stats, kept).weight)
    for method in NO_BIAS:
        comp = compensate(method, w, stats, kept)
        assert ls <= relative_error(w, stats, kept, comp.weight) + 1e-12


@pytest.mark.parametrize("alpha", [1e-3, 0.01, 0.5, 5.0])
def test_ridge_closed_form(data, alpha):
    w, x, kept, stats = data
    comp = compensate("ridge", w, stats, kept, alpha=alpha)
    xk, y = x[kept].numpy(), (w @ x).numpy()
    gkk = xk @ xk.T
    lam = alpha * np.trace(gkk) / len(kept)
    assert ridge_lambda(stats.gram[kept][:, kept], alpha) == pytest.approx(lam, rel=1e-12)
    expected = np.linalg.solve(gkk + lam * np.eye(len(kept)), xk @ y.T).T
    assert np.allclose(comp.weight.numpy(), expected, rtol=1e-9, atol=1e-11)


def test_ridge_calibration_error_grows_with_alpha(data):
    w, _x, kept, stats = data
    errors = [relative_error(w, stats, kept, compensate("ls", w, stats, kept).weight)]
    for alpha in (1e-4, 1e-2, 0.1, 1.0, 10.0):
        errors.append(
            relative_error(w, stats, kept, compensate("ridge", w, stats, kept, alpha).weight)
        )
    assert all(a <= b + 1e-12 for a, b in itertools.pairwise(errors))
    assert errors[0] < errors[-1]
    # tiny alpha is (nearly) least squares
    tiny = compensate("ridge", w, stats, kept, alpha=1e-12).weight
    assert torch.allclose(tiny, compensate("ls", w, stats, kept).weight, rtol=1e-6, atol=1e-8)


# Error from the Gram matrix ---------------------------------------------------------


@pytest.mark.parametrize("method", list(METHODS))
def test_error_from_gram_equals_explicit(data, method):
    w, x, kept, stats = data
    comp = compensate(method, w, stats, kept)
    y, yhat = outputs(w, x, kept, comp)
    err, ref = output_error(w, stats, kept, comp.weight, comp.bias)
    assert ref == pytest.approx(float(torch.sum(y**2)), rel=1e-12)
    assert err == pytest.approx(err2(y, yhat), rel=1e-8, abs=1e-10 * ref)
    assert relative_error(w, stats, kept, comp.weight, comp.bias) == pytest.approx(
        math.sqrt(err2(y, yhat) / float(torch.sum(y**2))), rel=1e-7, abs=1e-9
    )


def test_error_formula_with_arbitrary_weight_and_bias(data):
    """The formula holds for any W' and b, not only the methods' own outputs."""
    w, x, kept, stats = data
    g = torch.Generator().manual_seed(7)
    for _ in range(5):
        new = torch.randn(D_OUT, len(kept), generator=g, dtype=torch.float64)
        bias = torch.randn(D_OUT, generator=g, dtype=torch.float64) * 3
        y = w @ x
        for b in (None, bias):
            yhat = new @ x[kept] + (0 if b is None else b[:, None])
            err, _ = output_error(w, stats, kept, new, b)
            assert err == pytest.approx(err2(y, yhat), rel=1e-9)


def test_error_on_heldout_stats_uses_those_tokens():
    w, x, kept = make_data(0)
    _, x2, _ = make_data(1)
    calib, held = LayerStats.from_inputs(x), LayerStats.from_inputs(x2)
    comp = compensate("ls", w, calib, kept)
    err, _ = output_error(w, held, kept, comp.weight)
    assert err == pytest.approx(err2(w @ x2, comp.weight @ x2[kept]), rel=1e-9)


# Scores ------------------------------------------------------------------------------


def naive_scores(w: np.ndarray, x: np.ndarray) -> dict[str, np.ndarray]:
    d_in = w.shape[1]
    out = {k: np.zeros(d_in) for k in ("magnitude", "wanda_sp", "fluctuation", "rcpu", "rcpu_rms")}
    for j in range(d_in):
        wn = math.sqrt(sum(float(v) ** 2 for v in w[:, j]))
        xn = math.sqrt(sum(float(v) ** 2 for v in x[j]))
        mean_abs = sum(abs(float(v)) for v in x[j]) / len(x[j])  # the authors' E|x_j|
        var = float(np.var(x[j]))  # population variance (ddof=0), as the authors compute it
        out["magnitude"][j] = wn
        out["wanda_sp"][j] = wn * xn
        out["fluctuation"][j] = var * wn**2
        out["rcpu"][j] = wn * mean_abs * var  # the authors' released score
        out["rcpu_rms"][j] = wn * xn * var
    return out


@pytest.mark.parametrize("name", ["magnitude", "wanda_sp", "fluctuation", "rcpu", "rcpu_rms"])
def test_scores_equal_naive_definitions(data, name):
    w, x, _kept, stats = data
    expected = naive_scores(w.numpy(), x.numpy())[name]
    got = score_columns(name, w, stats).numpy()
    assert got.shape == (D_IN,)
    assert np.allclose(got, expected, rtol=1e-9, atol=0)


def test_scores_accept_float32_weights(data):
    w, x, _kept, stats = data
    got = score_columns("rcpu", w.to(torch.float32), stats)
    assert got.dtype == torch.float64
    assert np.allclose(
        got.numpy(), naive_scores(w.float().double().numpy(), x.numpy())["rcpu"], rtol=1e-9
    )


def test_random_score_is_seeded(data):
    w, _x, _kept, stats = data
    a = score_columns("random", w, stats, seed=3)
    b = score_columns("random", w * 5 + 1, stats, seed=3)
    c = score_columns("random", w, stats, seed=4)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.shape == (D_IN,) and bool(((a >= 0) & (a < 1)).all())
    assert len(set(a.tolist())) == D_IN


def test_unknown_score_raises(data):
    w, _x, _kept, stats = data
    with pytest.raises(RcpuError, match="unknown score"):
        score_columns("nope", w, stats)
    assert set(SCORES) == {"magnitude", "wanda_sp", "fluctuation", "rcpu", "rcpu_rms", "random"}


def test_variance_is_population_variance(data):
    _w, x, _kept, stats = data
    assert np.allclose(stats.var.numpy(), np.var(x.numpy(), axis=1), rtol=1e-10)
    assert np.allclose(stats.mean.numpy(), x.numpy().mean(axis=1), rtol=1e-12)


# Scaled and biased rotations ----------------------------------------------------------


def test_rotation_scale_is_closed_form_optimum(data):
    w, x, kept, stats = data
    rot = compensate("rotation", w, stats, kept)
    comp = compensate("rotation_scale", w, stats, kept)
    assert torch.allclose(comp.rotation, rot.rotation, atol=1e-12)
    y = (w @ x).numpy()
    qz = (rot.rotation @ w[:, kept] @ x[kept]).numpy()
    # recover s from the returned weight: W' = s Q W_K
    s = float(torch.sum(comp.weight * rot.weight) / torch.sum(rot.weight**2))
    assert torch.allclose(comp.weight, s * rot.weight, atol=1e-12)
    numeric = minimize_scalar(
        lambda t: float(np.sum((y - t * qz) ** 2)), bracket=(0.0, 2.0), tol=1e-12
    ).x
    assert s == pytest.approx(numeric, rel=1e-6)
    # derivative of ||Y - s QZ||^2 in s is zero at the optimum
    assert float(np.sum((y - s * qz) * qz)) == pytest.approx(0.0, abs=1e-9 * float(np.sum(y * y)))
    assert err2(torch.from_numpy(y), torch.from_numpy(s * qz)) <= err2(
        torch.from_numpy(y), torch.from_numpy(qz)
    )


def test_bias_restores_the_mean(data):
    w, x, kept, stats = data
    comp = compensate("bias", w, stats, kept)
    pruned = torch.tensor([j for j in range(D_IN) if j not in set(kept.tolist())])
    assert torch.allclose(comp.bias, w[:, pruned] @ x[pruned].mean(dim=1), atol=1e-12)
    assert torch.allclose(comp.weight, w[:, kept])
    y, yhat = outputs(w, x, kept, comp)
    assert torch.allclose(yhat.mean(dim=1), y.mean(dim=1), atol=1e-10)
    # the mean shift is the best constant: error below none and no better constant nearby
    none = err2(y, w[:, kept] @ x[kept])
    assert err2(y, yhat) < none
    g = torch.Generator().manual_seed(2)
    for _ in range(10):
        delta = torch.randn(D_OUT, generator=g, dtype=torch.float64) * 0.01
        assert err2(y, yhat + delta[:, None]) > err2(y, yhat)


def test_rotation_bias(data):
    w, x, kept, stats = data
    comp = compensate("rotation_bias", w, stats, kept)
    mu = x.mean(dim=1)
    q = comp.rotation
    assert torch.allclose(comp.bias, w @ mu - q @ w[:, kept] @ mu[kept], atol=1e-10)
    y, yhat = outputs(w, x, kept, comp)
    assert torch.allclose(yhat.mean(dim=1), y.mean(dim=1), atol=1e-10)
    # Q is the Procrustes solution of the centred outputs
    xc = (x - mu[:, None]).numpy()
    yc, zc = w.numpy() @ xc, w[:, kept].numpy() @ xc[kept.numpy()]
    u, _, vh = np.linalg.svd(yc @ zc.T)
    assert np.allclose(q.numpy(), u @ vh, atol=1e-9)
    # and beats random orthogonal maps on centred data
    best = float(np.sum((yc - q.numpy() @ zc) ** 2))
    rng = np.random.default_rng(1)
    for _ in range(100):
        assert float(np.sum((yc - random_orthogonal(D_OUT, rng) @ zc) ** 2)) > best
    # rotation+bias is at least as good as FLAP's bias alone
    bias_only = compensate("bias", w, stats, kept)
    assert err2(y, yhat) <= err2(*outputs(w, x, kept, bias_only)) + 1e-9


def test_rotation_diag_per_row_scale_is_optimal(data):
    w, x, kept, stats = data
    rot = compensate("rotation", w, stats, kept)
    comp = compensate("rotation_diag", w, stats, kept)
    y = w @ x
    r = rot.rotation @ w[:, kept] @ x[kept]
    scales = torch.sum(comp.weight * rot.weight, dim=1) / torch.sum(rot.weight**2, dim=1)
    assert torch.allclose(comp.weight, scales[:, None] * rot.weight, atol=1e-12)
    for i in range(D_OUT):
        yi, ri = y[i].numpy(), r[i].numpy()
        numeric = minimize_scalar(
            lambda t, yi=yi, ri=ri: float(np.sum((yi - t * ri) ** 2)), bracket=(0.0, 2.0), tol=1e-12
        ).x
        assert float(scales[i]) == pytest.approx(numeric, rel=1e-6)
        assert float(np.dot(yi - float(scales[i]) * ri, ri)) == pytest.approx(
            0.0, abs=1e-9 * float(yi @ yi)
        )
    assert err2(y, comp.weight @ x[kept]) <= err2(y, r) + 1e-9


def test_calibration_error_ordering(data):
    """Each richer family contains the poorer one, so its calibration error is no larger."""
    w, _x, kept, stats = data
    e = {
        m: relative_error(w, stats, kept, c.weight, c.bias)
        for m in METHODS
        for c in [compensate(m, w, stats, kept)]
    }
    tol = 1e-12
    assert e["rotation"] <= e["none"] + tol
    assert e["rotation_so"] <= e["none"] + tol
    assert e["rotation"] <= e["rotation_so"] + tol
    assert e["rotation_scale"] <= e["rotation"] + tol
    assert e["rotation_diag"] <= e["rotation"] + tol
    assert e["bias"] <= e["none"] + tol
    assert e["rotation_bias"] <= e["bias"] + tol
    assert e["ls"] <= e["ridge"] + tol
    assert e["ls"] <= min(e[m] for m in NO_BIAS) + tol
    assert e["none"] > 0.05  # the case is not trivial


def test_unknown_method_raises(data):
    w, _x, kept, stats = data
    with pytest.raises(RcpuError, match="unknown method"):
        compensate("magic", w, stats, kept)


# Diagnostics ---------------------------------------------------------------------------


def test_token_geometry_against_explicit():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(5, 40, generator=g, dtype=torch.float64)
    yhat = y * 0.5 + 0.1 * torch.randn(5, 40, generator=g, dtype=torch.float64)
    geo = token_geometry(y, yhat)
    ratio = np.linalg.norm(yhat.numpy(), axis=0) / np.linalg.norm(y.numpy(), axis=0)
    cos = np.sum(y.numpy() * yhat.numpy(), axis=0) / (
        np.linalg.norm(y.numpy(), axis=0) * np.linalg.norm(yhat.numpy(), axis=0)
    )
    assert np.allclose(geo["norm_ratio_values"].numpy(), ratio)
    assert np.allclose(geo["cosine_values"].numpy(), cos)
    assert geo["norm_ratio"]["mean"] == pytest.approx(ratio.mean())
    assert geo["cosine"]["p05"] == pytest.approx(np.quantile(cos, 0.05))
    assert geo["cosine"]["p95"] == pytest.approx(np.quantile(cos, 0.95))
    gy, gh = y.T @ y, yhat.T @ yhat
    assert geo["gram_distortion"] == pytest.approx(
        float(torch.linalg.norm(gh - gy) / torch.linalg.norm(gy))
    )
    same = token_geometry(y, y)
    assert same["gram_distortion"] == 0.0 and same["cosine"]["mean"] == pytest.approx(1.0)


def test_principal_angles():
    eye = torch.eye(4, dtype=torch.float64)
    assert torch.allclose(
        principal_angles(eye[:, :2], eye[:, :2]), torch.zeros(2, dtype=torch.float64), atol=1e-6
    )
    assert torch.allclose(
        principal_angles(eye[:, :2], eye[:, 2:]), torch.full((2,), 90.0, dtype=torch.float64)
    )
    t = math.radians(30)
    b = torch.tensor([[math.cos(t)], [math.sin(t)], [0.0], [0.0]], dtype=torch.float64)
    assert float(principal_angles(eye[:, :1], b)[0]) == pytest.approx(30.0)


def test_rotation_diagnostics_angles_of_known_rotation():
    from rcpu.compensate import Compensation

    t = math.radians(40)
    q = torch.eye(3, dtype=torch.float64)
    q[:2, :2] = torch.tensor(
        [[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]], dtype=torch.float64
    )
    comp = Compensation(
        weight=q, rotation=q, singular_values=torch.tensor([3.0, 2.0, 0.5], dtype=torch.float64)
    )
    d = rotation_diagnostics(comp)
    assert d["orthogonality_error"] < 1e-14
    assert d["distance_from_identity"] == pytest.approx(
        float(torch.linalg.norm(q - torch.eye(3, dtype=torch.float64)))
    )
    assert sorted(d["rotation_angles_deg"].tolist(), reverse=True) == pytest.approx(
        [40.0, 40.0, 0.0], abs=1e-9
    )
    assert d["condition_number_M"] == pytest.approx(6.0)


def test_rotation_angles_match_the_eigenvalues_of_q():
    """The fast symmetric-part formula gives the angles of Q's complex eigenvalues."""
    from rcpu.compensate import Compensation
    from rcpu.diagnostics import rotation_diagnostics

    gen = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(9, 9, generator=gen, dtype=torch.float64))
    got = rotation_diagnostics(Compensation(weight=q, rotation=q, singular_values=torch.ones(9)))
    eigenvalues = torch.linalg.eigvals(q)
    expected = torch.sort(torch.rad2deg(torch.angle(eigenvalues).abs()), descending=True).values
    angles = got["rotation_angles_deg"]
    # Compare what is well conditioned. The cosines (eigenvalues of Q's symmetric part, real
    # parts of Q's eigenvalues) move by about eps * ||Q|| under rounding.
    eps = torch.finfo(torch.float64).eps
    cosines = torch.sort(torch.cos(torch.deg2rad(angles))).values
    torch.testing.assert_close(cosines, torch.sort(eigenvalues.real).values, rtol=0, atol=100 * 9 * eps)
    # An angle is acos(cosine): its error is the cosine's divided by sin(angle), unbounded at
    # 0 and 180 degrees (an odd-sized Q always has an eigenvalue +-1), so compare angles only
    # away from there, with the tolerance that division gives.
    sines = torch.sin(torch.deg2rad(expected))
    away = sines > 0.1
    assert away.sum() >= 6  # this Q has three pairs of complex eigenvalues well away from +-1
    tolerance = torch.rad2deg(torch.tensor(2 * 100 * 9 * eps)) / sines[away]
    assert torch.all((angles[away] - expected[away]).abs() <= tolerance)


@pytest.mark.parametrize("pruned", [3, 12])
def test_kept_norm_and_output_gram_by_either_route_are_the_token_sums(pruned):
    """``||Z||^2`` and ``Z Z^T`` (``Z = W_K X_K``): from ``Y``'s less the pruned columns' part (few pruned)
    or directly (many), each equal to the sums over the tokens to rounding relative to ``||Y||^2``."""
    from rcpu.problem import KeptProblem

    w, x, _ = make_data(seed=6)
    kept = torch.sort(torch.randperm(D_IN, generator=torch.Generator().manual_seed(2))[pruned:]).values
    problem = KeptProblem(w, LayerStats.from_inputs(x), kept)
    assert (problem.pruned is not None) == (pruned * 2 < D_IN - pruned)
    y, z = w @ x, w[:, kept] @ x[kept]
    scale = float((y**2).sum())  # both routes round relative to ||Y||^2 at most
    eps = torch.finfo(torch.float64).eps
    assert abs(problem.kept_own - float((z**2).sum())) <= 100 * D_IN * eps * scale
    assert float(torch.linalg.matrix_norm(problem.kept_output_gram - z @ z.T)) <= 100 * D_IN * eps * scale
    # and the uncompensated error built on ||Z||^2 is the error measured on the tokens
    err = output_error(w, LayerStats.from_inputs(x), kept, problem.w_kept)[0]
    assert abs(err - err2(y, z)) <= 100 * D_IN * eps * scale
