"""The sidebar every page shares, and the cached resources behind it.

``app.py`` calls ``sidebar()`` on every run (before the page), so the sidebar's
widgets and their values live in ``st.session_state`` across pages. Pages call
``data_config()``, ``model()``, ``layer_data()`` and ``analyses()``; errors the
user can fix (``RcpuError``) become ``st.error`` messages, never tracebacks.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Iterator

import streamlit as st

from rcpu.appstate import AnalysisMemo, AppDefaults, Memo, app_defaults, save_upload, stats_key
from rcpu.calibration import LayerData, layer_stats
from rcpu.config import DataConfig
from rcpu.errors import RcpuError
from rcpu.models import LoadedModel, load_model
from rcpu.text import load_text

log = logging.getLogger("rcpu.app")

TEXT_CHOICES = ("embedded", "upload a .txt file", "local path")
TEXT_HELP = (
    "'embedded' is the Python reference documentation shipped with Python (offline). "
    "An upload must be UTF-8 text; a local path may be a .txt file or a folder of them."
)
MODEL_HELP = (
    "'embedded' (SmolLM2-135M, shipped with the app), a local model directory, "
    "a .gguf file, or a Hugging Face hub id like owner/name (needs the hub or its local cache)."
)
PERSISTENT_PREFIXES = ("le_", "wm_", "pv_", "learn_")


def persist_page_widgets() -> None:
    """Keep page widgets' values when the user visits another page and comes back.

    Streamlit forgets the state of widgets that were not drawn in a run;
    re-assigning a key turns it into user state, which survives.
    """
    for key in list(st.session_state.keys()):
        if isinstance(key, str) and key.startswith(PERSISTENT_PREFIXES) and not key.endswith("_button"):
            st.session_state[key] = st.session_state[key]


@contextmanager
def guarded(stop: bool = True) -> Iterator[None]:
    """Show ``RcpuError`` (and unexpected errors) as ``st.error``; stop the page after it."""
    try:
        yield
    except RcpuError as exc:
        st.error(str(exc), icon="⚠️")
        if stop:
            st.stop()
    except Exception as exc:  # a bug: one readable line here, the traceback in the server log
        log.exception("unexpected error in the app")
        st.error(f"Unexpected error: {type(exc).__name__}: {exc}"[:500], icon="🐞")
        if stop:
            st.stop()


def defaults() -> AppDefaults:
    try:
        return app_defaults()
    except RcpuError as exc:
        st.warning(f"{exc}; using the built-in defaults")
        return AppDefaults()


def _text_source() -> str:
    choice = st.radio("Calibration text", TEXT_CHOICES, key="text_source", help=TEXT_HELP)
    if choice == "upload a .txt file":
        upload = st.file_uploader("Text file", type=["txt"], key="text_upload")
        if upload is None:
            st.caption("No file yet: the embedded text is used until one is uploaded.")
            return "embedded"
        with guarded(stop=False):
            return str(save_upload(upload.getvalue()))
        return "embedded"
    if choice == "local path":
        path = st.text_input("Path to a .txt file or a folder of them", key="text_path").strip()
        if not path:
            st.caption("No path yet: the embedded text is used.")
            return "embedded"
        return path
    return "embedded"


def sidebar() -> DataConfig:
    """Draw the shared sidebar; return the run's data settings (also kept in session state)."""
    d = defaults()
    with st.sidebar:
        st.subheader("Model and calibration")
        model_name = st.text_input("Model", value="embedded", key="model", help=MODEL_HELP).strip()
        data = _text_source()
        c1, c2 = st.columns(2)
        calib = c1.number_input("Calibration samples", 1, 4096, value=d.calib_samples, key="calib_samples",
                                help="Random windows of the calibration text used for statistics.")
        seq_len = c2.number_input("Sequence length", 16, 8192, value=d.seq_len, step=64, key="seq_len",
                                  help="Tokens per calibration window.")
        seed = st.number_input("Seed", 0, 2**31 - 1, value=d.seed, key="seed")
        with st.expander("More settings"):
            heldout = st.number_input("Held-out windows", 1, 1024, value=d.heldout_samples, key="heldout_samples",
                                      help="Windows of the held-out part (never used for calibration) "
                                           "on which held-out errors are measured.")
    config = DataConfig(
        model=model_name or "embedded", data=data, calib_samples=int(calib), seq_len=int(seq_len),
        seed=int(seed), heldout_samples=int(heldout),
    )
    st.session_state["data_config"] = config
    return config


def data_config() -> DataConfig:
    return st.session_state.get("data_config") or DataConfig()


@st.cache_resource(show_spinner="Loading the model…", max_entries=2)
def _load(name: str) -> LoadedModel:
    return load_model(name)


def model(stop: bool = True) -> LoadedModel | None:
    """The loaded model of the sidebar's settings (cached); on error an ``st.error`` and stop."""
    cfg = data_config()
    with guarded(stop=stop):
        lm = _load(cfg.model)
        load_text(cfg.data)  # a missing or unreadable text fails here, early and readably
        return lm
    return None


def model_status() -> None:
    """One line in the sidebar: what is loaded, or what is wrong."""
    cfg = data_config()
    with st.sidebar:
        try:
            lm = _load(cfg.model)
            load_text(cfg.data)
        except RcpuError as exc:
            st.error(str(exc), icon="⚠️")
            return
        card = lm.card
        st.caption(f"✅ {card['architecture']} · {card['layers']} layers · {card['parameters'] / 1e6:.0f} M parameters")


@st.cache_resource
def _stats_memo() -> Memo:
    return Memo(max_entries=6)


@st.cache_resource
def analyses() -> AnalysisMemo:
    return AnalysisMemo(max_entries=48)


def stats_cached(lm: LoadedModel, data: DataConfig, layer: int) -> bool:
    return stats_key(lm, data, layer) in _stats_memo()


def layer_data(lm: LoadedModel, data: DataConfig, layer: int) -> LayerData:
    """A layer's statistics: from memory, from ``cache/``, or computed with a progress bar."""
    memo = _stats_memo()
    key = stats_key(lm, data, layer)
    hit = memo.get(key)
    if hit is not None:
        return hit
    bar = st.progress(0.0, text=f"Statistics of layer {layer}…")
    start = time.perf_counter()

    def report(done: int, total: int, what: str) -> None:
        bar.progress(min(done / max(total, 1), 1.0), text=f"Statistics of layer {layer}: {what}")

    result = layer_stats(lm, data.data, data.sampling, layer, report)
    bar.empty()
    if not result.from_cache:
        st.toast(f"Statistics of layer {layer} computed in {time.perf_counter() - start:.1f} s and cached")
    memo.put(key, result)
    return result
