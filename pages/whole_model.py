"""Whole model: prune every layer sequentially, watch the per-layer errors, compare perplexity."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import streamlit as st
import torch

from rcpu import figures
from rcpu.accounting import module_rows, params_by_module, unit_rows
from rcpu.allocate import ALLOCATIONS, FOLDS
from rcpu.compensate import LAMBDA_METHODS, PRUNE_METHODS
from rcpu.config import EvalConfig, PruneConfig
from rcpu.eta import Every, StageText
from rcpu.export import save_pruned, zip_pruned
from rcpu.footprint import benchmark_rows, compare, footprint, measure_speed, speed_sample
from rcpu.pipeline import prune_and_evaluate
from rcpu.reports import spread_text, units_removed_text
from rcpu.scores import SCORES
from rcpu.sweep import save_point
from ui import common

RESULT = "whole_model_run"  # session-state key of the last run (kept across reruns, e.g. downloads)
LIVE_CHART_EVERY_S = 5.0  # the live chart is redrawn at most this often (the browser's drawing shares the cores)
PARTIAL = "whole_model_partial"  # the per-layer records of a run in progress; left behind when it is stopped
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
TARGET_LABELS = {"both": "both (o_proj + down_proj)", "attn": "attention heads only (o_proj)",
                 "mlp": "MLP channels only (down_proj)"}

data = common.sidebar()
st.title("✂️ Whole model")
st.caption(
    "Prune every decoder layer in turn: each layer's statistics are collected on the outputs of the layers "
    "already pruned, then its heads / channels are removed and the kept weights compensated. "
    "The loaded model itself is never changed; the pruned copy can be downloaded."
)
lm = common.model()
n_layers = lm.adapter.num_layers

start = PruneConfig()
for key, value in (("wm_ratio", start.ratio), ("wm_targets", start.targets), ("wm_score", start.score),
                   ("wm_method", start.method), ("wm_lambda", start.lam), ("wm_allocation", start.allocation)):
    common.init(key, value)
c = st.columns([1.3, 1.6, 1, 1.3])
ratio = c[0].slider("Pruning ratio", 0.0, 0.8, step=0.05, key="wm_ratio")
targets = c[1].radio("Targets", list(TARGET_LABELS), format_func=TARGET_LABELS.get, key="wm_targets")
score = c[2].selectbox("Score", list(SCORES), key="wm_score")
method = c[3].selectbox("Compensation", list(PRUNE_METHODS), format_func=lambda m: figures.label(m, score),
                        key="wm_method")
allocation = st.radio("Ratios per layer", list(ALLOCATIONS), horizontal=True, key="wm_allocation",
                      help="uniform: the ratio in every layer. greedy: the same total per module, placed where "
                           "the error on a held-back part of the calibration windows rises least, as far from uniform "
                           "as trial prunes judged on held-back calibration windows allow (layers then differ in "
                           "shape: not stock-loadable, rcpu.load_pruned loads it).")
eval_data, eval_windows = common.evaluation_settings("wm", data)
lam = start.lam
if method in LAMBDA_METHODS:
    lam = st.number_input("λ of LS + ridge (absolute, toward W_K)", 0.0, 1e8, format="%.1e", key="wm_lambda")
cfg = PruneConfig(ratio=round(float(ratio), 4), targets=targets, score=score, method=method, lam=float(lam),
                  rounding=common.rounding(), allocation=allocation)
evaluation = EvalConfig(eval_data, eval_windows)

b1, b2 = st.columns([1.6, 4])
run = b1.button("✂️ Prune the model", type="primary", key="run_prune")
b2.button("Stop", key="stop_prune", help="Interrupts a running prune (so does changing any setting).")

if run:
    bar = st.progress(0.0, text="Preparing… (the dense model's perplexity is computed once, then cached)")
    live = st.empty()
    records: list[dict] = []
    # In session state as they come: Stop (or any widget change) ends this script run mid-way, and
    # the next run shows what was done instead of forgetting it.
    st.session_state[PARTIAL] = {"config": cfg, "layers": records}
    stage_text = StageText()
    redraw = Every(LIVE_CHART_EVERY_S)

    def on_layer(record: dict) -> None:
        records.append(record)
        if redraw(last=len(records) == n_layers):
            live.plotly_chart(figures.layer_errors_figure(records, n_layers, cfg.sublayers))

    def on_progress(stage: str, done: int, total: int, what: str) -> None:
        fraction, text = stage_text(stage, done, total, what)
        bar.progress(fraction, text=text)

    try:
        with common.guarded(), common.model_in_use("this prune"):
            try:
                report = prune_and_evaluate(lm, data, cfg, evaluation, progress=on_progress, on_layer=on_layer)
            except Exception:  # an error, not a stop (Streamlit's interruptions are not Exceptions)
                st.session_state.pop(PARTIAL, None)
                raise
            save_point(lm, data, evaluation, cfg, report)  # the sweep page then finds this point cached
    finally:
        bar.empty()  # no stale progress bar above an error
    live.empty()
    st.session_state.pop(PARTIAL, None)
    st.session_state[RESULT] = {"report": report, "config": cfg, "data": data, "eval": evaluation}

partial = st.session_state.get(PARTIAL)
if partial is not None and not run:
    done = len(partial["layers"])
    old = partial["config"]
    st.warning(f"Stopped: {done} of {n_layers} layers were pruned (ratio {old.ratio:.0%}, {old.targets}, "
               f"{old.score} + {figures.label(old.method, old.score)}) before the run was interrupted; "
               "their errors are below. No perplexity was measured. Press **Prune the model** to run again.",
               icon="⏹️")
    if done:
        st.plotly_chart(figures.layer_errors_figure(partial["layers"], n_layers, old.sublayers),
                        key="fig_layers_partial")

last = st.session_state.get(RESULT)
if last is None and partial is not None:
    st.stop()
if last is None:
    st.plotly_chart(figures.layer_errors_figure([], n_layers, cfg.sublayers), key="fig_layers_empty")
    st.info("Choose the settings and press **Prune the model**. With the default calibration "
            "settings this takes a few minutes on a CPU.")
    st.stop()

if (last["config"], last["data"], last["eval"]) != (cfg, data, evaluation):
    old = last["config"]
    st.warning(f"The results below are for an earlier run (ratio {old.ratio:.0%}, {old.targets}, "
               f"{old.score} + {figures.label(old.method, old.score)}). Press **Prune the model** to update them.")

report = last["report"]
result, summary = report.result, report.to_json()
m = st.columns(4)
removed = summary["params_removed_fraction"]
m[0].metric("Parameters", f"{summary['params_after'] / 1e6:.1f} M", delta=f"-{removed:.1%}", delta_color="off")
m[1].metric("Perplexity before", f"{summary['ppl_dense']:.2f}")
after, before = summary["ppl"], summary["ppl_dense"]
m[2].metric("Perplexity after", f"{after:.2f}", delta=f"{after - before:+.2f}", delta_color="inverse")
m[3].metric("Pruning time", f"{summary['timing_s']['prune']:.0f} s")
per_dim = ", ".join(f"`{s}` {v:.1f}" for s, v in summary["calibration_tokens_per_input_dim"].items())
st.caption(f"Perplexity on {summary['eval_tokens']} tokens of {summary['eval_data']}. Removed: "
           f"{units_removed_text(summary)} ({summary['rounding']} rounding). Calibration tokens per input "
           f"dimension: {per_dim} (few favour rotation, many favour least squares).")
st.plotly_chart(figures.layer_errors_figure(result.layers, n_layers, result.config.sublayers),
                key="fig_layers")
st.subheader("What was removed")
left, right = st.columns(2)
with left:
    st.dataframe(unit_rows(summary["shape"]), hide_index=True, width="stretch")
with right:
    st.dataframe(module_rows(params_by_module(lm.model), params_by_module(result.model)), hide_index=True,
                 width="stretch")
st.caption("Units and parameters summed over all layers, per module. A module whose parameters are not "
           "saved keeps its size although units were removed from another module's inputs.")
if result.config.method == "auto":
    st.plotly_chart(figures.auto_choice_figure(result.layers, result.config.sublayers), key="fig_auto")
    st.caption(f"Each sublayer's compensation was chosen by cross-validation on the calibration windows "
               f"(fitted on {FOLDS - 1} of {FOLDS} folds, measured on the last, each fold in turn), then refitted "
               "on all of them; the evaluation text is read only after the pruned model exists.")
st.plotly_chart(figures.allocation_heatmap(result.layers, result.config.sublayers), key="fig_allocation")
if result.config.allocation != "uniform":
    allocated = summary["allocated"]
    totals = ", ".join(f"`{sub}` {allocated[sub]['total_removed']} units (uniform: "
                       f"{allocated[sub]['uniform_total_removed']})" for sub in result.config.sublayers)
    st.caption(f"Removed in total: {totals}. {spread_text(allocated.get('spread'))}")
with st.expander("Per-layer table"):
    rows = [{"layer": r["layer"], "sublayer": sub, **{k: v for k, v in r[sub].items() if k != "auto"},
             **({"auto choice": r[sub]["auto"]["candidate"]} if "auto" in r[sub] else {}),
             **{f"{what} (before → after)": f"{a} → {b}" for what, (a, b) in r["shape"].items()}}
            for r in result.layers for sub in result.config.sublayers]
    st.dataframe(rows, hide_index=True)

st.subheader("What pruning buys")
if "footprint" not in last:  # shapes only: instant; speed is measured on request
    last["footprint"] = {"dense": footprint(lm.model), "pruned": footprint(result.model)}
sizes = last["footprint"]
s1, s2 = st.columns([1.6, 4])
if s1.button("⏱️ Measure speed", key="measure_speed",
             help="Forward and generation tokens/s of the dense and the pruned model, taking turns (a few seconds)."):
    with common.guarded(), common.model_in_use("the speed measurement"):
        ids, prompt = speed_sample(lm.model.config.vocab_size)
        speed = measure_speed({"dense": lm.model, "pruned": result.model}, ids, prompt, new_tokens=16, repeats=2)
    for key in sizes:
        sizes[key].update(speed[key])
s2.caption("Parameters, bytes of weights and KV-cache bytes per token are read from the pruned model's shapes; "
           "tokens/s are measured on this machine (best of 2, two windows of 128 tokens forward; 16 new tokens "
           "generated with the KV cache).")
rows = compare(sizes["dense"], sizes["pruned"])
st.plotly_chart(figures.footprint_figure(rows), key="fig_footprint")
measured = benchmark_rows()
if measured is not None:
    table, source = measured
    with st.expander("Measured by the size benchmark (embedded model and LLaMA-7B layer shapes)"):
        st.dataframe(table, hide_index=True, column_config={
            "ratio": st.column_config.NumberColumn(format="percent"),
            "parameters (M)": st.column_config.NumberColumn(format="%.1f"),
            "on disk (MiB)": st.column_config.NumberColumn(format="%.1f"),
            "forward × dense": st.column_config.NumberColumn(format="%.2f"),
            "generation × dense": st.column_config.NumberColumn(format="%.2f")})
        st.caption(f"`{source['command']}` on {source['machine']['nproc']} CPUs, {source['date'][:10]} "
                   f"({source['mode']} mode): score wanda_sp, both targets; shapes and speed are the same for "
                   "every compensation method.")

st.subheader("Downloads")
d1, d2 = st.columns(2)
name = f"rcpu-{result.config.score}-{result.config.method}-{round(result.config.ratio * 100)}pct"
d1.download_button("⬇️ Results (JSON)", json.dumps(summary, indent=2), file_name=f"{name}.json",
                   mime="application/json", on_click="ignore", key="download_json")
if summary["stock_loadable"]:
    loads = (f"A folder that stock transformers loads as {summary['stock_class']} "
             "(AutoModelForCausalLM.from_pretrained).")
else:
    loads = (f"Not loadable by stock transformers ({summary['why_not_stock']}); rcpu.load_pruned(folder) loads "
             "it exactly. Prune with balanced heads (CLI --gqa-balanced) for a stock folder.")
st.caption(loads)
source_dtype = str(getattr(lm.model.config, "torch_dtype", None) or lm.card.get("dtype", "float32"))
source_dtype = source_dtype.replace("torch.", "")
common.init("wm_zip_dtype", source_dtype if source_dtype in DTYPES else "bfloat16")
zip_dtype = d2.selectbox("Weights in the zip", list(DTYPES), key="wm_zip_dtype",
                         help=f"The source model's dtype is {source_dtype}; bfloat16 halves a float32 download.")


def _zip() -> bytes:
    model = result.model
    if next(model.parameters()).dtype != DTYPES[zip_dtype]:
        model = copy.deepcopy(model).to(DTYPES[zip_dtype])
    return zip_pruned(model, lm.tokenizer, {**report.settings(), "dtype": zip_dtype}, summary)


d2.download_button(f"⬇️ Pruned model (zip, {zip_dtype})", _zip,
                   file_name=f"{name}.zip", mime="application/zip", on_click="ignore", key="download_zip",
                   help=loads + " Built when you click; large.")
with st.expander("Save the pruned model to a folder on this machine"):
    folder = st.text_input("Folder (must not exist yet)", key="save_folder")
    if st.button("Save", key="save_pruned", disabled=not folder.strip()):
        with common.guarded(stop=False):
            out = save_pruned(result.model, lm.tokenizer, Path(folder.strip()).expanduser(),
                              record=report.settings())
            st.success(f"Saved to {out}")
common.model_status()
