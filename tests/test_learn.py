"""The Learn page's toy example: the fits are the library's and behave as the page says."""

from __future__ import annotations

import pytest
import torch

from rcpu.errors import RcpuError
from rcpu.learn import ToyConfig, build_example, toy_inputs


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("removed", [0, 1, 2])
def test_rotation_is_orthogonal_and_keeps_norms(dims, removed):
    ex = build_example(ToyConfig(dims=dims, removed=removed))
    q = ex.rotation
    torch.testing.assert_close(q.T @ q, torch.eye(dims, dtype=q.dtype), atol=1e-10, rtol=0)
    assert ex.kept.tolist() == [j for j in range(dims + 1) if j != removed]
    # A rotation cannot change lengths: norms of the rotation fit equal those of the pruned outputs.
    assert ex.norm_ratio["rotation"] == pytest.approx(ex.norm_ratio["pruned"], rel=1e-9)
    torch.testing.assert_close(ex.outputs["rotation"], q @ ex.outputs["pruned"])
    assert ex.outputs["original"].shape == (dims, ex.config.calib_points)


def test_fits_order_on_calibration_points():
    ex = build_example(ToyConfig())
    calib = {name: e["calibration"] for name, e in ex.errors.items()}
    # Least squares is optimal on calibration points; the rotation can only improve on pruning.
    assert calib["least squares"] <= calib["rotation"] + 1e-12
    assert calib["rotation"] <= calib["pruned"] + 1e-12
    # The rotation never makes the angle to the original outputs worse on average here.
    assert ex.angle_deg["rotation"] <= ex.angle_deg["pruned"] + 1e-9


def test_few_points_least_squares_overfits_more_than_rotation():
    gaps = {"least squares": [], "rotation": []}
    for seed in range(8):
        ex = build_example(ToyConfig(calib_points=3, seed=seed))
        for name, values in gaps.items():
            values.append(ex.errors[name]["heldout"] - ex.errors[name]["calibration"])
    mean = {name: sum(v) / len(v) for name, v in gaps.items()}
    assert mean["least squares"] > mean["rotation"]


def test_example_is_deterministic_and_seeded():
    a, b = build_example(ToyConfig(seed=3)), build_example(ToyConfig(seed=3))
    torch.testing.assert_close(a.inputs, b.inputs)
    assert a.errors == b.errors
    assert not torch.equal(a.inputs, build_example(ToyConfig(seed=4)).inputs)


def test_inputs_have_the_requested_correlation():
    cfg = ToyConfig(correlation=0.8)
    x = toy_inputs(cfg, 20000, seed=0)
    corr = torch.corrcoef(x)
    assert corr[0, 1] == pytest.approx(0.8, abs=0.03)


def test_scores_for_the_step_by_step_section():
    ex = build_example(ToyConfig())
    assert set(ex.scores) == {"magnitude", "wanda_sp", "rcpu"}
    assert all(s.shape == (3,) for s in ex.scores.values())


@pytest.mark.parametrize(
    "cfg", [ToyConfig(dims=4), ToyConfig(removed=3), ToyConfig(correlation=1.0), ToyConfig(calib_points=1)]
)
def test_bad_settings_are_readable_errors(cfg):
    with pytest.raises(RcpuError):
        build_example(cfg)
