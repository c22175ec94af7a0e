"""What a run is, as data: the CLI parses into these, the app builds them from widgets,
and cache keys are made from them."""

from __future__ import annotations

from dataclasses import dataclass

from .compensate import DEFAULT_ALPHA
from .text import Sampling


@dataclass(frozen=True)
class DataConfig:
    model: str = "embedded"
    data: str = "embedded"
    calib_samples: int = 32
    seq_len: int = 512
    seed: int = 0
    heldout_samples: int = 8
    trust_remote_code: bool = False

    @property
    def sampling(self) -> Sampling:
        return Sampling(self.calib_samples, self.seq_len, self.seed, self.heldout_samples)


@dataclass(frozen=True)
class LayerConfig:
    layer: int = 15
    sublayer: str = "down_proj"
    ratio: float = 0.2
    score: str = "rcpu"
    method: str = "rotation"
    alpha: float = DEFAULT_ALPHA
