"""Whole model: prune every layer sequentially, watch the per-layer errors, compare perplexity."""

from __future__ import annotations

import json
from pathlib import Path

import streamlit as st

from rcpu import figures
from rcpu.allocate import ALLOCATIONS
from rcpu.compensate import LAMBDA_METHODS, PRUNE_METHODS
from rcpu.config import EvalConfig, PruneConfig
from rcpu.export import save_pruned, zip_pruned
from rcpu.pipeline import prune_and_evaluate
from rcpu.reports import units_removed_text
from rcpu.scores import SCORES
from ui import common

RESULT = "whole_model_run"  # session-state key of the last run (kept across reruns, e.g. downloads)
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
method = c[3].selectbox("Compensation", list(PRUNE_METHODS), format_func=figures.label, key="wm_method")
allocation = st.radio("Ratios per layer", list(ALLOCATIONS), horizontal=True, key="wm_allocation",
                      help="uniform: the ratio in every layer. greedy: the same total per module, placed where "
                           "the error on a held-back part of the calibration windows rises least (layers then "
                           "differ in shape: not stock-loadable, rcpu.load_pruned loads it).")
eval_data, eval_windows = common.evaluation_settings("wm", data)
lam = start.lam
if method in LAMBDA_METHODS:
    lam = st.number_input("λ of LS + ridge (absolute, toward W_K)", 0.0, 1e8, format="%.1e", key="wm_lambda")
cfg = PruneConfig(ratio=float(ratio), targets=targets, score=score, method=method, lam=float(lam),
                  rounding=common.rounding(), allocation=allocation)
evaluation = EvalConfig(eval_data, eval_windows)

b1, b2 = st.columns([1.6, 4])
run = b1.button("✂️ Prune the model", type="primary", key="run_prune")
b2.button("Stop", key="stop_prune", help="Interrupts a running prune (so does changing any setting).")

if run:
    bar = st.progress(0.0, text="Preparing…")
    live = st.empty()
    records: list[dict] = []

    def on_layer(record: dict) -> None:
        records.append(record)
        live.plotly_chart(figures.layer_errors_figure(records, n_layers, cfg.sublayers))

    def on_progress(stage: str, done: int, total: int, what: str) -> None:
        if stage == "prune":
            text = f"Pruning: {what} of {total} layers"
        else:
            text = f"Perplexity of the {'dense' if stage == 'dense' else 'pruned'} model: {done}/{total}"
        bar.progress(min(done / max(total, 1), 1.0), text=text)

    with common.guarded(), common.model_in_use("this prune"):
        report = prune_and_evaluate(lm, data, cfg, evaluation, progress=on_progress, on_layer=on_layer)
    bar.empty()
    live.empty()
    st.session_state[RESULT] = {"report": report, "config": cfg, "data": data, "eval": evaluation}

last = st.session_state.get(RESULT)
if last is None:
    st.plotly_chart(figures.layer_errors_figure([], n_layers, cfg.sublayers), key="fig_layers_empty")
    st.info("Choose the settings and press **Prune the model**. With the default calibration "
            "settings this takes a few minutes on a CPU.")
    st.stop()

if (last["config"], last["data"], last["eval"]) != (cfg, data, evaluation):
    old = last["config"]
    st.warning(f"The results below are for an earlier run (ratio {old.ratio:.0%}, {old.targets}, "
               f"{old.score} + {figures.label(old.method)}). Press **Prune the model** to update them.")

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
st.caption(f"Perplexity on {summary['eval_tokens']} tokens of {summary['eval_data']}. Removed per layer: "
           f"{units_removed_text(summary)} ({summary['rounding']} rounding). Calibration tokens per input "
           f"dimension: {per_dim} (few favour rotation, many favour least squares).")
st.plotly_chart(figures.layer_errors_figure(result.layers, n_layers, result.config.sublayers),
                key="fig_layers")
if result.config.method == "auto":
    st.plotly_chart(figures.auto_choice_figure(result.layers, result.config.sublayers), key="fig_auto")
    st.caption("Each sublayer's compensation was chosen by its error on one half of the calibration windows "
               "after fitting on the other half (both ways), then refitted on all of them; the evaluation "
               "text is read only after the pruned model exists.")
st.plotly_chart(figures.allocation_heatmap(result.layers, result.config.sublayers), key="fig_allocation")
if result.config.allocation != "uniform":
    totals = ", ".join(f"`{sub}` {a['total_removed']} units (uniform: {a['uniform_total_removed']})"
                       for sub, a in summary["allocated"].items() if isinstance(a, dict))
    st.caption(f"Removed in total: {totals}.")
with st.expander("Per-layer table"):
    rows = [{"layer": r["layer"], "sublayer": sub, **{k: v for k, v in r[sub].items() if k != "auto"},
             **({"auto choice": r[sub]["auto"]["candidate"]} if "auto" in r[sub] else {}),
             **{f"{what} (before → after)": f"{a} → {b}" for what, (a, b) in r["shape"].items()}}
            for r in result.layers for sub in result.config.sublayers]
    st.dataframe(rows, hide_index=True)

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
d2.download_button("⬇️ Pruned model (zip)",
                   lambda: zip_pruned(result.model, lm.tokenizer, report.settings(), summary),
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
