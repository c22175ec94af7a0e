"""``analyze_sublayer``'s pictures against explicit computations, and how it saves work.

The analysis computes covariances from the Gram matrix, reuses a selection-independent
``SublayerBasis`` and computes its diagnostics on first use. These tests recompute
every picture's data from an explicit input matrix ``X`` with numpy, check that reusing
a basis changes nothing, and that a view pays only for what it shows.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rcpu import analysis as layer
from rcpu.analysis import TOP_DIRECTIONS, analyze_sublayer, prepare_sublayer
from rcpu.compensate import METHODS
from rcpu.diagnostics import principal_directions
from rcpu.problem import KeptProblem, covariance_from_gram
from rcpu.stats import LayerStats

D_OUT, D_IN, N = 10, 24, 300


pytestmark = pytest.mark.usefixtures("one_thread")


def make_case(seed: int = 0):
    """W, calibration X (every token also in the sample), held-out X, as float64."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(D_OUT, D_IN, generator=g, dtype=torch.float64)
    scales = torch.rand(D_IN, 1, generator=g, dtype=torch.float64) * 2 + 0.1
    offsets = torch.randn(D_IN, 1, generator=g, dtype=torch.float64)
    mix = torch.eye(D_IN, dtype=torch.float64) + 0.4 * torch.randn(D_IN, D_IN, generator=g, dtype=torch.float64)
    x = mix @ (torch.randn(D_IN, N, generator=g, dtype=torch.float64) * scales) + offsets
    x_held = mix @ (torch.randn(D_IN, N // 2, generator=g, dtype=torch.float64) * scales) + offsets
    return w, x, x_held


def stats_of(x: torch.Tensor) -> LayerStats:
    return LayerStats.from_inputs(x, sample_size=x.shape[1])


def top_eigen(cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    evals, evecs = np.linalg.eigh(cov)
    return evals[::-1].clip(min=0), evecs[:, ::-1]


def angles_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.degrees(np.arccos(np.clip(np.linalg.svd(a.T @ b, compute_uv=False), -1, 1)))


def test_covariance_from_gram_is_the_sample_covariance():
    w, x, _ = make_case(1)
    kept = torch.tensor([0, 2, 3, 7, 8, 11, 15, 19, 23])
    new = torch.randn(D_OUT, len(kept), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    problem = KeptProblem(w, stats_of(x), kept)
    explicit = np.cov((new @ x[kept]).numpy(), bias=True)
    covariance = covariance_from_gram(new, problem.weight_gram(new), problem.mean_kept, problem.count)
    np.testing.assert_allclose(covariance.numpy(), explicit, rtol=1e-9, atol=1e-9)
    full = stats_of(x)
    np.testing.assert_allclose(covariance_from_gram(w, w @ full.gram, full.mean, full.count).numpy(),
                               np.cov((w @ x).numpy(), bias=True), rtol=1e-9, atol=1e-9)


def test_centred_target_is_w_times_centred_gram_columns():
    w, x, _ = make_case(3)
    kept = torch.tensor([1, 4, 5, 9, 20])
    centred = x - x.mean(dim=1, keepdim=True)
    explicit = w @ (centred @ centred.T)[:, kept]
    torch.testing.assert_close(KeptProblem(w, stats_of(x), kept).centred_target, explicit)


def test_principal_directions_are_eigenpairs_with_a_fixed_sign():
    g = torch.Generator().manual_seed(4)
    a = torch.randn(7, 30, generator=g, dtype=torch.float64)
    cov = a @ a.T / 30
    evals, evecs = principal_directions(cov)
    assert torch.all(evals[:-1] >= evals[1:])
    torch.testing.assert_close(cov @ evecs, evecs * evals)
    peaks = evecs.gather(0, evecs.abs().argmax(dim=0, keepdim=True))
    assert torch.all(peaks > 0)
    _, again = principal_directions(cov.clone() * (1 + 1e-15))  # rounding-level change: same signs
    torch.testing.assert_close(again, evecs)
    top_values, top_vectors = principal_directions(cov, 3)  # the subset solver: the same top pairs
    torch.testing.assert_close(top_values, evals[:3])
    torch.testing.assert_close(top_vectors, evecs[:, :3])


@pytest.mark.parametrize("score,ratio", [("rcpu", 0.25), ("wanda_sp", 0.5)])
def test_every_picture_equals_its_explicit_computation(score, ratio):
    w, x, x_held = make_case(5)
    analysis = analyze_sublayer(w, stats_of(x), stats_of(x_held), score=score, ratio=ratio,
                                methods=list(METHODS))
    kept = analysis.selection.kept
    y = (w @ x).numpy()
    x_sample = x_held.to(torch.float32).to(torch.float64)  # the held-out tokens, stored in float32, are the sample
    sample_y = (w @ x_sample).numpy()
    evals_y, evecs_y = top_eigen(np.cov(y, bias=True))
    top = evecs_y[:, :TOP_DIRECTIONS]
    np.testing.assert_allclose(analysis.explained_variance_y.numpy(), evals_y / evals_y.sum(), atol=1e-12)
    np.testing.assert_allclose(np.abs(analysis.projection_y.numpy()),
                               np.abs(top[:, :2].T @ (sample_y - sample_y.mean(axis=1, keepdims=True))),
                               rtol=1e-8, atol=1e-8)
    first, second = analysis.basis.pairs
    np.testing.assert_allclose(analysis.inner_products_y.numpy(),
                               np.sum(sample_y[:, first] * sample_y[:, second], axis=0), rtol=1e-10)
    results = {"uncompensated": analysis.uncompensated, **analysis.methods}
    for name, res in results.items():
        comp = res.compensation
        bias = np.zeros((D_OUT, 1)) if comp.bias is None else comp.bias.numpy()[:, None]
        yhat = comp.weight.numpy() @ x[kept].numpy() + bias
        evals, evecs = top_eigen(np.cov(yhat, bias=True))
        np.testing.assert_allclose(res.explained_variance.numpy(), evals / evals.sum(), atol=1e-12, err_msg=name)
        np.testing.assert_allclose(res.principal_angles_deg.numpy(), angles_deg(top, evecs[:, :TOP_DIRECTIONS]),
                                   atol=1e-5, err_msg=name)
        sample_yhat = comp.weight.numpy() @ x_sample[kept].numpy() + bias
        np.testing.assert_allclose(res.outputs.numpy(), sample_yhat, rtol=1e-10, atol=1e-10, err_msg=name)
        np.testing.assert_allclose(np.abs(res.projection.numpy()),
                                   np.abs(top[:, :2].T @ (sample_yhat - sample_y.mean(axis=1, keepdims=True))),
                                   rtol=1e-8, atol=1e-8, err_msg=name)
        np.testing.assert_allclose(res.inner_products.numpy(),
                                   np.sum(sample_yhat[:, first] * sample_yhat[:, second], axis=0), rtol=1e-10)
        gram = sample_y.T @ sample_y
        distortion = np.linalg.norm(sample_yhat.T @ sample_yhat - gram) / np.linalg.norm(gram)
        assert res.geometry["gram_distortion"] == pytest.approx(distortion, rel=1e-9), name
        for split, xs in (("calibration", x), ("heldout", x_held)):
            full = (w @ xs).numpy()
            fit = comp.weight.numpy() @ xs[kept].numpy() + bias
            explicit = np.linalg.norm(full - fit) / np.linalg.norm(full)
            assert getattr(res, f"error_{split}") == pytest.approx(explicit, rel=1e-8), (name, split)


def _fields(analysis) -> dict:
    analysis.complete()
    out = {"kept": analysis.selection.kept, "ev_y": analysis.explained_variance_y,
           "proj_y": analysis.projection_y, "ev_z": analysis.explained_variance_z,
           "angles_z": analysis.principal_angles_z_deg, "proj_z": analysis.projection_z}
    for name, res in analysis.methods.items():
        out.update({f"{name}.weight": res.compensation.weight, f"{name}.ev": res.explained_variance,
                    f"{name}.angles": res.principal_angles_deg, f"{name}.proj": res.projection,
                    f"{name}.inner": res.inner_products, f"{name}.cos": res.geometry["cosine_values"],
                    f"{name}.err": torch.tensor([res.error_calibration, res.error_heldout])})
    return out


def test_a_reused_basis_gives_the_same_analysis():
    w, x, x_held = make_case(6)
    calib, held = stats_of(x), stats_of(x_held)
    basis = prepare_sublayer(w, calib, held)
    analyze_sublayer(w, calib, held, score="wanda_sp", ratio=0.5, methods=["ls"], basis=basis)  # used before
    for score, ratio in (("rcpu", 0.2), ("fluctuation", 0.4)):
        kw = dict(score=score, ratio=ratio, methods=["none", "bias", "ls", "rotation_bias"])
        reused = _fields(analyze_sublayer(w, calib, held, basis=basis, **kw))
        fresh = _fields(analyze_sublayer(w, calib, held, **kw))
        assert reused.keys() == fresh.keys()
        for key in fresh:
            torch.testing.assert_close(reused[key], fresh[key], msg=key)


@pytest.mark.parametrize("pruned", [3, 20])
def test_kept_outputs_are_the_kept_columns_product(pruned):
    """``Z = W_K X_K`` on the sample, from ``Y - W_P X_P`` (few pruned) or directly (many)."""
    w, x, x_held = make_case(9)
    basis = prepare_sublayer(w, stats_of(x), stats_of(x_held))
    kept = torch.sort(torch.randperm(D_IN, generator=torch.Generator().manual_seed(1))[pruned:]).values
    direct = w[:, kept] @ basis.sample[kept]
    eps = torch.finfo(torch.float64).eps
    bound = 10 * D_IN * eps * float(torch.linalg.matrix_norm(w) * torch.linalg.matrix_norm(basis.sample))
    assert float(torch.linalg.matrix_norm(basis.kept_outputs(kept) - direct)) <= bound


def test_rotation_keeps_the_spectrum_of_the_pruned_outputs():
    w, x, x_held = make_case(8)
    analysis = analyze_sublayer(w, stats_of(x), stats_of(x_held), score="rcpu", ratio=0.3,
                                methods=["rotation", "rotation_scale", "rotation_bias", "rotation_diag"])
    z = analysis.explained_variance_z
    for name in ("rotation", "rotation_scale", "rotation_bias"):  # Yhat = s Q Z (+ b): the same spectrum
        torch.testing.assert_close(analysis.methods[name].explained_variance, z)
    assert not torch.allclose(analysis.methods["rotation_diag"].explained_variance, z)  # a per-row scale changes it


def test_diagnostics_are_computed_on_first_use_and_shared_where_identical(monkeypatch):
    w, x, x_held = make_case(7)
    calls = {"eigen": 0, "outputs": 0}
    real_eigen, real_outputs = layer.principal_directions, layer.compensated_outputs

    def eigen(*args):
        calls["eigen"] += 1
        return real_eigen(*args)

    def outputs(comp, inputs):
        calls["outputs"] += 1
        return real_outputs(comp, inputs)

    real_kept_outputs = layer.SublayerBasis.kept_outputs

    def kept_outputs(self, kept):  # Z from Y less the pruned columns' part: also a sample product
        calls["outputs"] += 1
        return real_kept_outputs(self, kept)

    monkeypatch.setattr(layer, "principal_directions", eigen)
    monkeypatch.setattr(layer, "compensated_outputs", outputs)
    monkeypatch.setattr(layer.SublayerBasis, "kept_outputs", kept_outputs)
    calib, held = stats_of(x), stats_of(x_held)
    basis = prepare_sublayer(w, calib, held)
    calls.update(eigen=0, outputs=0)
    analysis = analyze_sublayer(w, calib, held, score="rcpu", ratio=0.3, methods=["none", "bias", "ls", "rotation"],
                                basis=basis)
    assert all(np.isfinite(r.error_heldout) for r in analysis.methods.values())
    assert calls == {"eigen": 0, "outputs": 0}  # errors alone: no spectrum, no sample outputs
    for res in analysis.methods.values():
        res.explained_variance
    assert calls["eigen"] == 2  # Z (none, bias; rotation's is Q times Z's), ls
    for res in analysis.methods.values():
        res.geometry
    assert calls["outputs"] == 2  # Z (none, bias, rotation as Q Z) and ls
    for res in analysis.methods.values():
        res.inner_products, res.projection
    analysis.projection_z
    analysis.complete()
    assert calls == {"eigen": 2, "outputs": 2}
    bias = analysis.methods["bias"]
    torch.testing.assert_close(bias.outputs, analysis.uncompensated.outputs + bias.compensation.bias[:, None])


def test_lazy_diagnostics_are_safe_from_several_threads():
    """The app shares analyses between sessions, whose scripts run in their own threads."""
    from concurrent.futures import ThreadPoolExecutor

    w, x, x_held = make_case(9)
    calib, held = stats_of(x), stats_of(x_held)
    kw = dict(score="rcpu", ratio=0.3, methods=["none", "bias", "ls", "rotation"])
    shared = analyze_sublayer(w, calib, held, **kw)
    expected = _fields(analyze_sublayer(w, calib, held, **kw))
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: _fields(shared), range(16)))
    for got in results:
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], msg=key)
