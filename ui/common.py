"""The sidebar every page shares, and the cached resources behind it.

Every page calls ``sidebar()`` first (so a page run on its own, as AppTest
does, has the same sidebar); the widgets' values live in ``st.session_state``
and carry over between pages. Pages then call ``model()`` and ``explore()``
(one sublayer) or the library's workflows; errors the user can fix (``RcpuError``) become ``st.error``
messages, never tracebacks.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import streamlit as st

from rcpu.config import PROTOCOLS, DataConfig, EvalConfig, LayerConfig
from rcpu.errors import RcpuError
from rcpu.eta import StageText, duration_text
from rcpu.explorer import LayerExplorer
from rcpu.models import LoadedModel, load_model
from rcpu.regime import LECTURE_PRESET
from rcpu.reports import LayerReport
from rcpu.text import load_text, save_upload
from ui.defaults import AppDefaults, app_defaults

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
PERSISTENT_PREFIXES = ("le_", "wm_", "pv_", "learn_", "pp_")
SIDEBAR_KEYS = ("model", "text_source", "text_path", "calib_samples", "seq_len", "seed", "heldout_samples",
                "rounding")
ROUNDING_LABELS = {"nearest": "nearest (default)", "truncate": "truncate (the authors' int(ratio · units))"}
UPLOADED = "uploaded_text"  # path of the last accepted upload (a plain key: survives page changes)


def persist_widgets() -> None:
    """Keep widget values when the user visits another page and comes back.

    Streamlit forgets the state of widgets that were not drawn in a run (and a
    widget on another page is another widget); re-assigning a key turns it into
    user state, which survives and initialises the widget on the next page.
    """
    for key in list(st.session_state.keys()):
        if isinstance(key, str) and (key in SIDEBAR_KEYS or key.startswith(PERSISTENT_PREFIXES)):
            st.session_state[key] = st.session_state[key]


def init(key: str, default) -> None:
    """Set a widget's starting value through session state (widgets get no ``value=``)."""
    if key not in st.session_state:
        st.session_state[key] = default


# The library's messages name command-line options; on a page the user sees fields.
CLI_WORDS = (
    ("(--model /path/to/model)", "(type the folder into the sidebar's Model field)"),
    ("--calib-samples", "Calibration samples"), ("--seq-len", "Sequence length"),
    ("--heldout-samples", "Held-out windows"), ("--eval-windows", "Evaluation windows"),
    ("--trust-remote-code", "trusting remote code (not offered by the app)"), ("--model", "the Model field"),
    ("--tasks path/to/task.yaml", "the Task files field (path/to/task.yaml)"),
    ("(the default; --online allows it)", "(the app runs offline; `rcpu reproduce table2 --online` does not)"),
    ("--ratios", "Pruning ratios"), ("--lambdas", "λ of LS + ridge"), ("--overwrite", "another folder"),
)


def for_the_page(message: str, uploaded: str | None = None) -> str:
    """A library message in the app's words: field names for options, no server paths of uploads."""
    for cli, field in CLI_WORDS:
        message = message.replace(cli, field)
    if uploaded:
        message = message.replace(str(uploaded), "the uploaded file")
    return re.sub(r"\S*/uploads/[0-9a-f]{16,}\.txt", "the uploaded file", message)


@contextmanager
def guarded(stop: bool = True) -> Iterator[None]:
    """Show ``RcpuError`` (and unexpected errors) as ``st.error``; stop the page after it."""
    try:
        yield
    except RcpuError as exc:
        st.error(for_the_page(str(exc), st.session_state.get(UPLOADED)), icon="⚠️")
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
    init("text_source", TEXT_CHOICES[0])
    choice = st.radio("Calibration text", TEXT_CHOICES, key="text_source", help=TEXT_HELP)
    if choice == "upload a .txt file":
        upload = st.file_uploader("Text file", type=["txt"], key="text_upload")
        if upload is not None:
            with guarded(stop=False):
                st.session_state[UPLOADED] = str(save_upload(upload.getvalue()))
        path = st.session_state.get(UPLOADED)
        if path is None:
            st.caption("No file yet: the embedded text is used until one is uploaded.")
            return "embedded"
        st.caption(f"Using the uploaded text (stored as {Path(path).name[:12]}….txt).")
        return path
    if choice == "local path":
        init("text_path", "")
        path = st.text_input("Path to a .txt file or a folder of them", key="text_path").strip()
        if not path:
            st.caption("No path yet: the embedded text is used.")
            return "embedded"
        return path
    return "embedded"


