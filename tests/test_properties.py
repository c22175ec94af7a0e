"""Property tests over shapes, ratios and degenerate statistics.

Cases include rank-deficient Grams (fewer tokens than dimensions), zero-variance input
dimensions, fully zero columns (zero weight column and zero input row) and all-zero
inputs. Every method must give finite weights or raise RcpuError, never a silent NaN.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rcpu.analysis import analyze_sublayer
from rcpu.compensate import METHODS, compensate
from rcpu.diagnostics import relative_error
from rcpu.errors import RcpuError
from rcpu.problem import KeptProblem
from rcpu.reports import method_summary as summary
from rcpu.scores import SCORES, score_columns, select, select_units
from rcpu.stats import LayerStats

PROPS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ROTATIONS = ("rotation", "rotation_scale", "rotation_so", "rotation_bias", "rotation_diag")
NO_BIAS = ("none", "ls", "ridge", "rotation", "rotation_scale", "rotation_so", "rotation_diag")


pytestmark = pytest.mark.usefixtures("one_thread")


@st.composite
def cases(draw):
    """(W, X, unit_size, ratio) with optional degeneracies."""
    unit_size = draw(st.sampled_from([1, 1, 2, 4]))
    n_units = draw(st.integers(2, 12))
    d_in = unit_size * n_units
    d_out = draw(st.integers(1, 10))
    n = draw(st.sampled_from([1, 2, 3, d_in // 2 + 1, d_in, d_in + 5, 60]))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((d_out, d_in)) * draw(st.sampled_from([1e-3, 1.0, 30.0]))
    scales = rng.uniform(0.1, 3.0, d_in) * draw(st.sampled_from([1e-3, 1.0, 100.0]))
    x = rng.standard_normal((d_in, n)) * scales[:, None] + rng.standard_normal(d_in)[:, None]
    if draw(st.booleans()):  # zero-variance dimensions: constant rows
        rows = rng.choice(d_in, size=draw(st.integers(1, d_in)), replace=False)
        x[rows] = rng.standard_normal(len(rows))[:, None]
    if draw(st.booleans()):  # a fully zero column: zero weight column and zero input row
        j = int(rng.integers(d_in))
        w[:, j] = 0.0
        x[j] = 0.0
    if draw(st.booleans()):  # duplicated input dimension: singular Gram even with many tokens
        a, b = rng.choice(d_in, size=2, replace=False)
        x[b] = x[a]
    if draw(st.integers(0, 9)) == 0:  # all inputs zero
        x[:] = 0.0
    ratio = draw(st.floats(0.0, 0.95, allow_nan=False))
    if (
        int((Decimal(repr(ratio)) * n_units).quantize(Decimal(1), rounding=ROUND_HALF_UP))
        >= n_units
    ):
        ratio = 0.5 / n_units  # keep at least one unit (the "all removed" error is tested apart)
    return torch.from_numpy(w), torch.from_numpy(x), unit_size, ratio


def explicit_error(w, x, kept, comp) -> float:
    yhat = comp.weight @ x[kept]
    if comp.bias is not None:
        yhat = yhat + comp.bias[:, None]
    return float(torch.sum((w @ x - yhat) ** 2))


@PROPS
@given(cases(), st.sampled_from(sorted(SCORES)))
def test_scores_and_selection(case, score):
    w, x, unit_size, ratio = case
    stats = LayerStats.from_inputs(x)
    cols = score_columns(score, w, stats)
    assert cols.shape == (w.shape[1],) and cols.dtype == torch.float64
    assert bool(torch.isfinite(cols).all()) and bool((cols >= 0).all())
    norms = torch.linalg.vector_norm(w, dim=0)
    if score != "random":
        # a zero weight column scores exactly zero
        assert bool((cols[norms == 0] == 0).all())
    if score in ("fluctuation", "rcpu", "rcpu_rms"):
        constant = x.amax(dim=1) == x.amin(dim=1)
        scale = float(cols.max()) if cols.numel() else 0.0
        assert bool((cols[constant] <= 1e-9 * max(scale, 1e-300) + 1e-12).all())

    sel = select(w, stats, score, ratio, unit_size=unit_size)
    d_in, n_units = w.shape[1], w.shape[1] // unit_size
    assert sorted(sel.kept.tolist() + sel.pruned.tolist()) == list(range(d_in))
    assert set(sel.kept.tolist()).isdisjoint(sel.pruned.tolist())
    assert len(sel.kept_units) >= 1
    assert len(sel.pruned_units) == int(
        (Decimal(repr(ratio)) * n_units).quantize(Decimal(1), rounding=ROUND_HALF_UP)
    )
    assert {c // unit_size for c in sel.pruned.tolist()} == set(sel.pruned_units.tolist())
    assert len(sel.pruned) == unit_size * len(sel.pruned_units)


@PROPS
@given(
    st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=1, max_size=40),
    st.floats(0.0, 0.99),
)
def test_select_units_partition_any_scores(values, ratio):
    scores = torch.tensor(values, dtype=torch.float64)
    scores = torch.nan_to_num(scores, nan=0.0)  # as score_columns delivers them
    try:
        kept, pruned = select_units(scores, ratio)
    except RcpuError as exc:
        assert "remove all" in str(exc)
        return
    assert sorted(kept.tolist() + pruned.tolist()) == list(range(len(values)))
    assert len(kept) >= 1
    if len(pruned):
        assert scores[pruned].max() <= scores[kept].min()


@PROPS
@given(cases(), st.sampled_from(sorted(SCORES)))
def test_every_method_finite_orthogonal_and_consistent(case, score):
    w, x, unit_size, ratio = case
    stats = LayerStats.from_inputs(x)
    kept = select(w, stats, score, ratio, unit_size=unit_size).kept
    ref = float(torch.sum((w @ x) ** 2))
    tol = 1e-8 * ref + 1e-12
    errors = {}
    for method in METHODS:
        try:
            comp = compensate(method, w, stats, kept)
        except RcpuError:
            continue  # a clear refusal is allowed; a NaN is not
        assert comp.weight.shape == (w.shape[0], len(kept))
        assert bool(torch.isfinite(comp.weight).all())
        if comp.bias is not None:
            assert comp.bias.shape == (w.shape[0],) and bool(torch.isfinite(comp.bias).all())
        if method in ROTATIONS:
            q = comp.rotation
            eye = torch.eye(q.shape[0], dtype=torch.float64)
            assert bool(torch.isfinite(q).all())
            assert float(torch.linalg.matrix_norm(q.T @ q - eye)) < 1e-10
            if method == "rotation_so":
                assert float(torch.linalg.det(q)) > 0
        err, reference = KeptProblem(w, stats, kept).error(comp.weight, comp.bias)
        explicit = explicit_error(w, x, kept, comp)
        assert reference == pytest.approx(ref, rel=1e-10, abs=1e-300)
        assert abs(err - explicit) <= 1e-7 * (ref + explicit) + 1e-12, (method, err, explicit)
        rel = relative_error(w, stats, kept, comp.weight, comp.bias)
        assert np.isfinite(rel) and rel >= 0
        errors[method] = explicit
        if method == "ls":
            # least squares on singular statistics is the least-norm solution, not an arbitrary one
            sol, *_ = np.linalg.lstsq(x[kept].numpy().T, (w @ x).numpy().T, rcond=None)
            assert (
                float(torch.linalg.matrix_norm(comp.weight)) <= 1.001 * np.linalg.norm(sol) + 1e-9
            )
    # the methods that need no special care always succeed
    assert {"none", "bias", "rotation", "rotation_so"} <= set(errors)
    # orderings that follow from one family containing another
    e = errors
    if "rotation" in e:
        assert e["rotation"] <= e["none"] + tol
        assert e.get("rotation_scale", 0) <= e["rotation"] + tol
        assert e.get("rotation_diag", 0) <= e["rotation"] + tol
    assert e["rotation_so"] <= e["none"] + tol
    assert e["bias"] <= e["none"] + tol
    if "rotation_bias" in e:
        assert e["rotation_bias"] <= e["bias"] + tol
    if "ls" in e:
        for m in NO_BIAS:
            if m in e:
                assert e["ls"] <= e[m] + tol, (m, e["ls"], e[m])


@PROPS
@given(cases())
def test_analyze_sublayer_has_no_nan(case):
    w, x, unit_size, ratio = case
    stats = LayerStats.from_inputs(x)
    analysis = analyze_sublayer(
        w, stats, stats, score="rcpu", ratio=ratio, methods=list(METHODS), unit_size=unit_size
    )
    for method in METHODS:
        s = summary(analysis, method)
        for key in ("error", "error_uncompensated"):
            for split in ("calibration", "heldout"):
                assert np.isfinite(s[key][split]) and s[key][split] >= 0
        assert np.isfinite(s["gram_distortion"])
        assert all(np.isfinite(a) for a in s["principal_angles_deg"])
        if method in ROTATIONS:
            assert s["orthogonality_error"] < 1e-10
        else:
            assert s["orthogonality_error"] is None
        assert s["d_in"] == w.shape[1] and len(s["kept"]) + len(s["pruned"]) == w.shape[1]


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("where", ["gram", "total", "weight"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs_raise_rcpu_error(method, where, bad):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 8, generator=g, dtype=torch.float64)
    stats = LayerStats.from_inputs(torch.randn(8, 30, generator=g, dtype=torch.float64))
    gram, total = stats.gram.clone(), stats.total.clone()
    if where == "gram":
        gram[1, 1] = bad
    elif where == "total":
        total[2] = bad
    else:
        w[0, 3] = bad
    broken = LayerStats(gram, total, stats.count, stats.sample)
    with pytest.raises(RcpuError, match="non-finite"):
        compensate(method, w, broken, torch.arange(5))


def test_single_kept_column_and_single_output():
    x = torch.linspace(-1, 2, 7, dtype=torch.float64).reshape(1, 7).repeat(3, 1)
    x[1] *= 2
    w = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64)
    stats = LayerStats.from_inputs(x)
    for method in METHODS:
        comp = compensate(method, w, stats, torch.tensor([0]))
        assert comp.weight.shape == (1, 1) and bool(torch.isfinite(comp.weight).all())
        if comp.rotation is not None:
            assert abs(abs(float(comp.rotation)) - 1) < 1e-12
