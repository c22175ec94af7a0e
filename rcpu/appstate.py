"""What the app keeps between reruns, without Streamlit.

- ``app_defaults``: the sidebar's starting values (``DataConfig`` defaults, which
  environment variables can shrink for tests and demos).
- ``save_upload``: an uploaded calibration text, checked and stored under
  ``cache/uploads/<sha256>.txt`` (the user's file name is never used).
- ``Memo`` / ``AnalysisMemo``: small in-memory LRU stores for layer statistics
  and per-method analyses, so that switching ratio, score or method back and
  forth costs nothing and adding one method computes only that method.
- ``whole_model_report`` / ``zip_pruned``: the whole-model page's downloads.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import threading
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TypeVar

from .cache import atomic_write_bytes, cache_root
from .calibration import LayerData
from .config import DataConfig, LayerConfig
from .errors import RcpuError
from .export import save_pruned
from .layer import SublayerAnalysis, analyze_sublayer, prepare_sublayer
from .models import LoadedModel
from .prune import PruneResult
from .scores import check_ratio

MAX_UPLOAD_BYTES = 20_000_000
EXPLORER_METHODS = ("none", "bias", "ls", "rotation")  # the layer explorer compares these at first
ENV_PREFIX = "RCPU_APP_"

T = TypeVar("T")


@dataclass(frozen=True)
class AppDefaults:
    """Starting values of the app's widgets."""

    calib_samples: int = DataConfig.calib_samples
    seq_len: int = DataConfig.seq_len
    seed: int = DataConfig.seed
    heldout_samples: int = DataConfig.heldout_samples
    layer: int = LayerConfig.layer
    # Evaluation windows for perplexity (0 = the whole held-out part).
    eval_windows: int = 0


def app_defaults(environ: dict | None = None) -> AppDefaults:
    """``AppDefaults`` with ``RCPU_APP_<FIELD>`` environment overrides (integers).

    For example ``RCPU_APP_CALIB_SAMPLES=4 RCPU_APP_SEQ_LEN=128`` makes the app
    start on a small calibration set (the tests do this); unset, the app starts
    on ``DataConfig``'s defaults.
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


def save_upload(data: bytes, root: Path | None = None, limit: int = MAX_UPLOAD_BYTES) -> Path:
    """Check an uploaded calibration text and store it as ``<root>/uploads/<sha256>.txt``.

    Only UTF-8 text is accepted; nothing uploaded is executed or unpickled, and
    the uploaded file's own name is never used in a path.
    """
    if len(data) > limit:
        raise RcpuError(f"uploaded file is {len(data) / 1e6:.1f} MB; the limit is {limit / 1e6:.0f} MB")
    if not data.strip():
        raise RcpuError("uploaded file is empty")
    if b"\x00" in data[:65536]:
        raise RcpuError("uploaded file looks binary, not text")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RcpuError(f"uploaded file is not UTF-8 text (byte {exc.start})") from None
    digest = hashlib.sha256(data).hexdigest()
    path = (root or cache_root()) / "uploads" / f"{digest}.txt"
    if not path.exists():
        atomic_write_bytes(path, data)
    return path


class Memo:
    """A thread-safe LRU dictionary (Streamlit serves sessions from several threads)."""

    def __init__(self, max_entries: int = 8):
        self.max_entries = max_entries
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable):
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        return None

    def put(self, key: Hashable, value) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def get_or_compute(self, key: Hashable, compute: Callable[[], T]) -> T:
        value = self.get(key)
        if value is None:
            value = compute()
            self.put(key, value)
        return value


def stats_key(lm: LoadedModel, data: DataConfig, layer: int) -> tuple:
    """Identity of one layer's statistics for the in-memory store."""
    return (lm.fingerprint, data.data, data.sampling, layer)


def check_layer_config(lm: LoadedModel, cfg: LayerConfig) -> None:
    """The checks ``explore_layer`` makes, for pages that reach the analysis directly."""
    if cfg.sublayer not in ("o_proj", "down_proj"):
        raise RcpuError(f"unknown sublayer {cfg.sublayer!r}; choose o_proj or down_proj")
    check_ratio(cfg.ratio)
    lm.adapter.check_layer(cfg.layer)


