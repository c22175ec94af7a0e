"""What a run is, as data: the one source of defaults and checks.

The CLI's argparse defaults and the app's widget defaults are read from these
classes; cache keys are made from them. Each ``check`` raises ``RcpuError``
with one readable line, and runs before any work: without a model it checks
the values alone; with the loaded model (``check(lm)``) it also checks them
against the model's shapes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from .adapters import SUBLAYERS
from .allocate import check_allocation
from .compensate import (
    DEFAULT_ALPHA,
    DEFAULT_LAMBDA,
    LAMBDA_METHODS,
    METHODS,
    PRUNE_METHODS,
    check_alpha,
    check_lambda,
    check_method,
)
from .errors import RcpuError
from .scores import check_keeps_some, check_ratio, check_rounding, check_score
from .text import Sampling, load_text

if TYPE_CHECKING:
    from .models import LoadedModel

TARGETS = {"attn": ("o_proj",), "mlp": ("down_proj",), "both": SUBLAYERS}
# Which pruned sublayers are compensated (the paper's ablation): a name of TARGETS, or none.
COMPENSATE = (*TARGETS, "none")

# Named presets of settings. "paper": the authors' protocol (method page, section 8): 128
# calibration windows of 128 tokens, perplexity in 128-token windows, int(ratio * units)
# units removed, both sublayers. With WikiText-2 it also evaluates on its test split.
PROTOCOLS = {
    "paper": {"calib_samples": 128, "seq_len": 128, "rounding": "truncate", "targets": "both"},
}


def protocol_eval_data(protocol: str | None, data: str, eval_data: str | None) -> str | None:
    """The evaluation text a protocol implies: the paper's evaluates WikiText-2 on its test split."""
    if protocol == "paper" and eval_data is None and data == "wikitext2":
        return "wikitext2"
    return eval_data


@dataclass(frozen=True)
class DataConfig:
    """The model, the calibration text and how calibration windows are drawn from it."""

    model: str = "embedded"
    data: str = "embedded"
    calib_samples: int = Sampling.calib_samples
    seq_len: int = Sampling.seq_len
    seed: int = Sampling.seed
    heldout_samples: int = Sampling.heldout_samples
    trust_remote_code: bool = False
    device: str = "cpu"  # where the model, statistics, compensation and evaluation run ("cuda", "cuda:1")

    @property
    def sampling(self) -> Sampling:
        return Sampling(self.calib_samples, self.seq_len, self.seed, self.heldout_samples)

    def check(self) -> None:
        """Sampling sizes in range, the device present and the text readable (before the model loads)."""
        self.sampling.check()
        check_device(self.device)
        load_text(self.data)


def check_device(device: str) -> None:
    """A device torch has here: ``cpu``, or ``cuda``/``cuda:N`` when CUDA is available (one line otherwise)."""
    import torch

    try:
        kind = torch.device(device)
    except (RuntimeError, TypeError):
        raise RcpuError(f"unknown device {device!r}; use 'cpu' or 'cuda' (or 'cuda:N')") from None
    if kind.type == "cpu":
        return
    if kind.type != "cuda":
        raise RcpuError(f"device {device!r} is not supported; use 'cpu' or 'cuda' (or 'cuda:N')")
    if not torch.cuda.is_available():
        raise RcpuError(f"--device {device}: CUDA is not available here (torch {torch.__version__}); use --device cpu")
    if kind.index is not None and kind.index >= torch.cuda.device_count():
        raise RcpuError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")