def _paper_protocol() -> None:
    """Set the sidebar to the authors' protocol (before its widgets are drawn again)."""
    preset = PROTOCOLS["paper"]
    for key in ("calib_samples", "seq_len", "rounding"):
        st.session_state[key] = preset[key]


def _lecture_preset() -> None:
    """Few calibration tokens per input dimension: the regime where the paper's effect shows."""
    for key, value in LECTURE_PRESET.items():
        st.session_state[key] = value


def rounding() -> str:
    """The sidebar's unit rounding (``nearest`` or ``truncate``)."""
    return st.session_state.get("rounding", LayerConfig.rounding)


def sidebar() -> DataConfig:
    """Draw the shared sidebar (every page calls this first); return the data settings."""
    persist_widgets()
    d = defaults()
    for key, value in (("model", "embedded"), ("calib_samples", d.calib_samples), ("seq_len", d.seq_len),
                       ("seed", d.seed), ("heldout_samples", d.heldout_samples), ("rounding", LayerConfig.rounding)):
        init(key, value)
    with st.sidebar:
        st.subheader("Model and calibration")
        model_name = st.text_input("Model", key="model", help=MODEL_HELP).strip()
        data = _text_source()
        c1, c2 = st.columns(2)
        calib = c1.number_input("Calibration samples", 1, None, key="calib_samples",
                                help="Random windows of the calibration text used for statistics.")
        # No max on the widgets: out of range they only turn red and keep the old value; the
        # sampling check below says in one line what is allowed.
        seq_len = c2.number_input("Sequence length", 1, None, step=64, key="seq_len",
                                  help="Tokens per calibration window (at most the model's context).")
        seed = st.number_input("Seed", 0, 2**31 - 1, key="seed")
        with st.expander("More settings"):
            heldout = st.number_input("Held-out windows", 1, 1024, key="heldout_samples",
                                      help="Windows of the held-out part (never used for calibration) "
                                           "on which held-out errors are measured.")
            st.radio("Units removed: ratio × units rounded to", list(ROUNDING_LABELS),
                     format_func=ROUNDING_LABELS.get, key="rounding")
        st.button("Use the paper's protocol", key="paper_protocol", on_click=_paper_protocol,
                  help="128 calibration windows of 128 tokens, perplexity in 128-token windows, "
                       "int(ratio · units) units removed (the authors' released code).")
        st.button("Lecture preset (few calibration tokens)", key="lecture_preset", on_click=_lecture_preset,
                  help=f"{LECTURE_PRESET['calib_samples']} windows of {LECTURE_PRESET['seq_len']} tokens: few "
                       "calibration tokens per input dimension, where least squares overfits and rotation "
                       "does better on held-out tokens (the paper's effect; see docs/app.md).")
    config = DataConfig(
        model=model_name or "embedded", data=data, calib_samples=int(calib), seq_len=int(seq_len),
        seed=int(seed), heldout_samples=int(heldout),
    )
    st.session_state["data_config"] = config
    with guarded():  # one line, before anything is computed on a value out of range
        config.sampling.check()
    return config


