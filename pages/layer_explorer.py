"""Layer explorer: one sublayer, one score and ratio, several compensation methods."""

from __future__ import annotations

import streamlit as st

from rcpu import figures
from rcpu.compensate import METHODS
from rcpu.config import LayerConfig
from rcpu.explorer import DEFAULT_METHODS
from rcpu.regime import regime_note
from rcpu.scores import SCORES
from ui import common

SUBLAYERS = {"o_proj": "o_proj (heads)", "down_proj": "down_proj (channels)"}

st.title("🔬 Layer explorer")
st.caption(
    "Pick a layer and a sublayer, prune its input dimensions by a score, and compare how each "
    "compensation method restores the outputs. Statistics are computed once per layer and cached."
)

data = common.sidebar()
lm = common.model()
n_layers = lm.adapter.num_layers

start = LayerConfig(layer=common.defaults().layer, sublayer="o_proj").for_model(lm)
for key, value in (("le_layer", start.layer), ("le_sublayer", start.sublayer),
                   ("le_ratio", start.ratio), ("le_score", start.score), ("le_methods", list(DEFAULT_METHODS)),
                   ("le_compare", "wanda_sp"), ("le_alpha", start.alpha), ("le_lambda", start.lam),
                   ("le_order", "index")):
    common.init(key, value)
if st.session_state.get("le_model") != data.model:  # another model: move the layer into its range
    st.session_state["le_model"] = data.model
    st.session_state["le_layer"] = min(st.session_state["le_layer"], n_layers - 1)

c = st.columns([1, 1.8, 2, 1.4])
# No max on the widget: out of range, it would only turn red and keep the old result; the page says why.
layer = c[0].number_input("Layer", 0, None, key="le_layer", help=f"0 to {n_layers - 1}")
sublayer = c[1].radio("Sublayer", list(SUBLAYERS), format_func=SUBLAYERS.get, key="le_sublayer")
ratio = c[2].slider("Pruning ratio", 0.0, 0.9, step=0.05, key="le_ratio",
                    help="Fraction of heads (o_proj) or channels (down_proj) removed.")
score = c[3].selectbox("Score", list(SCORES), key="le_score")
c = st.columns([3, 1])
methods = c[0].multiselect("Compensation methods to compare", list(METHODS),
                           format_func=lambda m: figures.label(m, score), key="le_methods")
others = [s for s in SCORES if s != score]
if st.session_state["le_compare"] not in others:
    st.session_state["le_compare"] = "wanda_sp" if "wanda_sp" in others else others[0]
compare = c[1].selectbox("Compare kept set with", others, key="le_compare",
                         help="A second score: the Scores view shows how the two kept sets overlap.")
with st.expander("More settings"):
    left, right = st.columns(2)
    alpha = left.number_input("Ridge alpha (λ = α · tr(G_KK) / k)", 0.0, 10.0, step=0.005, format="%.4f",
                              key="le_alpha")
    lam = right.number_input("LS + ridge λ (absolute, toward W_K)", 0.0, 1e8, format="%.1e", key="le_lambda",
                             help="The paper's baseline: (W G[:,K] + λ W_K)(G[K,K] + λ I)⁻¹.")

if layer >= n_layers:
    st.error(f"Layer {layer} does not exist: this model has layers 0 to {n_layers - 1}.", icon="⚠️")
    st.stop()
cfg = LayerConfig(layer=int(layer), sublayer=sublayer, ratio=float(ratio), score=score,
                  method=methods[0] if methods else "none", alpha=float(alpha), lam=float(lam),
                  rounding=common.rounding())
with common.guarded():
    report = common.explore(lm, data, cfg, methods or ["none"])
    second = report.kept_set(compare)
analysis = report.analysis
shown = methods  # figures show only what the user picked

sel = analysis.selection
what = lm.adapter.unit_name(sublayer)
m = st.columns(4)
m[0].metric(f"Pruned {what} (effective ratio)", figures.effective_ratio_text(sel).replace(f" {what}", ""),
            help=f"The ratio rounded to whole {what}; a ratio step that rounds to the same count changes nothing.")
