"""A toy example of the method for the Learn page, small enough to see.

A linear map ``y = W x`` from ``dims + 1`` inputs to ``dims`` outputs (2-D or
3-D), correlated seeded inputs, one input dimension removed. The fits use the
library's own statistics and compensation functions (``LayerStats``,
``compensate``), so what the page shows is the method itself, not a copy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .compensate import Compensation, compensate
from .diagnostics import relative_error, rotation_angles_deg, sample_outputs, token_geometry
from .errors import RcpuError
from .scores import score_columns
from .stats import LayerStats

# Per-input standard deviations and means (input j is column j of W).
_STD = (1.6, 1.0, 0.7, 1.2)
_MEAN = (0.4, -0.3, 0.2, 0.1)
_W2 = ((1.0, 0.35, 0.8), (0.25, 1.0, -0.7))  # (2, 3): readable arrows in the plane


@dataclass(frozen=True)
class ToyConfig:
    dims: int = 2  # output dimensions (2 or 3); there is one more input dimension
    removed: int = 2  # index of the input dimension removed
    correlation: float = 0.6  # correlation between every pair of inputs
    calib_points: int = 30
    heldout_points: int = 300
    seed: int = 0

    def check(self) -> None:
        if self.dims not in (2, 3):
            raise RcpuError(f"the toy example is 2-D or 3-D, got {self.dims}")
        if not 0 <= self.removed <= self.dims:
            raise RcpuError(f"input dimension {self.removed} does not exist (0..{self.dims})")
        if not -0.45 < self.correlation < 0.99:
            raise RcpuError(f"correlation must be in (-0.45, 0.99), got {self.correlation}")
        if self.calib_points < 2 or self.heldout_points < 2:
            raise RcpuError("the toy example needs at least 2 calibration and 2 held-out points")


@dataclass
class ToyExample:
    config: ToyConfig
    weight: Tensor  # (dims, dims + 1) W
    removed: int
    kept: Tensor  # kept input indices
    inputs: Tensor  # (dims + 1, calib_points) calibration X
    heldout_inputs: Tensor  # (dims + 1, heldout_points)
    outputs: dict[str, Tensor]  # original / pruned / least squares / rotation on calibration X
    kept_weights: dict[str, Tensor]  # pruned / least squares / rotation: W'_K (dims, dims)
    errors: dict[str, dict]  # name -> {"calibration", "heldout"}
    norm_ratio: dict[str, float]  # mean ||yhat|| / ||y|| over calibration points
    angle_deg: dict[str, float]  # mean angle between yhat and y, degrees
    rotation: Tensor  # Q
    rotation_angle_deg: float  # how far Q turns (2-D: signed angle; 3-D: angle about its axis)
    reflection: bool  # det Q < 0
    scores: dict[str, Tensor] = field(default_factory=dict)  # per-input scores (magnitude, wanda_sp, rcpu)


def _weight(dims: int, seed: int) -> Tensor:
    if dims == 2:
        return torch.tensor(_W2, dtype=torch.float64)
    gen = torch.Generator().manual_seed(1000 + seed)
    w = torch.randn(dims, dims + 1, generator=gen, dtype=torch.float64)
    return w / torch.linalg.vector_norm(w, dim=0, keepdim=True)


def toy_inputs(cfg: ToyConfig, count: int, seed: int) -> Tensor:
    """Correlated Gaussian inputs (dims + 1, count): equal correlation between every pair."""
    d_in = cfg.dims + 1
    corr = torch.full((d_in, d_in), cfg.correlation, dtype=torch.float64)
    corr.fill_diagonal_(1.0)
    std = torch.tensor(_STD[:d_in], dtype=torch.float64)
    cov = corr * torch.outer(std, std)
    chol = torch.linalg.cholesky(cov)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(d_in, count, generator=gen, dtype=torch.float64)
    return chol @ noise + torch.tensor(_MEAN[:d_in], dtype=torch.float64)[:, None]


def _angle_of(q: Tensor) -> float:
    """How far ``Q`` turns (of its proper part, ``-Q`` for a reflection); signed in 2-D."""
    proper = q if torch.linalg.det(q) > 0 else -q
    angle = float(rotation_angles_deg(proper)[0])
    return math.copysign(angle, float(proper[1, 0])) if q.shape[0] == 2 else angle


def build_example(cfg: ToyConfig = ToyConfig()) -> ToyExample:
    """The toy layer, its inputs, and the pruned, least-squares and rotation fits."""
    cfg.check()
    weight = _weight(cfg.dims, cfg.seed)
    x = toy_inputs(cfg, cfg.calib_points, cfg.seed)
    x_held = toy_inputs(cfg, cfg.heldout_points, cfg.seed + 7919)
    calib = LayerStats.from_inputs(x, sample_size=cfg.calib_points, seed=cfg.seed)
    held = LayerStats.from_inputs(x_held, sample_size=2, seed=cfg.seed)
    kept = torch.tensor([j for j in range(cfg.dims + 1) if j != cfg.removed])

    fits: dict[str, Compensation] = {
        "pruned": compensate("none", weight, calib, kept),
        "least squares": compensate("ls", weight, calib, kept),
        "rotation": compensate("rotation", weight, calib, kept),
    }
    outputs: dict[str, Tensor] = {}
    errors, norm_ratio, angle = {}, {}, {}
    for name, comp in fits.items():
        y, _, yhat = sample_outputs(weight, x, kept, comp)
        outputs.setdefault("original", y)
        outputs[name] = yhat
        errors[name] = {
            "calibration": relative_error(weight, calib, kept, comp.weight, comp.bias),
            "heldout": relative_error(weight, held, kept, comp.weight, comp.bias),
        }
        geo = token_geometry(y, yhat)
        norm_ratio[name] = geo["norm_ratio"]["mean"]
        angle[name] = float(torch.rad2deg(torch.arccos(geo["cosine_values"].clamp(-1, 1))).mean())
    q = fits["rotation"].rotation
    scores = {s: score_columns(s, weight, calib, cfg.seed) for s in ("magnitude", "wanda_sp", "rcpu")}
    return ToyExample(
        config=cfg, weight=weight, removed=cfg.removed, kept=kept, inputs=x, heldout_inputs=x_held,
        outputs=outputs, kept_weights={name: comp.weight for name, comp in fits.items()},
        errors=errors, norm_ratio=norm_ratio, angle_deg=angle, rotation=q,
        rotation_angle_deg=_angle_of(q), reflection=bool(torch.linalg.det(q) < 0), scores=scores,
    )