@dataclass(frozen=True)
class EvalConfig:
    """Where perplexity is measured: ``eval_data`` from its start, or the held-out part of the
    calibration text (``None``); at most ``eval_windows`` windows (``None``: all)."""

    eval_data: str | None = None
    eval_windows: int | None = None

    def check(self) -> None:
        if self.eval_windows is not None and self.eval_windows < 1:
            raise RcpuError(f"--eval-windows must be at least 1, got {self.eval_windows}")
        if self.eval_data:
            load_text(self.eval_data, split="test")

    def describe(self, data: DataConfig) -> str:
        return self.eval_data or f"{data.data} (held-out part)"

    def against(self, data: DataConfig) -> EvalConfig:
        """This config, or the held-out part of the calibration text when ``eval_data`` is the same
        text (by content, whatever the path): evaluation never sees the calibration windows."""
        from .text import text_fingerprint

        if self.eval_data and text_fingerprint(self.eval_data) == text_fingerprint(data.data):
            return replace(self, eval_data=None)
        return self


def _check_choices(cfg: LayerConfig | PruneConfig) -> None:
    check_ratio(cfg.ratio)
    check_score(cfg.score)
    check_method(cfg.method, PRUNE_METHODS if isinstance(cfg, PruneConfig) else METHODS)
    check_alpha(cfg.alpha)
    check_lambda(cfg.lam)
    check_rounding(cfg.rounding)


@dataclass(frozen=True)
class LayerConfig:
    """One sublayer of one layer, pruned at ``ratio`` by ``score`` and compensated by ``method``."""

    layer: int = 15
    sublayer: str = "down_proj"
    ratio: float = 0.2
    score: str = "rcpu"
    method: str = "rotation"
    alpha: float = DEFAULT_ALPHA  # ridge: relative strength
    lam: float = DEFAULT_LAMBDA  # ls_ridge: absolute strength (--lambda)
    rounding: str = "nearest"  # or "truncate", the authors' int(ratio * units)

    def check(self, lm: LoadedModel | None = None) -> None:
        if self.sublayer not in SUBLAYERS:
            raise RcpuError(f"unknown sublayer {self.sublayer!r}; choose one of: {', '.join(SUBLAYERS)}")
        _check_choices(self)
        if lm is not None:
            adapter = lm.adapter
            adapter.check_layer(self.layer)
            check_keeps_some(adapter.num_units(self.layer, self.sublayer), self.ratio,
                             adapter.unit_name(self.sublayer), self.rounding)

    def for_model(self, lm: LoadedModel) -> LayerConfig:
        """This config with its layer moved into the model's range (a model with fewer layers)."""
        return replace(self, layer=min(self.layer, lm.adapter.num_layers - 1))


@dataclass(frozen=True)
class PruneConfig:
    """Every layer pruned at ``ratio`` in the ``targets`` sublayers, by ``score`` and ``method``."""

    ratio: float = 0.2
    targets: str = "both"
    score: str = "rcpu"
    method: str = "rotation"
    alpha: float = DEFAULT_ALPHA  # ridge: relative strength
    lam: float = DEFAULT_LAMBDA  # ls_ridge: absolute strength (--lambda)
    rounding: str = "nearest"  # or "truncate", the authors' int(ratio * units)
    gqa_balanced: bool = False  # the same number of query heads from every KV group (stays stock-loadable)
    allocation: str = "uniform"  # or "greedy": per-layer counts, same total (rcpu/allocate.py)
    compensate: str = "both"  # which pruned sublayers get ``method`` (the others keep W_K): the paper's ablation

    @property
    def sublayers(self) -> tuple[str, ...]:
        return TARGETS[self.targets]

    def compensates(self, sublayer: str) -> bool:
        """Whether ``method`` is applied to this sublayer (else its kept weights stay as they were)."""
        return self.compensate != "none" and sublayer in TARGETS[self.compensate]

    def head_group(self, adapter, index: int) -> int | None:
        """Query heads per KV group when heads are selected group by group (GQA-balanced), else None
        (MHA is balanced whatever is selected)."""
        group = adapter.queries_per_kv(index)
        return group if self.gqa_balanced and group > 1 else None

    @property
    def label(self) -> str:
        """``score:method``, with the strength for a method whose result depends on lambda."""
        name = f"{self.score}:{self.method}"
        name = f"{name} λ={self.lam:g}" if self.method in LAMBDA_METHODS else name
        if self.allocation != "uniform":
            name = f"{name} [{self.allocation}]"
        return name if self.compensate == "both" else f"{name} [compensate {self.compensate}]"

    def check(self, lm: LoadedModel | None = None) -> None:
        """With ``lm``: also refuse a ratio that would leave some layer nothing, before any work."""
        if self.targets not in TARGETS:
            raise RcpuError(f"unknown targets {self.targets!r}; choose one of: {', '.join(TARGETS)}")
        if self.compensate not in COMPENSATE:
            raise RcpuError(f"unknown --compensate {self.compensate!r}; choose one of: {', '.join(COMPENSATE)}")
        _check_choices(self)
        check_allocation(self.allocation)
        if lm is not None:
            adapter = lm.adapter
            for sub in self.sublayers:
                for index in range(adapter.num_layers):
                    units = adapter.num_units(index, sub)
                    if sub == "o_proj" and self.head_group(adapter, index):
                        units = self.head_group(adapter, index)  # each KV group must keep one
                    check_keeps_some(units, self.ratio, adapter.unit_name(sub), self.rounding)