m[1].metric("Input dimensions kept", f"{len(sel.kept)} / {analysis.d_in}")
m[2].metric("Held-out error, pruned", f"{analysis.error_uncompensated['heldout']:.3f}",
            help="‖Y − Z‖_F / ‖Y‖_F on held-out tokens, before any compensation.")
if shown:
    best = min(shown, key=lambda name: analysis.methods[name].error_heldout)
    m[3].metric("Best held-out error", f"{analysis.methods[best].error_heldout:.3f}",
                delta=figures.label(best, score),
                delta_color="off", delta_arrow="off")
calib_tokens = report.calibration_tokens
st.caption(
    f"Layer {cfg.layer} `{sublayer}`: W is {analysis.d_out} × {analysis.d_in}; "
    f"{calib_tokens} calibration tokens ({calib_tokens / analysis.d_in:.1f} per input dimension), "
    f"{report.heldout_tokens} held-out tokens. Analysis {report.seconds:.2f} s."
)
st.info(regime_note(calib_tokens, analysis.d_in), icon="🧪")
if not shown:
    st.info("Choose at least one compensation method to compare.")

VIEWS = ["📊 Scores", "🧭 Principal directions", "📐 Geometry", "📉 Error"]
common.init("le_view", VIEWS[0])
view = st.radio("View", VIEWS, horizontal=True, key="le_view", label_visibility="collapsed")
if view == VIEWS[0]:
    st.caption("What to look for: red (pruned) dimensions at the bottom of the score panel; a score with a "
               "variance factor also prunes dimensions that are large but nearly constant.")
    order = st.radio("Order", ["index", "sorted"], horizontal=True, key="le_order",
                     format_func=lambda o: "index order" if o == "index" else "sorted by score")
    st.plotly_chart(figures.dimension_figure(analysis, order), key="fig_dimensions")
    left, right = st.columns(2)
    with left:
        st.plotly_chart(figures.overlap_figure(sel, second), key="fig_overlap")
    with right:
        st.plotly_chart(figures.mean_variance_figure(analysis), key="fig_mean_variance")
    if sel.unit_size > 1:
        st.plotly_chart(figures.unit_score_figure(analysis), key="fig_units")
elif view == VIEWS[1]:
    st.caption("What to look for: a brighter diagonal than pruned Z's means the method turned the outputs' "
               "main directions back onto Y's (a rotation keeps Z's variances, so its spectrum is Z's; "
               "its directions are not).")
    st.plotly_chart(figures.directions_figure(analysis, shown), key="fig_directions")
    left, right = st.columns(2)
    with left:
        st.plotly_chart(figures.principal_angles_figure(analysis, shown), key="fig_angles")
    with right:
        st.plotly_chart(figures.projection_figure(analysis, shown, columns=2), key="fig_projection")
elif view == VIEWS[2]:
    st.caption("What to look for: boxes near 1 in both panels. " + figures.GEOMETRY_NOTE)
    st.plotly_chart(figures.geometry_figure(analysis, shown), key="fig_geometry")
    left, right = st.columns(2)
    with left:
        st.plotly_chart(figures.inner_products_figure(analysis, shown), key="fig_inner")
    with right:
        st.plotly_chart(figures.gram_distortion_figure(analysis, shown), key="fig_gram")
else:
    st.caption("What to look for: the lowest dark (held-out) bar, and the gap between light and dark bars: "
               "a large gap means the method fits the calibration tokens but not new ones.")
    left, right = st.columns(2)
    with left:
        st.plotly_chart(figures.error_figure(analysis, shown), key="fig_error")
    with right:
        st.plotly_chart(figures.singular_values_figure(analysis, shown), key="fig_singular")
    st.dataframe(figures.method_table(analysis, shown), hide_index=True, width="stretch")
    st.caption(
        "Errors are ‖Y − Ŷ‖_F / ‖Y‖_F computed from the Gram matrices (all tokens, not only the sample). "
        "Least squares fits the calibration tokens best; a large held-out gap means it overfits."
    )
