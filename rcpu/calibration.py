"""Calibration and held-out tokens for a (model, text, sampling), and cached layer statistics."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from torch import Tensor

from .cache import cache_root, key_of, load_arrays, save_arrays
from .flow import LayerFlow, Progress, layer_input_stats
from .models import LoadedModel
from .stats import LayerStats
from .text import (
    Sampling,
    calibration_starts,
    calibration_windows,
    consecutive_windows,
    load_text,
    split_tokens,
    text_fingerprint,
    tokenize,
)

log = logging.getLogger("rcpu")

SAMPLE_TOKENS = 1024  # tokens kept per sublayer for pictures
SUBLAYERS = ("o_proj", "down_proj")
SPLITS = ("calibration", "heldout")
STATS_VERSION = 2  # 2: the sum of absolute inputs (the authors' rcpu score)


@dataclass
class TokenSet:
    calibration: Tensor  # (calib_samples, seq_len)
    heldout: Tensor  # (<= heldout_samples, seq_len), consecutive windows of the held-out part
    heldout_ids: Tensor  # the whole held-out part, 1-D
    calibration_starts: Tensor | None = None  # where each calibration window starts (None: unknown)


_TOKEN_CACHE: dict[tuple, TokenSet] = {}


def prepare_tokens(lm: LoadedModel, data: str, sampling: Sampling) -> TokenSet:
    sampling.check()
    key = (lm.fingerprint, data, sampling)
    if key not in _TOKEN_CACHE:
        ids = tokenize(lm.tokenizer, load_text(data))
        calib, heldout = split_tokens(ids, sampling.seq_len, data)
        _TOKEN_CACHE[key] = TokenSet(
            calibration=calibration_windows(calib, sampling),
            calibration_starts=calibration_starts(len(calib), sampling),
            heldout=consecutive_windows(heldout, sampling.seq_len, sampling.heldout_samples),
            heldout_ids=heldout,
        )
    return _TOKEN_CACHE[key]


@dataclass
class LayerData:
    """Input statistics of one layer's sublayers on calibration and held-out tokens."""

    layer: int
    calibration: dict[str, LayerStats]
    heldout: dict[str, LayerStats]
    from_cache: bool = False
    seconds: float = 0.0


def stats_path(lm: LoadedModel, data: str, sampling: Sampling, layer: int) -> Path:
    key = key_of(
        {
            "v": STATS_VERSION,
            "model": lm.fingerprint,
            "text": text_fingerprint(data),
            "sampling": asdict(sampling),
            "sample_tokens": SAMPLE_TOKENS,
            "layer": layer,
        }
    )
    return cache_root() / "stats" / f"layer{layer:03d}-{key}.npz"


def layer_stats(
    lm: LoadedModel, data: str, sampling: Sampling, layer: int, progress: Progress | None = None
) -> LayerData:
    """Statistics of layer ``layer``: from the cache, or by running layers ``0..layer`` only."""
    lm.adapter.check_layer(layer)
    start = time.perf_counter()
    path = stats_path(lm, data, sampling, layer)
    arrays = load_arrays(path)
    if arrays is not None:
        data_ = _from_arrays(layer, arrays)
        data_.from_cache = True
        data_.seconds = time.perf_counter() - start
        return data_
    tokens = prepare_tokens(lm, data, sampling)
    splits = {}
    for offset, (split, windows) in enumerate(
        (("calibration", tokens.calibration), ("heldout", tokens.heldout))
    ):
        flow = LayerFlow(lm.adapter, windows)

        def report(done, total, what, split=split):
            if progress:
                progress(done, total + 1, f"{split}: {what}")

        flow.advance_to(layer, report)
        splits[split] = layer_input_stats(flow, layer, SAMPLE_TOKENS, sampling.seed + offset)
    result = LayerData(layer, splits["calibration"], splits["heldout"])
    arrays = _to_arrays(result)
    save_arrays(path, arrays, meta={"layer": layer, "model": lm.name, "data": data})
    if lm.adapter.attention_output(layer).weight.device.type != "cpu":  # the explorer's numbers on the CPU
        result = _from_arrays(layer, arrays)
    result.seconds = time.perf_counter() - start
    return result


def _to_arrays(data: LayerData) -> dict:
    arrays = {}
    for split in SPLITS:
        for sub, stats in getattr(data, split).items():
            for field, value in stats.to_arrays().items():
                arrays[f"{split}.{sub}.{field}"] = value
    return arrays


def _from_arrays(layer: int, arrays: dict) -> LayerData:
    splits: dict[str, dict[str, LayerStats]] = {s: {} for s in SPLITS}
    for split in SPLITS:
        for sub in SUBLAYERS:
            fields = {f: arrays[f"{split}.{sub}.{f}"] for f in ("gram", "total", "count", "sample", "abs_total")}
            # (every field is required: an entry without one is another version's and is recomputed)
            splits[split][sub] = LayerStats.from_arrays(fields)
    return LayerData(layer, splits["calibration"], splits["heldout"])