def check_context(lm: LoadedModel, config: DataConfig) -> None:
    """A sequence length longer than the model's context is refused before a long statistics pass."""
    limit = getattr(lm.model.config, "max_position_embeddings", None)
    if limit and config.seq_len > limit:
        raise RcpuError(f"Sequence length {config.seq_len} is longer than this model's context ({limit} tokens): "
                        f"choose at most {limit}.")


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
        check_context(lm, cfg)
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
def explorer() -> LayerExplorer:
    """Statistics and analyses shared by every session (the model is shared too)."""
    return LayerExplorer(max_stats=6, max_analyses=48)


@st.cache_resource
def _model_lock() -> threading.Lock:
    return threading.Lock()


@contextmanager
def model_in_use(what: str) -> Iterator[None]:
    """Run forward passes of the shared model one session at a time.

    The loaded model is shared by every browser session (``st.cache_resource``)
    and the library gathers statistics with forward hooks on its modules, which
    every forward pass sees: two sessions computing at once would trip over each
    other's hooks. While another session computes, this one waits (and stays
    interruptible: a rerun stops the wait).
    """
    lock = _model_lock()
    if not lock.acquire(blocking=False):
        note = st.empty()
        while not lock.acquire(timeout=0.5):
            note.info(f"Another session is computing on the model; {what} starts when it is done…", icon="⏳")
        note.empty()
    try:
        yield
    finally:
        lock.release()


def explore(lm: LoadedModel, data: DataConfig, cfg: LayerConfig, methods: list[str]) -> LayerReport:
    """``LayerExplorer.explore`` with a progress bar while statistics are computed (one session
    at a time on the shared model) and a note once they are cached."""
    bar = None
    clock = StageText()

    def report(done: int, total: int, what: str) -> None:
        nonlocal bar
        bar = bar or st.progress(0.0, text=f"Statistics of layer {cfg.layer}…")
        left = clock.left("statistics", done, total)
        eta = "" if left is None else f" · about {duration_text(left)} left"
        bar.progress(min(done / max(total, 1), 1.0), text=f"Statistics of layer {cfg.layer}: {what}{eta}")

    try:
        result = explorer().explore(lm, data, cfg, methods, progress=report, guard=model_in_use)
    finally:
        if bar is not None:  # no stale empty bar above an error
            bar.empty()
    if bar is not None:
        st.toast(f"Statistics of layer {cfg.layer} computed in {result.stats.seconds:.1f} s and cached")
    return result


EVAL_CHOICES = ("held-out part of the calibration text", "embedded text", "another text (local path)")


def _same_text(source: str, data: DataConfig) -> bool:
    """Whether ``source`` is the calibration text itself (by content); an unreadable one is not
    (the run then reports it)."""
    try:
        return EvalConfig(source).against(data).eval_data is None
    except RcpuError:
        return False


def evaluation_settings(prefix: str, data: DataConfig) -> tuple[str | None, int | None]:
    """(evaluation text or None for the held-out part, window limit or None for all).

    The evaluation text never overlaps the calibration text: choosing the
    calibration text itself means its held-out part.
    """
    init(f"{prefix}_eval_source", EVAL_CHOICES[0])
    init(f"{prefix}_eval_path", "")
    init(f"{prefix}_eval_windows", defaults().eval_windows)
    left, right = st.columns([2, 1])
    with left:
        choice = st.radio("Evaluation text", EVAL_CHOICES, key=f"{prefix}_eval_source", horizontal=True,
                          help="Perplexity is measured on non-overlapping windows of this text.")
        source: str | None = None
        if choice == EVAL_CHOICES[1]:
            source = "embedded"
        elif choice == EVAL_CHOICES[2]:
            source = st.text_input("Path to a .txt file or a folder of them", key=f"{prefix}_eval_path").strip()
            source = source or None
        if source is not None and _same_text(source, data):
            st.caption("That is the calibration text: its held-out part is used instead.")
            source = None
    with right:
        windows = st.number_input(f"Evaluation windows of {data.seq_len} tokens (0 = all)", 0, 100_000,
                                  key=f"{prefix}_eval_windows")
    return source, int(windows) or None