class AnalysisMemo:
    """``analyze_sublayer`` results, each method computed once per (stats, sublayer, ratio, score).

    ``get`` returns an analysis holding exactly the requested methods in the
    requested order; methods not computed before are computed together in one
    ``analyze_sublayer`` call and merged into the stored analysis (the shared
    part, which depends only on the selection, is identical between calls).
    """

    def __init__(self, max_entries: int = 16, max_bases: int = 4):
        self._memo = Memo(max_entries)
        self._bases = Memo(max_bases)  # (stats, sublayer) -> SublayerBasis, shared by every ratio and score
        self._lock = threading.Lock()

    def get(
        self, lm: LoadedModel, data: DataConfig, stats: LayerData, cfg: LayerConfig, methods: list[str]
    ) -> SublayerAnalysis:
        check_layer_config(lm, cfg)
        methods = list(dict.fromkeys(methods or [cfg.method]))
        key = (stats_key(lm, data, cfg.layer), cfg.sublayer, float(cfg.ratio), cfg.score, cfg.alpha)
        with self._lock:
            stored: SublayerAnalysis | None = self._memo.get(key)
            missing = [m for m in methods if stored is None or m not in stored.methods]
            if missing:
                weight = lm.adapter.sublayer(cfg.layer, cfg.sublayer).weight
                calibration, heldout = stats.calibration[cfg.sublayer], stats.heldout[cfg.sublayer]
                basis = self._bases.get_or_compute(
                    (key[0], cfg.sublayer), lambda: prepare_sublayer(weight, calibration, heldout, data.seed)
                )
                fresh = analyze_sublayer(
                    weight,
                    calibration,
                    heldout,
                    score=cfg.score,
                    ratio=cfg.ratio,
                    methods=missing,
                    unit_size=lm.adapter.unit_size(cfg.sublayer),
                    alpha=cfg.alpha,
                    seed=data.seed,
                    what="heads" if cfg.sublayer == "o_proj" else "channels",
                    basis=basis,
                )
                if stored is None:
                    stored = fresh
                else:
                    stored = replace(stored, methods={**stored.methods, **fresh.methods})
                self._memo.put(key, stored)
        return replace(stored, methods={m: stored.methods[m] for m in methods})


def whole_model_report(result: PruneResult, dense: dict | None, pruned: dict | None,
                       eval_data: str | None = None) -> dict:
    """The whole-model page's results as JSON: settings, parameters, perplexities, per-layer errors."""
    return {
        "settings": result.record(),
        "heldout_samples": result.data.heldout_samples,
        "eval_data": eval_data or f"{result.data.data} (held-out part)",
        "params_before": result.params_before,
        "params_after": result.params_after,
        "params_removed_fraction": 1 - result.params_after / result.params_before,
        "perplexity_before": None if dense is None else dense["ppl"],
        "perplexity_after": None if pruned is None else pruned["ppl"],
        "eval_tokens": None if pruned is None else pruned["eval_tokens"],
        "layers": result.layers,
        "timing_s": dict(result.timing_s),
    }


def zip_pruned(result: PruneResult, tokenizer, report: dict | None = None) -> bytes:
    """The pruned model as a zip of its stock-loadable folder (safetensors, config, tokenizer)."""
    with tempfile.TemporaryDirectory(prefix="rcpu-zip-") as tmp:
        folder = save_pruned(result.model, tokenizer, Path(tmp) / "pruned", record=result.record())
        if report is not None:
            (folder / "rcpu_results.json").write_text(json.dumps(report, indent=2))
        buffer = io.BytesIO()
        # Weights barely compress: store them, deflate the small text files.
        with zipfile.ZipFile(buffer, "w") as archive:
            for path in sorted(folder.rglob("*")):
                if path.is_file():
                    kind = zipfile.ZIP_STORED if path.suffix == ".safetensors" else zipfile.ZIP_DEFLATED
                    archive.write(path, f"pruned-model/{path.relative_to(folder)}", compress_type=kind)
        return buffer.getvalue()
