"""The paper's experiments beside its published LLaMA-7B numbers, cached point by point (shared with
``rcpu reproduce``)."""

from __future__ import annotations

import os
from pathlib import Path

import streamlit as st

from rcpu import figures
from rcpu.paper import (
    EXPERIMENTS,
    SIZES,
    TABLE2_RATIO,
    layer_error_curve,
    run_experiment,
    run_zeroshot_experiment,
    sizes_for,
    table2_configs,
)
from ui import common

SIZE_ENV = "RCPU_APP_PAPER_SIZES"  # the starting size preset (tests start on "tiny")
LOCAL_TASK = Path(__file__).resolve().parent.parent / "tests" / "data" / "zeroshot" / "tiny_mc.yaml"
SIZE_LABELS = {"quick": "quick (minutes)", "paper": "the paper's sizes (hours on CPU)", "tiny": "tiny (tests)"}


def with_progress(what: str, noun: str, run):
    """``run(progress=..., on_point=...)`` under two progress bars (points done; layers of the current one),
    holding the model for ``what``; the bars go when it ends."""
    overall = st.progress(0.0, text="Dense model…")
    current_bar = st.progress(0.0, text="")

    def on_point(i: int, n: int, row: dict) -> None:
        overall.progress(i / n, text=f"{i} of {n} {noun} ({row['config']} done)")

    def on_layer(done: int, n: int, step: str) -> None:
        current_bar.progress(min(done / max(n, 1), 1.0), text=f"Pruning: {step}")

    with common.guarded(), common.model_in_use(what):
        result = run(progress=on_layer, on_point=on_point)
    overall.empty()
    current_bar.empty()
    return result



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
if not exp.perplexity:  # Table 2: zero-shot accuracy through lm-evaluation-harness, cached point by point
    common.init("pp_tasks", str(LOCAL_TASK) if LOCAL_TASK.is_file() else "")
    all_configs = table2_configs()
    common.init("pp_t2_configs", list(all_configs))
    t1, t2 = st.columns([3, 2])
    tasks_text = t1.text_input(
        "Task files", key="pp_tasks",
        help="Comma-separated local lm-eval task YAML files (dataset_path: json, next to their JSON lines; see "
             "docs/paper.md). They run offline. The paper's seven tasks by name need the Hugging Face hub: "
             "`rcpu reproduce table2 --online --tasks boolq,piqa,...` from the command line.")
    chosen = t2.multiselect(f"Configs at {TABLE2_RATIO:.0%} (besides the dense model)", all_configs,
                            key="pp_t2_configs")
    st.caption(f"Each config prunes {TABLE2_RATIO:.0%} with {sizes.table_samples} calibration samples of "
               f"{sizes.seq_len} tokens ({sizes.name} sizes{', scaled' if scaled else ''}), then lm-eval scores "
               "the pruned model in memory; results are cached per model, pruning and task files' contents.")
    tasks = [t.strip() for t in tasks_text.split(",") if t.strip()]
    configs = tuple(c for c in all_configs if c in chosen)
    with common.guarded():
        result = run_zeroshot_experiment(lm, data, sizes, tasks, configs=configs, compute=False)
    left, right = st.columns([3, 2])
    chart = left.empty()
    chart.plotly_chart(figures.accuracy_figure(result["points"]), key=f"fig_table2_{len(result['points'])}")
    with right:
        st.markdown("**Published (LLaMA-7B, mean accuracy %)**")
        st.dataframe(result["published"], hide_index=True)
        st.markdown(f"**Measured ({lm.name}, mean accuracy %)**")
        measured = st.empty()
        measured.dataframe(result["measured"], hide_index=True)
    if result["missing"]:
        st.caption(f"{result['total'] - result['missing']} of {result['total']} results cached.")
        b1, b2 = st.columns([1.6, 4])
        start = b1.button(f"Compute {result['missing']} result{'s' if result['missing'] != 1 else ''}",
                          icon="▶️", type="primary", key="paper_t2_compute")
        b2.button("Stop", key="paper_t2_stop", help="Interrupts the computation; finished results stay cached.")
        if start:
            result = with_progress("zero-shot accuracy", "results", lambda **kw: run_zeroshot_experiment(
                lm, data, sizes, tasks, configs=configs, **kw))
            chart.plotly_chart(figures.accuracy_figure(result["points"]),
                               key=f"fig_table2_done_{len(result['points'])}")
            measured.dataframe(result["measured"], hide_index=True)
            st.success(f"All {result['total']} results computed and cached.")
    else:
        st.caption(f"All {result['total']} results cached: `rcpu reproduce table2 --sizes {sizes.name}"
                   + (" --scaled" if scaled else "") + f" --tasks {','.join(tasks)}"
                   + (f" --configs {','.join(configs)}" if configs and configs != all_configs else "")
                   + "` prints the same numbers.")
    common.model_status()
    st.stop()

with common.guarded():
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
    if name == "regime" and (lacking := layer_error_curve(result["points"])["without_errors"]):
        st.caption(f"{lacking} of {len(result['points'])} points were cached without layer errors (before sweep "
                   "points kept them): the right panel leaves them out.")
    for ratio, sentences in (result.get("against_rotation") or {}).items():
        for sentence in sentences.values():
            st.caption(f"At {float(ratio):.0%}, {sentence}.")

missing = result["missing"] + (result["dense"] is None)
if missing:
    st.caption(f"{result['total'] - result['missing']} of {result['total']} points cached"
               + ("; the dense perplexity is not cached yet" if result["dense"] is None else "") + ".")
    b1, b2 = st.columns([1.6, 4])
    compute = b1.button(f"Compute {result['missing']} point{'s' if result['missing'] != 1 else ''}" if
                        result["missing"] else "Compute the dense perplexity", icon="▶️", type="primary",
                        key="paper_compute")
    b2.button("Stop", key="paper_stop", help="Interrupts the computation; finished points stay cached.")
    if compute:
        result = with_progress("this experiment", "points", lambda **kw: run_experiment(lm, name, data, sizes, **kw))
        show(result)
        measured.dataframe(result["measured"], hide_index=True)
        st.success(f"All {result['total']} points computed and cached.")
else:
    st.caption(f"All {result['total']} points cached: `rcpu reproduce {name} --sizes {sizes.name}"
               + (" --scaled" if scaled else "") + "` prints the same numbers.")
common.model_status()
