"""RCPU Explorer: the Streamlit app (``./dev app`` or ``streamlit run app.py``).

This file is the router: it runs the chosen page. The Home page is the ``home``
function below; the others live in pages/. Every page draws the shared sidebar
itself (``ui.common.sidebar``), so a page also works when run on its own.
"""

from __future__ import annotations

import streamlit as st

from rcpu.regime import regime_note
from ui import common

st.set_page_config(page_title="RCPU Explorer", page_icon="🧭", layout="wide")


def home() -> None:
    common.sidebar()
    st.title("🧭 RCPU Explorer")
    st.markdown(
        """
See what **structured pruning** does to a language model, and how **rotation-constrained
compensation (RCPU)** repairs it.

Pruning removes whole attention heads (`o_proj` inputs) and MLP channels (`down_proj` inputs).
The layer's outputs `Y = W X` then lose part of their signal: `Z = W_K X_K`. RCPU picks what
to remove with a variance-aware score and then **rotates** the kept weights, `W'_K = Q W_K`
with `Q` orthogonal, so that the pruned outputs point where the original ones did. A rotation
has far fewer degrees of freedom than an unconstrained least-squares refit, which can overfit a
small calibration set; the app shows both, on calibration and on held-out tokens. Everything is
computed from streaming statistics of calibration tokens, cached on disk, on your CPU.
"""
    )
    lm = common.model()
    card = lm.card
    st.subheader("Loaded model")
    c = st.columns(5)
    c[0].metric("Architecture", card["model_type"])
    c[1].metric("Layers", card["layers"])
    c[2].metric("Hidden size", card["hidden_size"])
    c[3].metric("Heads / KV heads", f"{card['heads']} / {card['kv_heads']}")
    c[4].metric("Parameters", f"{card['parameters'] / 1e6:.1f} M")
    with st.expander("Model card"):
        st.json(card)
    data = common.data_config()
    st.caption(
        f"Calibration: {data.calib_samples} × {data.seq_len} tokens of "
        f"{'the embedded text' if data.data == 'embedded' else repr(data.data)}, seed {data.seed}. "
        "Change the model and the data in the sidebar."
    )
    st.info("Regime of `o_proj` (input size = hidden size): " + regime_note(
        data.calib_samples * data.seq_len, card["hidden_size"]), icon="🧪")
    common.model_status()

    st.subheader("Where to go next")
    left, right = st.columns(2)
    with left:
        st.page_link(LEARN, label="Learn: the method in a 2-D picture", icon="🎓")
        st.caption("Remove an input dimension of a toy layer and compare least squares with a rotation.")
        st.page_link(EXPLORER, label="Layer explorer: one layer under the microscope", icon="🔬")
        st.caption("Scores, principal directions, geometry and errors for one sublayer and several methods.")
    with right:
        st.page_link(WHOLE, label="Whole model: prune every layer", icon="✂️")
        st.caption("Sequential pruning with per-layer errors, perplexity before and after, downloads.")
        st.page_link(SWEEP, label="Perplexity vs ratio: compare configurations", icon="📈")
        st.caption("Curves over pruning ratios and calibration sizes, cached point by point.")
        st.page_link(PAPER, label="Paper: the published experiments, rerun", icon="📄")
        st.caption("Table 1, the ablation, Figs. 2, 3 and 5 and the calibration regime beside the LLaMA-7B numbers.")


HOME = st.Page(home, title="Home", icon="🧭", default=True)
LEARN = st.Page("pages/learn.py", title="Learn", icon="🎓")
EXPLORER = st.Page("pages/layer_explorer.py", title="Layer explorer", icon="🔬")
WHOLE = st.Page("pages/whole_model.py", title="Whole model", icon="✂️")
SWEEP = st.Page("pages/perplexity.py", title="Perplexity vs ratio", icon="📈")
PAPER = st.Page("pages/paper.py", title="Paper", icon="📄")

st.navigation([HOME, LEARN, EXPLORER, WHOLE, SWEEP, PAPER]).run()