def parse_configs(text: str) -> tuple[tuple[str, str], ...]:
    """``"rcpu:rotation,wanda_sp:none"`` -> (("rcpu", "rotation"), ("wanda_sp", "none")), checked."""
    pairs = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        score, sep, method = item.partition(":")
        if not sep:
            raise RcpuError(f"config {item!r} must be SCORE:METHOD, e.g. rcpu:rotation")
        check_score(score)
        check_method(method, PRUNE_METHODS)
        pairs.append((score, method))
    if not pairs:
        raise RcpuError("no configs given")
    return tuple(pairs)


@dataclass(frozen=True)
class SweepConfig:
    """Every (calibration size, ratio, score:method, lambda) point of a perplexity sweep.

    ``lambdas`` is an axis for the methods that use lambda (``ls_ridge``); the others
    are computed once, at the default lambda.
    """

    ratios: tuple[float, ...] = (0.1, 0.2, 0.3)
    configs: tuple[tuple[str, str], ...] = (("rcpu", "rotation"), ("wanda_sp", "none"), ("fluctuation", "bias"))
    calib_samples: tuple[int, ...] | None = None  # None: the DataConfig's
    targets: str = PruneConfig.targets
    alpha: float = DEFAULT_ALPHA
    lambdas: tuple[float, ...] = (DEFAULT_LAMBDA,)
    rounding: str = PruneConfig.rounding
    gqa_balanced: bool = PruneConfig.gqa_balanced
    allocations: tuple[str, ...] = (PruneConfig.allocation,)  # an axis, like lambdas
    compensate: str = PruneConfig.compensate

    @property
    def configs_text(self) -> str:
        return ",".join(f"{s}:{m}" for s, m in self.configs)

    def points(self, data: DataConfig) -> list[tuple[DataConfig, PruneConfig]]:
        sizes = self.calib_samples or (data.calib_samples,)
        return [
            (replace(data, calib_samples=n),
             PruneConfig(r, self.targets, s, m, self.alpha, lam, self.rounding, self.gqa_balanced, allocation,
                         self.compensate))
            for n in sizes
            for r in self.ratios
            for s, m in self.configs
            for lam in (self.lambdas if m in LAMBDA_METHODS else (DEFAULT_LAMBDA,))
            for allocation in self.allocations
        ]

    def check(self, data: DataConfig | None = None) -> None:
        if not self.ratios:
            raise RcpuError("no ratios given; e.g. --ratios 0.1,0.2")
        if not self.lambdas:
            raise RcpuError("no lambdas given; e.g. --lambdas 1e-4,1e-2")
        if not self.allocations:
            raise RcpuError("no allocations given; e.g. --allocations uniform,greedy")
        for data_point, cfg in self.points(data or DataConfig()):
            cfg.check()
            data_point.sampling.check()
