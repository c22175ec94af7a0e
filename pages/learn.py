"""Learn: the method on a toy layer small enough to see, then the algorithm step by step."""

from __future__ import annotations

import numpy as np
import streamlit as st

from rcpu import figures
from rcpu.learn import ToyConfig, build_example
from ui import common

common.sidebar()
st.title("🎓 Learn: pruning and rotation in a picture")
st.markdown(
    """
A linear layer maps inputs `x` to outputs `y = W x`. Pruning removes an **input dimension**: its
column of `W` is gone and the outputs shrink and turn, `z = W_K x_K`. Two ways to repair them from
a few **calibration** points:

- **least squares** refits every kept weight freely to the calibration points;
- **rotation** (RCPU) only turns the pruned outputs as a whole, `ŷ = Q z` with `Q` orthogonal:
  lengths and angles between outputs stay as they are, so there is little to overfit.

Remove a dimension below and compare. With a handful of calibration points, least squares fits
them best but can do worse than no repair at all on new (**held-out**) points; the rotation, with a
single angle to choose, keeps most of its gain. Drag the calibration points to 200 and least squares
wins: with plenty of data per weight, its freedom pays. (One draw is noisy: try a few seeds; the
pattern holds on average.)
"""
)

for key, value in (("learn_dims", 2), ("learn_removed_2", 2), ("learn_removed_3", 3), ("learn_corr", 0.6),
                   ("learn_points", 5), ("learn_seed", 4)):
    common.init(key, value)
c = st.columns([1, 1.4, 1.4, 1.4, 0.8])
dims = c[0].radio("Outputs", [2, 3], format_func=lambda d: f"{d}-D", horizontal=True, key="learn_dims")
removed = c[1].radio("Remove input dimension", list(range(dims + 1)), format_func=lambda j: f"x{j + 1}",
                     horizontal=True, key=f"learn_removed_{dims}")
correlation = c[2].slider("Correlation between inputs", 0.0, 0.95, step=0.05, key="learn_corr",
                          help="The more the removed input is predictable from the kept ones, "
                               "the more can be restored.")
points = c[3].slider("Calibration points", 3, 200, key="learn_points",
                     help="Few points: least squares fits them closely and generalises worse.")
seed = c[4].number_input("Seed", 0, 10_000, key="learn_seed")

with common.guarded():
    example = build_example(ToyConfig(dims=int(dims), removed=int(removed), correlation=float(correlation),
                                      calib_points=int(points), seed=int(seed)))

st.caption(f"Regime: {int(points)} calibration points for {int(dims) + 1} input dimensions "
           f"({int(points) / (int(dims) + 1):.1f} per dimension). On a real layer the same regime needs few "
           "calibration tokens per input dimension: the sidebar's lecture preset gives it in the layer explorer.")
st.plotly_chart(figures.toy_outputs_figure(example), key="fig_toy_outputs")

rows = []
for name in figures.TOY_NAMES:
    rows.append({
        "approximation": name,
        "error (calibration)": example.errors[name]["calibration"],
        "error (held-out)": example.errors[name]["heldout"],
        "mean ‖ŷ‖ / ‖y‖": example.norm_ratio[name],
        "mean angle to y (°)": example.angle_deg[name],
    })
left, right = st.columns([1.1, 1])
with left:
    st.plotly_chart(figures.toy_columns_figure(example), key="fig_toy_columns")
with right:
    st.plotly_chart(figures.toy_error_figure(example), key="fig_toy_errors")
st.dataframe(rows, hide_index=True)
turn = "a reflection" if example.reflection else f"a rotation by {example.rotation_angle_deg:+.1f}°"
st.markdown(
    f"The best orthogonal `Q` here is **{turn}**. A rotation cannot change lengths, so the mean norm "
    f"ratio of the rotation fit equals that of the pruned outputs ({example.norm_ratio['rotation']:.3f}); "
    f"it reduces the **angle** to the original outputs instead "
    f"({example.angle_deg['pruned']:.1f}° → {example.angle_deg['rotation']:.1f}°). Least squares changes "
    f"both (norm ratio {example.norm_ratio['least squares']:.3f}, angle "
    f"{example.angle_deg['least squares']:.1f}°)."
)

st.header("The algorithm, step by step")
st.markdown("For one linear sublayer with weight `W` (d_out × d_in) and calibration inputs `X` (d_in × N):")

st.subheader("0. Statistics")
st.markdown("Everything needed is a function of the Gram matrix, the sum and the count of the inputs, "
            "accumulated over calibration tokens without keeping them:")
st.latex(r"G = X X^\top,\quad \mu = \tfrac{1}{N} X \mathbf{1},\quad "
         r"\operatorname{var}_j = \tfrac{G_{jj}}{N} - \mu_j^2")

st.subheader("1. Score every input dimension")
st.latex(r"s_j^{\text{RCPU}} = \lVert W_{:,j} \rVert \cdot \lVert X_{j,:} \rVert \cdot \operatorname{var}_j,"
         r"\qquad \lVert X_{j,:} \rVert = \sqrt{G_{jj}}")
st.markdown("Wanda-sp uses the first two factors only; the variance factor also removes dimensions that are "
            "large but nearly constant (a bias can stand in for them). A head's score is the sum over its columns.")
scores = {name: np.round(values.numpy(), 3).tolist() for name, values in example.scores.items()}
st.caption(f"In the toy layer: {scores}")

st.subheader("2. Prune")
st.markdown("Remove the lowest-scoring heads (for `o_proj`) or channels (for `down_proj`); `K` is the kept set.")
st.latex(r"Y = W X \;\longrightarrow\; Z = W_K X_K")

st.subheader("3. Procrustes")
st.markdown("Find the orthogonal `Q` that best maps the pruned outputs onto the original ones. "
            "The cross-covariance comes from the statistics alone; its SVD gives the answer:")
st.latex(r"M = Y Z^\top = W\,G_{:,K}\,W_K^\top = U S V^\top,\qquad "
         r"Q = U V^\top = \arg\min_{Q^\top Q = I} \lVert Y - Q Z \rVert_F")
st.caption(f"In the toy layer: Q = {np.round(example.rotation.numpy(), 3).tolist()}")

st.subheader("4. Update the kept weights")
st.latex(r"W'_K = Q\,W_K \qquad\text{(optionally } W'_K = s\,Q\,W_K,\; s = "
         r"\frac{\operatorname{tr} S}{\operatorname{tr}(W_K G_{KK} W_K^\top)}\text{)}")
st.markdown("Compare with least squares, which has `d_out × k` free parameters instead of a rotation's:")
st.latex(r"W'_K = W\,G_{:,K}\,G_{KK}^{-1}")
st.markdown("In a model this runs layer by layer: the next layer's statistics are collected on the outputs "
            "of the already pruned layers.")

st.page_link("pages/layer_explorer.py", label="See it on a real layer in the layer explorer", icon="🔬")
st.page_link("pages/whole_model.py", label="Prune the whole model", icon="✂️")
common.model_status()  # last: this page needs no model, so it shows before one loads
