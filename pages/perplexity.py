"""Perplexity versus pruning ratio (and versus calibration size), cached point by point."""

from __future__ import annotations

import streamlit as st

from rcpu import figures
from rcpu.allocate import ALLOCATIONS
from rcpu.compensate import LAMBDA_METHODS, PRUNE_METHODS
from rcpu.config import EvalConfig, PruneConfig, SweepConfig, parse_configs
from rcpu.eta import StageText
from rcpu.scores import SCORES
from rcpu.sweep import run_sweep, to_csv
from ui import common

RATIOS = [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6]
LAMBDAS = [1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 1e2, 1e3, 1e4, 1e5]  # the paper's Fig. 5 range
CONFIGS = [f"{s}:{m}" for s in SCORES for m in PRUNE_METHODS]
TARGET_LABELS = {"both": "both", "attn": "o_proj only", "mlp": "down_proj only"}
VIEWS = ["📈 Perplexity vs ratio", "🧪 Calibration size"]

data = common.sidebar()
st.title("📈 Perplexity vs ratio")
st.caption(
    "Each point prunes the whole model with one configuration and measures its perplexity. Points are "
    "cached on disk: those computed before appear at once; missing ones are computed on request."
)
lm = common.model()

d = common.defaults()
sizes = sorted({max(1, d.calib_samples // 4), max(1, d.calib_samples // 2), d.calib_samples})
start = SweepConfig()
for key, value in (("pv_ratios", list(start.ratios)), ("pv_configs", start.configs_text.split(",")),
                   ("pv_targets", start.targets), ("pv_view", VIEWS[0]), ("pv_sizes", sizes),
                   ("pv_size_ratio", PruneConfig.ratio), ("pv_lambdas", list(start.lambdas)),
                   ("pv_allocations", list(start.allocations))):
    common.init(key, value)

c = st.columns([2, 3, 1.2])
configs = c[1].multiselect("Configurations (score:method)", CONFIGS, key="pv_configs")
targets = c[2].radio("Targets", list(TARGET_LABELS), format_func=TARGET_LABELS.get, key="pv_targets")
view = st.radio("View", VIEWS, horizontal=True, key="pv_view", label_visibility="collapsed")
with c[0]:
    if view == VIEWS[0]:
        ratios = st.multiselect("Pruning ratios", RATIOS, format_func=lambda r: f"{r:.0%}", key="pv_ratios")
    else:
        size_options = sorted(set([1, 2, 4, 8, 16, 32, 64, 128, 256] + list(sizes)))
        calib_sizes = st.multiselect("Calibration samples", size_options, key="pv_sizes")
        size_ratio = st.select_slider("Pruning ratio", RATIOS, format_func=lambda r: f"{r:.0%}",
                                      key="pv_size_ratio")
lambdas = start.lambdas
if any(c.split(":")[1] in LAMBDA_METHODS for c in configs):
    lambdas = tuple(sorted(st.multiselect("λ of LS + ridge (each is a point)", LAMBDAS, key="pv_lambdas",
                                          format_func=lambda v: f"{v:g}"))) or start.lambdas
allocations = tuple(st.multiselect(
    "Ratios per layer (each is a line)", list(ALLOCATIONS), key="pv_allocations",
    help="uniform: the ratio in every layer; greedy: the same total per module, placed by calibration-fold "
         "error (method 'auto' chooses each sublayer's compensation the same way), as far from uniform as "
         "trial prunes judged on held-back calibration windows allow")) or start.allocations
eval_data, eval_windows = common.evaluation_settings("pv", data)

with common.guarded():
    pairs = parse_configs(",".join(configs)) if configs else ()
    if view == VIEWS[0]:
        spec = SweepConfig(ratios=tuple(sorted(ratios)), configs=pairs, targets=targets, lambdas=lambdas,
                           rounding=common.rounding(), allocations=allocations)
    else:
        spec = SweepConfig(ratios=(float(size_ratio),), configs=pairs, calib_samples=tuple(sorted(calib_sizes)),
                           targets=targets, lambdas=lambdas, rounding=common.rounding(), allocations=allocations)
    evaluation = EvalConfig(eval_data, eval_windows)
    cached = run_sweep(lm, data, spec, evaluation, compute=False)


def draw(points: list[dict], dense: dict | None):
    ppl = None if dense is None else dense["ppl"]
    if view == VIEWS[0]:
        return figures.ppl_vs_ratio_figure(points, ppl)
    return figures.ppl_vs_calibration_figure(points, ppl)


chart = st.empty()
chart.plotly_chart(draw(cached["points"], cached["dense"]), key="fig_sweep")
total = len(spec.points(data))
missing = cached["missing"] + (cached["dense"] is None)
done_note = st.session_state.pop("pv_done", None)
if not pairs or total == 0:
    st.info("Choose at least one configuration and one " + ("ratio." if view == VIEWS[0] else "calibration size."))
elif missing:
    controls = st.empty()  # caption and buttons: cleared while computing, redrawn after by a rerun
    with controls.container():
        st.caption(f"{total - cached['missing']} of {total} points cached"
                   + ("; the dense model's perplexity is not cached yet" if cached["dense"] is None else "") + ".")
        b1, b2 = st.columns([1.6, 4])
        label = f"Compute {cached['missing']} point{'s' if cached['missing'] != 1 else ''}" if cached["missing"] \
            else "Compute the dense perplexity"
        compute = b1.button(label, icon="▶️", type="primary", key="compute_points")
        b2.button("Stop", key="stop_points", help="Interrupts the computation; finished points stay cached.")
    if compute:
        controls.empty()
        stop_note = st.empty()  # Stop stays while computing (Compute and the stale count go)
        stop_note.button("Stop", key="stop_points_running",
                         help="Interrupts the computation; finished points stay cached.")
        overall = st.progress(0.0, text="Perplexity of the dense model (computed once, then cached)…"
                              if cached["dense"] is None else f"Point 1 of {cached['missing']}…")
        current = st.progress(0.0, text="")
        done_points: list[dict] = list(cached["points"])
        stage_text = StageText()
        state = {"point": 0, "n": cached["missing"]}

        def on_point(i: int, n: int, row: dict) -> None:
            if not row.get("cached"):
                done_points.append(row)
                state["point"] += 1
                chart.plotly_chart(draw(done_points, {"ppl": row["ppl_dense"]}))
                stage_text.starts.clear()
            overall.progress(state["point"] / max(state["n"], 1),
                             text=f"{state['point']} of {state['n']} points computed")

        def on_layer(done: int, n: int, what: str) -> None:
            fraction, text = stage_text("prune", done, n, what)
            point = min(state["point"] + 1, max(state["n"], 1))
            overall.progress(state["point"] / max(state["n"], 1), text=f"Point {point} of {state['n']}")
            current.progress(fraction, text=text)

        try:
            with common.guarded(), common.model_in_use("this sweep"):
                run_sweep(lm, data, spec, evaluation, compute=True, progress=on_layer, on_point=on_point)
        finally:
            overall.empty()
            current.empty()
            stop_note.empty()
        st.session_state["pv_done"] = f"All {total} points computed and cached."
        st.rerun()  # redraw from the cache: no stale caption, button or chart
if done_note and not missing:
    st.success(done_note)

rows = cached["points"]
if rows:
    columns = ("config", "allocation", "ratio", "calib_samples", "targets", "ppl", "ppl_dense", "params_after",
               "cached")
    st.dataframe([{k: r.get(k) for k in columns} for r in rows], hide_index=True)
    st.download_button("⬇️ Table (CSV)", to_csv(rows), file_name="rcpu-perplexity.csv", mime="text/csv",
                       on_click="ignore", key="download_csv")
common.model_status()
