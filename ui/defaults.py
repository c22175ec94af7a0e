"""The app's starting values: the config classes' defaults, which environment variables can
shrink for tests and demos (no Streamlit here, so tests can call it directly)."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

from rcpu.config import DataConfig, EvalConfig, LayerConfig
from rcpu.errors import RcpuError

ENV_PREFIX = "RCPU_APP_"


@dataclass(frozen=True)
class AppDefaults:
    """Starting values of the app's widgets."""

    calib_samples: int = DataConfig.calib_samples
    seq_len: int = DataConfig.seq_len
    seed: int = DataConfig.seed
    heldout_samples: int = DataConfig.heldout_samples
    layer: int = LayerConfig.layer
    # Evaluation windows for perplexity (0 = the whole held-out part).
    eval_windows: int = EvalConfig.eval_windows or 0


def app_defaults(environ: dict | None = None) -> AppDefaults:
    """``AppDefaults`` with ``RCPU_APP_<FIELD>`` environment overrides (integers).

    For example ``RCPU_APP_CALIB_SAMPLES=4 RCPU_APP_SEQ_LEN=128`` makes the app
    start on a small calibration set (the tests do this); unset, the app starts
    on the config classes' defaults.
    """
    env = os.environ if environ is None else environ
    values = {}
    for f in fields(AppDefaults):
        raw = env.get(ENV_PREFIX + f.name.upper())
        if raw is None or raw == "":
            continue
        try:
            values[f.name] = int(raw)
        except ValueError:
            raise RcpuError(f"{ENV_PREFIX + f.name.upper()} must be an integer, got {raw!r}") from None
    return AppDefaults(**values)
