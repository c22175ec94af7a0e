"""The paper's experiments beside its published LLaMA-7B numbers, cached point by point (shared with
``rcpu reproduce``)."""

from __future__ import annotations

import os

import streamlit as st

from rcpu import figures
from rcpu.paper import EXPERIMENTS, SIZES, published_table, run_experiment, sizes_for
from ui import common

SIZE_ENV = "RCPU_APP_PAPER_SIZES"  # the starting size preset (tests start on "tiny")
SIZE_LABELS = {"quick": "quick (minutes)", "paper": "the paper's sizes (hours on CPU)", "tiny": "tiny (tests)"}

data = common.sidebar()
st.title("📄 Paper")
st.caption(
    "The RCPU paper's experiments, rerun on the model and text of the sidebar, beside the published LLaMA-7B "
    "numbers. Every point is a whole-model prune cached on disk and shared with `rcpu reproduce` and the "
    "Perplexity page: cached points appear at once, missing ones are computed on request."
)
lm = common.model()

common.init("pp_experiment", "table1")
common.init("pp_sizes", os.environ.get(SIZE_ENV) or "quick")
common.init("pp_scaled", False)
names = list(EXPERIMENTS)
name = st.radio("Experiment", names, key="pp_experiment", horizontal=True,
                format_func=lambda n: EXPERIMENTS[n].title.split(":")[0])
c = st.columns([2, 2])
preset = c[0].radio("Sizes", list(SIZES), key="pp_sizes", horizontal=True, format_func=SIZE_LABELS.get)
scaled = c[1].checkbox("Calibration sizes at the paper's tokens per down_proj input", key="pp_scaled",
                       help="The paper's 128 and 512 samples of 128 tokens over LLaMA-7B's 11008 down_proj inputs "
                            "are 1.5 and 6 tokens per input; this maps every calibration size to the same ratio "
                            "on the loaded model.")
exp = EXPERIMENTS[name]
st.subheader(exp.title)
st.markdown(exp.reading)

down_inputs = lm.adapter.num_channels(0)
with common.guarded():
    sizes = sizes_for(preset, down_inputs, scaled)
    if not exp.perplexity:
        st.info("Zero-shot accuracy runs through lm-evaluation-harness from the command line: "
                "`rcpu reproduce table2 --quick --tasks path/to/task.yaml` (local lm-eval task files work offline; "
                "the paper's seven tasks by name need `--online`). The published numbers:")
        st.dataframe(published_table("table2"), hide_index=True)
        common.model_status()
        st.stop()
    result = run_experiment(lm, name, data, sizes, compute=False)

current = data.calib_samples * data.seq_len / down_inputs  # the sidebar's calibration tokens per down_proj input


def show(result: dict) -> None:
    chart.plotly_chart(figures.paper_figure(result, current), key=f"fig_paper_{name}_{len(result['points'])}")


left, right = st.columns([3, 2])
chart = left.empty()
show(result)
with right:
    st.markdown("**Published (LLaMA-7B)**")
    st.dataframe(result["published"], hide_index=True)
    st.markdown(f"**Measured ({lm.name}, {sizes.name} sizes{', scaled' if scaled else ''})**")
    measured = st.empty()
    measured.dataframe(result["measured"], hide_index=True)
    for ratio, crossing in (result.get("ls_overtakes_rotation_at") or {}).items():
        for config, x in crossing.items():
            st.caption(f"At {float(ratio):.0%}, {config} overtakes rotation at "
                       + (f"**{x:.2f}** calibration tokens per down_proj input." if x
                          else "no crossing among the measured sizes."))

missing = result["missing"] + (result["dense"] is None)
if missing:
    st.caption(f"{result['total'] - result['missing']} of {result['total']} points cached"
               + ("; the dense perplexity is not cached yet" if result["dense"] is None else "") + ".")
    b1, b2 = st.columns([1.6, 4])
    compute = b1.button(f"Compute {result['missing']} point{'s' if result['missing'] != 1 else ''}" if
                        result["missing"] else "Compute the dense perplexity", icon="▶️", type="primary",
                        key="pp_compute")
    b2.button("Stop", key="pp_stop", help="Interrupts the computation; finished points stay cached.")
    if compute:
        overall = st.progress(0.0, text="Dense model…")
        current_bar = st.progress(0.0, text="")

        def on_point(i: int, n: int, row: dict) -> None:
            overall.progress(i / n, text=f"{i} of {n} points")

        def on_layer(done: int, n: int, what: str) -> None:
            current_bar.progress(min(done / max(n, 1), 1.0), text=f"Pruning: {what}")

        with common.guarded(), common.model_in_use("this experiment"):
            result = run_experiment(lm, name, data, sizes, progress=on_layer, on_point=on_point)
        overall.empty()
        current_bar.empty()
        show(result)
        measured.dataframe(result["measured"], hide_index=True)
        st.success(f"All {result['total']} points computed and cached.")
else:
    st.caption(f"All {result['total']} points cached: `rcpu reproduce {name} --sizes {sizes.name}"
               + (" --scaled" if scaled else "") + "` prints the same numbers.")
common.model_status()
