"""Plotly figures for the app: results in, ``go.Figure`` out.

No Streamlit here: every figure the app shows is built by a function in this
module, so it can be unit-tested on synthetic results. Functions take the
library's result objects (``SublayerAnalysis``, ``Selection``, the toy example
of ``rcpu.learn``, whole-model and sweep records) and never compute the method's
math themselves; they only arrange, sort and colour what the library computed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from .analysis import SublayerAnalysis
from .compensate import METHODS
from .plotgrid import Grid, set_props
from .scores import Selection

KEPT = "#2563eb"
PRUNED = "#dc2626"
ORIGINAL = "#4b5563"
UNCOMPENSATED = "#9ca3af"
_PALETTE = (
    "#9ca3af",  # none
    "#f59e0b",  # bias
    "#dc2626",  # ls
    "#a855f7",  # ridge
    "#16a34a",  # rotation
    "#0891b2",  # rotation_scale
    "#65a30d",  # rotation_so
    "#db2777",  # rotation_bias
    "#0d9488",  # rotation_diag
)
METHOD_COLORS = {name: _PALETTE[i % len(_PALETTE)] for i, name in enumerate(METHODS)}
METHOD_COLORS["auto"] = "#111827"  # near black: a choice among the others, not one more of them
METHOD_LABELS = {
    "none": "none",
    "bias": "bias",
    "ls": "least squares",
    "ridge": "ridge",
    "rotation": "rotation",
    "rotation_scale": "rotation + scale",
    "rotation_so": "proper rotation",
    "rotation_bias": "rotation + bias",
    "rotation_diag": "rotation + diagonal",
    "ls_ridge": "LS + ridge (paper)",
    "auto": "auto (chosen per sublayer)",
}
MAX_POINTS = 1000  # per scatter trace; keeps figures light in the browser
PROJECTION_POINTS = 250  # per panel of the projection figure: up to ten panels redraw on every change
LINE_ABOVE = 600  # input dimensions above which the score chart draws the kept ones as a line
# Streamlit draws a chart anew (Plotly.newPlot) whenever its figure changes, so every widget change
# pays each chart's full drawing cost. In headless Chromium an SVG chart costs tens of ms plus a little per
# marker, a WebGL one about 300 ms whatever its markers (`python -m benchmarks.page`): SVG, with point clouds
# reduced to one marker per cell of a grid finer than a marker (``_visible``), draws fastest.
CELL_PX = 2.0  # grid cell of ``_visible``, in screen pixels; markers are 4 px and larger


# A published method is a score and a compensation together: its name tags the compensation only
# when the score is that method's score ("none" under the magnitude score is not Wanda-sp).
PAPER_METHODS = {("wanda_sp", "none"): "Wanda-sp", ("fluctuation", "bias"): "FLAP", ("rcpu", "rotation"): "RCPU"}


def label(method: str, score: str | None = None) -> str:
    """A compensation method's name for people; with the score, the paper it reproduces, if any."""
    name = METHOD_LABELS.get(method, method)
    paper = PAPER_METHODS.get((score, method))
    return f"{name} ({paper})" if paper else name


def _score_of(analysis) -> str | None:
    return getattr(getattr(analysis, "selection", None), "score", None)


def _log_axis(update, **kwargs) -> None:
    """A log axis labelled at powers of ten only: minor labels ("2 3 4 ...") read as values."""
    update(type="log", dtick=1, exponentformat="power", **kwargs)


def dash(value, fmt: str = ".3g") -> str:
    """A number for a table cell, or an en dash where there is none (never "None")."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(value, fmt) if isinstance(value, (int, float)) else str(value)


def color(method: str) -> str:
    return METHOD_COLORS.get(method, "#6b7280")


def _np(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().to(torch.float64).numpy()
    return np.asarray(values, dtype=np.float64)


def _thin(n: int, limit: int = MAX_POINTS) -> np.ndarray:
    """Evenly spaced indices of at most ``limit`` of ``n`` points (deterministic)."""
    if n <= limit:
        return np.arange(n)
    return np.linspace(0, n - 1, limit).round().astype(int)


def _visible(clouds: Sequence[tuple[np.ndarray, np.ndarray]], size_px: tuple[float, float],
             log: tuple[bool, bool] = (False, False)) -> list[np.ndarray]:
    """For point clouds drawn on the same axes (one per trace), the indices of each cloud's points
    to draw: the first point of every grid cell of ``CELL_PX`` screen pixels that the cloud occupies.

    A marker wider than a cell hides any other of the same trace in its cell, so the picture is the
    same at the chart's size; only overlapping markers (and their hover labels) are dropped.
    ``size_px``: the plot area in pixels; ``log``: which axes are logarithmic. Points that are not
    drawn anyway (NaN, or not positive on a log axis) are left out.
    """
    def coords(values: np.ndarray, is_log: bool) -> np.ndarray:
        v = np.asarray(values, dtype=np.float64)
        if is_log:
            with np.errstate(divide="ignore", invalid="ignore"):
                v = np.where(v > 0, np.log10(np.where(v > 0, v, 1.0)), np.nan)
        return v

    xs = [coords(x, log[0]) for x, _ in clouds]
    ys = [coords(y, log[1]) for _, y in clouds]
    finite = [np.isfinite(x) & np.isfinite(y) for x, y in zip(xs, ys)]
    if not any(f.any() for f in finite):
        return [np.zeros(0, dtype=int) for _ in clouds]
    spans = []
    for values in (xs, ys):
        seen = np.concatenate([v[f] for v, f in zip(values, finite)])
        lo, hi = float(seen.min()), float(seen.max())
        spans.append((lo, max(hi - lo, 1e-300)))
    cells = [max(1, int(extent / CELL_PX)) for extent in size_px]
    out = []
    for x, y, f in zip(xs, ys, finite):
        idx = np.nonzero(f)[0]
        cx = np.minimum(((x[idx] - spans[0][0]) / spans[0][1] * cells[0]).astype(np.int64), cells[0])
        cy = np.minimum(((y[idx] - spans[1][0]) / spans[1][1] * cells[1]).astype(np.int64), cells[1])
        _, first = np.unique(cx * (cells[1] + 1) + cy, return_index=True)
        out.append(idx[np.sort(first)])
    return out


def _legend_rows(traces: Sequence, width_px: float = 540.0) -> int:
    """Rough number of rows a horizontal legend takes in a half-width chart."""
    names = [t.name for t in traces if t.name and t.showlegend is not False]
    if not names:
        return 0
    rows, used = 1, 0.0
    for name in names:
        item = 40 + 6.5 * len(name)
        if used + item > width_px and used > 0:
            rows, used = rows + 1, 0.0
        used += item
    return rows


def _layout(fig: go.Figure | Grid, title: str, height: int = 380, subplot_titles: bool = False,
            **grid_layout) -> go.Figure:
    """Common look: title top left, horizontal legend under it, then the plot area. A ``Grid`` gets it
    (and ``grid_layout``) as it becomes a figure, the cheapest way Plotly takes a layout."""
    rows = _legend_rows(fig.traces if isinstance(fig, Grid) else fig.data)
    top = 42 + 26 * rows + (28 if subplot_titles else 6)
    look = {
        "title": {"text": title, "x": 0.0, "xanchor": "left", "xref": "container", "y": 1.0 - 8 / height,
                  "yref": "container", "yanchor": "top", "pad": {"l": 8}, "font": {"size": 15}},
        "height": height + top - 60,
        "margin": {"l": 60, "r": 20, "t": top, "b": 50},
        "legend": {"orientation": "h", "x": 0.0, "xanchor": "left", "y": 1.0 - 40 / (height + top - 60),
                   "yref": "container", "yanchor": "top"},
    }
    if isinstance(fig, Grid):
        return fig.figure(**grid_layout, **look)
    set_props(fig.layout, look)
    return fig


def _empty(title: str, message: str) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return _layout(fig, title, height=220)


def _positive(values: np.ndarray) -> np.ndarray:
    """Values for a log axis: non-positive entries become NaN (a gap, not an error)."""
    out = values.astype(np.float64).copy()
    out[~(out > 0)] = np.nan
    return out


# ---------------------------------------------------------------------------
# Scores: which dimensions go
# ---------------------------------------------------------------------------


def dimension_order(selection: Selection, order: str = "index") -> np.ndarray:
    """Column positions on the x axis: index order, or sorted by score (units kept together)."""
    d_in = selection.column_scores.numel()
    if order == "index":
        return np.arange(d_in)
    if order != "sorted":
        raise ValueError(f"order must be 'index' or 'sorted', got {order!r}")
    columns = _np(selection.column_scores)
    units = _np(selection.unit_scores)
    unit_of = np.arange(d_in) // selection.unit_size
    # Descending unit score, then descending column score within a unit.
    ranked = np.lexsort((-columns, -units[unit_of]))
    position = np.empty(d_in, dtype=int)
    position[ranked] = np.arange(d_in)
    return position


def dimension_figure(analysis: SublayerAnalysis, order: str = "index") -> go.Figure:
    """Per-dimension score and variance, kept versus pruned, in index order or sorted."""
    sel = analysis.selection
    scores = _np(sel.column_scores)
    variance = _np(analysis.variance)
    position = dimension_order(sel, order)
    kept, pruned = sel.kept.numpy(), sel.pruned.numpy()
    unit = sel.unit_size
    # Many columns (down_proj's 1536 on ~1200 px): the kept ones as one line in x order, which draws the band
    # their overlapping markers would at a fraction of the cost; the pruned ones stay markers on top.
    kept_line = analysis.d_in > LINE_ABOVE
    if kept_line:
        kept = kept[np.argsort(position[kept], kind="stable")]
    grid = Grid(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08)
    for row, values, name in ((1, scores, "score"), (2, variance, "variance")):
        groups = ((kept, "kept", KEPT), (pruned, "pruned", PRUNED))
        shown = _visible([(position[idx], values[idx]) for idx, _, _ in groups], (1200, 170), log=(False, True))
        for (all_idx, what, col), drawn in zip(groups, shown):
            line = kept_line and what == "kept"
            idx = all_idx if line else all_idx[drawn]
            custom = np.stack([idx, idx // unit], axis=1) if unit > 1 else idx[:, None]
            hover = "column %{customdata[0]}" + (", head %{customdata[1]}" if unit > 1 else "")
            grid.add_trace(
                go.Scatter(
                    x=position[idx], y=_positive(values[idx]), mode="lines" if line else "markers",
                    name=f"{what} ({len(all_idx)})", legendgroup=what, showlegend=row == 1, customdata=custom,
                    marker={"color": col, "size": 4 if analysis.d_in > 300 else 6},
                    line={"color": col, "width": 1}, connectgaps=True,
                    hovertemplate=hover + "<br>" + name + " %{y:.3g}<extra>" + what + "</extra>",
                ),
                row=row, col=1,
            )
        grid.update_yaxes(type="log", dtick=1, exponentformat="power",
                          title_text=name if row == 2 else f"score ({sel.score})", row=row, col=1)
    shapes, notes = [], []
    if unit > 1 and order == "index":
        n_units = sel.unit_scores.numel()
        shapes = [{"type": "rect", "xref": "x", "yref": "paper", "x0": u * unit - 0.5, "x1": (u + 1) * unit - 0.5,
                       "y0": 0, "y1": 1, "fillcolor": "#e5e7eb", "opacity": 0.5, "line_width": 0, "layer": "below"}
                  for u in range(0, n_units, 2)]
        notes = [{"x": (u + 0.5) * unit, "y": 1.0, "xref": "x", "yref": "paper", "yanchor": "bottom",
                  "text": f"head {u}" if n_units <= 12 else f"h{u}", "showarrow": False, "font": {"size": 10}}
                 for u in range(n_units)]
    xtitle = "input dimension" if order == "index" else "rank (highest score first" + (
        ", heads kept together)" if unit > 1 else ")")
    grid.update_xaxes(title_text=xtitle, row=2, col=1)
    title = (f"Score and variance per input dimension ({'sorted' if order == 'sorted' else 'index order'}): "
             f"{effective_ratio_text(sel)} pruned")
    return _layout(grid, title, height=470, subplot_titles=unit > 1 and order == "index", shapes=shapes,
                   annotations=notes)


def effective_ratio_text(selection: Selection) -> str:
    """What a ratio removes after rounding to whole units: ``"2 / 9 heads = 22%"``."""
    pruned, total = len(selection.pruned_units), selection.unit_scores.numel()
    what = "heads" if selection.unit_size > 1 else "channels"
    return f"{pruned} / {total} {what} = {pruned / max(total, 1):.0%}"


def unit_score_figure(analysis: SublayerAnalysis) -> go.Figure:
    """Score of each unit (for ``o_proj``: each head, the sum of its columns), kept versus pruned."""
    sel = analysis.selection
    units = _np(sel.unit_scores)
    fig = go.Figure()
    for idx, what, col in ((sel.kept_units.numpy(), "kept", KEPT), (sel.pruned_units.numpy(), "pruned", PRUNED)):
        fig.add_trace(go.Bar(x=idx, y=units[idx], name=f"{what} ({len(idx)})", marker_color=col,
                             text=[f"{v:.3g}" for v in units[idx]], textposition="outside", textfont={"size": 10}))
    name = "head" if sel.unit_size > 1 else "channel"
    fig.update_xaxes(title_text=name, dtick=1 if units.size <= 40 else None)
    # Linear: on a log axis a bar's length is its distance from an arbitrary floor, and a small head
    # looks like zero or like a large one.
    fig.update_yaxes(title_text=f"{sel.score} score (sum over {sel.unit_size} columns)", rangemode="tozero")
    return _layout(fig, f"Score per {name}: the lowest {len(sel.pruned_units)} go")


def overlap_counts(first: Selection, second: Selection) -> dict:
    """How the kept units of two selections agree."""
    a = set(first.kept_units.tolist())
    b = set(second.kept_units.tolist())
    n = first.unit_scores.numel()
    union = a | b
    return {
        "units": n,
        "both_kept": len(a & b),
        "only_first": len(a - b),
        "only_second": len(b - a),
        "both_pruned": n - len(union),
        "jaccard": len(a & b) / len(union) if union else 1.0,
    }


def overlap_figure(first: Selection, second: Selection) -> go.Figure:
    """Unit scores under two scores, coloured by whether each selection keeps the unit."""
    counts = overlap_counts(first, second)
    x, y = _np(first.unit_scores), _np(second.unit_scores)
    a = np.zeros(x.size, dtype=bool)
    a[first.kept_units.numpy()] = True
    b = np.zeros(x.size, dtype=bool)
    b[second.kept_units.numpy()] = True
    groups = (
        ("kept by both", a & b, KEPT),
        (f"kept by {first.score} only", a & ~b, "#f59e0b"),
        (f"kept by {second.score} only", ~a & b, "#a855f7"),
        ("pruned by both", ~a & ~b, PRUNED),
    )
    fig = go.Figure()
    members = [np.nonzero(mask)[0] for _, mask, _ in groups]
    shown = _visible([(x[idx], y[idx]) for idx in members], (480, 300), log=(True, True))
    for (name, _, col), all_idx, drawn in zip(groups, members, shown):
        idx = all_idx[drawn]
        fig.add_trace(go.Scatter(
            x=_positive(x[idx]), y=_positive(y[idx]), mode="markers", name=f"{name} ({len(all_idx)})",
            marker={"color": col, "size": 5 if x.size > 100 else 9}, customdata=idx,
            hovertemplate="unit %{customdata}<extra></extra>",
        ))
    _log_axis(fig.update_xaxes, title_text=f"{first.score} score")
    _log_axis(fig.update_yaxes, title_text=f"{second.score} score")
    title = f"Kept by {first.score} vs {second.score}: Jaccard {counts['jaccard']:.2f}"
    return _layout(fig, title, height=420)


def mean_variance_figure(analysis: SublayerAnalysis) -> go.Figure:
    """|mean| against variance per input dimension (log axes), kept versus pruned."""
    sel = analysis.selection
    mean = np.abs(_np(analysis.mean))
    var = _np(analysis.variance)
    fig = go.Figure()
    groups = ((sel.kept.numpy(), "kept", KEPT), (sel.pruned.numpy(), "pruned", PRUNED))
    shown = _visible([(mean[idx], var[idx]) for idx, _, _ in groups], (480, 300), log=(True, True))
    for (all_idx, what, col), drawn in zip(groups, shown):
        idx = all_idx[drawn]
        fig.add_trace(go.Scatter(
            x=_positive(mean[idx]), y=_positive(var[idx]), mode="markers", name=f"{what} ({len(all_idx)})",
            marker={"color": col, "size": 4 if analysis.d_in > 300 else 7, "opacity": 0.7},
            customdata=idx, hovertemplate="column %{customdata}<br>|mean| %{x:.3g}, var %{y:.3g}<extra></extra>",
        ))
    fig.update_xaxes(type="log", dtick=1, exponentformat="power", title_text="|mean| of the input dimension")
    fig.update_yaxes(type="log", dtick=1, exponentformat="power", title_text="variance of the input dimension")
    return _layout(
        fig, "Mean vs variance per input dimension", height=420,
    )


# ---------------------------------------------------------------------------
# Principal directions of the outputs
# ---------------------------------------------------------------------------


def _others(methods: Sequence[str]) -> list[str]:
    """``methods`` without ``none``: its outputs are the pruned ``Z`` itself, drawn once as the baseline."""
    return [m for m in methods if m != "none"]


def baseline_name(analysis: SublayerAnalysis, methods: Sequence[str], z: bool = False) -> str:
    """The pruned outputs' name: "none (score's paper)" when ``none`` is among ``methods``, one series
    for both (they are the same outputs), else "uncompensated"; ``z``: prefix "pruned Z"."""
    if "none" in methods:
        name = label("none", _score_of(analysis))
        return f"pruned Z = {name}" if z else name
    return "pruned Z" if z else "uncompensated"


def spectra_figure(analysis: SublayerAnalysis, methods: Sequence[str], top: int = 64) -> go.Figure:
    """Explained-variance spectra of Y, Z and each compensated output."""
    fig = go.Figure()
    score = _score_of(analysis)
    n = min(top, analysis.explained_variance_y.numel())
    comp = np.arange(1, n + 1)
    fig.add_trace(go.Scatter(x=comp, y=_positive(_np(analysis.explained_variance_y)[:n]), name="original Y",
                             line={"color": ORIGINAL, "width": 3}))
    fig.add_trace(go.Scatter(x=comp, y=_positive(_np(analysis.explained_variance_z)[:n]),
                             name=baseline_name(analysis, methods, z=True),
                             line={"color": UNCOMPENSATED, "dash": "dash", "width": 2}))
    for m in _others(methods):
        res = analysis.methods[m]
        fig.add_trace(go.Scatter(x=comp, y=_positive(_np(res.explained_variance)[:n]), name=label(m, score),
                                 line={"color": color(m), "width": 1.5}))
    fig.update_xaxes(title_text="principal component of the output")
    _log_axis(fig.update_yaxes, title_text="fraction of output variance")
    return _layout(fig, f"Explained-variance spectra (top {n} components)")


def direction_cosines(reference, directions) -> np.ndarray:
    """|cos| between unit principal directions: ``(r, r)``, row i = ``reference``'s i-th direction."""
    a, b = _np(reference), _np(directions)
    k = min(a.shape[1], b.shape[1])
    return np.abs(a[:, :k].T @ b[:, :k])


def directions_figure(analysis: SublayerAnalysis, methods: Sequence[str], columns: int = 4) -> go.Figure:
    """How ``Ŷ``'s top principal directions align with ``Y``'s, against ``Z``'s: |cos| heatmaps.

    Cell (i, j) of a panel is |cos| between ``Y``'s i-th and the output's j-th principal direction;
    a bright diagonal means the same directions in the same order. A rotation keeps ``Z``'s spectrum
    (the variances) but turns its directions, which is what this shows and a spectrum cannot.
    """
    score = _score_of(analysis)
    reference = analysis.basis.top  # (d_out, r)
    panels = [(baseline_name(analysis, methods, z=True), analysis.uncompensated)]
    panels += [(label(m, score), analysis.methods[m]) for m in _others(methods)]
    cols = min(columns, len(panels))
    rows = math.ceil(len(panels) / cols)
    cosines = [direction_cosines(reference, res.top_directions) for _, res in panels]
    # Best match per row: directions of nearly equal variance may swap order, which the diagonal misses.
    titles = [f"{name}<br>mean best |cos| {np.mean(c.max(axis=1)):.2f}" for (name, _), c in zip(panels, cosines)]
    grid = Grid(rows=rows, cols=cols, titles=titles, horizontal_spacing=0.04,
                vertical_spacing=0.2 if rows > 1 else 0.1)
    for i, c in enumerate(cosines):
        r, k = i // cols + 1, i % cols + 1
        idx = np.arange(1, c.shape[0] + 1)
        grid.add_trace(go.Heatmap(
            z=c, x=idx, y=idx, zmin=0, zmax=1, colorscale="Blues", showscale=i == 0, name=panels[i][0],
            colorbar={"title": {"text": "|cos|"}, "len": 0.8}, xgap=1, ygap=1,
            hovertemplate="Y's direction %{y}, this output's %{x}: |cos| %{z:.2f}<extra></extra>",
        ), row=r, col=k)
        grid.update_xaxes(title_text="output's direction", dtick=1, row=r, col=k)
        grid.update_yaxes(title_text="Y's direction" if k == 1 else None, dtick=1, autorange="reversed",
                          row=r, col=k)
    title = f"Alignment with Y's top {cosines[0].shape[0]} principal directions (|cos|; bright diagonal = aligned)"
    return _layout(grid, title, height=300 * rows + 40, subplot_titles=True)


def projection_figure(analysis: SublayerAnalysis, methods: Sequence[str], columns: int = 3) -> go.Figure:
    """Sample tokens on Y's top two principal components: original against pruned / compensated."""
    score = _score_of(analysis)
    panels = [(baseline_name(analysis, methods, z=True), analysis.projection_z, UNCOMPENSATED)]
    panels += [(label(m, score), analysis.methods[m].projection, color(m)) for m in _others(methods)]
    cols = min(columns, len(panels))
    rows = math.ceil(len(panels) / cols)
    grid = Grid(rows=rows, cols=cols, titles=[p[0] for p in panels], horizontal_spacing=0.06,
                vertical_spacing=0.16 if rows > 1 else 0.1)
    y = _np(analysis.projection_y)
    keep = _thin(y.shape[1], PROJECTION_POINTS)
    panel_px = (1200 / cols, 250)
    for i, (name, proj, col) in enumerate(panels):
        r, c = i // cols + 1, i % cols + 1
        p = _np(proj)
        on_y, on_p = (keep[d] for d in _visible([(y[0, keep], y[1, keep]), (p[0, keep], p[1, keep])], panel_px))
        grid.add_trace(go.Scatter(x=y[0, on_y], y=y[1, on_y], mode="markers", name="original Y",
                                  legendgroup="y", showlegend=i == 0,
                                  marker={"color": ORIGINAL, "size": 4, "opacity": 0.35}), row=r, col=c)
        grid.add_trace(go.Scatter(x=p[0, on_p], y=p[1, on_p], mode="markers", name=name, showlegend=False,
                                  marker={"color": col, "size": 4, "opacity": 0.6}), row=r, col=c)
        grid.update_xaxes(title_text="PC1 of Y", row=r, col=c)
        grid.update_yaxes(title_text="PC2 of Y" if c == 1 else None, row=r, col=c)
    return _layout(grid, "Tokens on the top two principal components of Y", height=330 * rows + 40,
                   subplot_titles=True)


def principal_angles_figure(analysis: SublayerAnalysis, methods: Sequence[str]) -> go.Figure:
    """Principal angles between the top-r output subspaces of Y and of Z / each Yhat."""
    score = _score_of(analysis)
    fig = go.Figure()
    z = _np(analysis.principal_angles_z_deg)
    r = np.arange(1, z.size + 1)
    fig.add_trace(go.Scatter(x=r, y=z, name=baseline_name(analysis, methods, z=True), mode="lines+markers",
                             line={"color": UNCOMPENSATED, "dash": "dash"}))
    for m in _others(methods):
        a = _np(analysis.methods[m].principal_angles_deg)
        fig.add_trace(go.Scatter(x=np.arange(1, a.size + 1), y=a, name=label(m, score), mode="lines+markers",
                                 line={"color": color(m)}))
    fig.update_xaxes(title_text="principal angle index", dtick=1)
    fig.update_yaxes(title_text="angle to Y's subspace (degrees)", rangemode="tozero")
    return _layout(fig, f"Principal angles between the top-{z.size} output subspaces")


# ---------------------------------------------------------------------------
# Geometry preservation
# ---------------------------------------------------------------------------


def geometry_figure(analysis: SublayerAnalysis, methods: Sequence[str]) -> go.Figure:
    """Per-token norm ratio and cosine for each method: one box per method (median, quartiles, 5-95%).

    Boxes side by side, not overlaid histograms: five translucent histograms on one axis cannot be told
    apart. The quantiles are computed here on every sample token, so the browser draws a few shapes.
    """
    score = _score_of(analysis)
    grid = Grid(rows=1, cols=2, titles=("norm ratio ‖ŷ‖ / ‖y‖", "cosine(ŷ, y)"), horizontal_spacing=0.12,
                shared_yaxes=True)
    names = [label(m, score) for m in methods]
    for c, key in ((1, "norm_ratio_values"), (2, "cosine_values")):
        for m, name in zip(methods, names):
            v = _np(analysis.methods[m].geometry[key])
            v = v[np.isfinite(v)]
            if not v.size:
                continue
            q05, q25, q50, q75, q95 = np.quantile(v, [0.05, 0.25, 0.5, 0.75, 0.95])
            grid.add_trace(go.Box(
                y=[name], q1=[q25], median=[q50], q3=[q75], lowerfence=[q05], upperfence=[q95],
                mean=[float(v.mean())], orientation="h", name=name, legendgroup=m, showlegend=False,
                marker_color=color(m), line={"color": color(m)}, fillcolor=color(m), opacity=0.75,
                hovertemplate=f"{name}<br>median %{{median:.3f}}<extra></extra>",
            ), row=1, col=c)
    grid.add_vline(x=1.0, line={"color": "black", "dash": "dot", "width": 1}, row=1, col=1)
    grid.add_vline(x=1.0, line={"color": "black", "dash": "dot", "width": 1}, row=1, col=2)
    grid.update_xaxes(title_text="‖ŷ_t‖ / ‖y_t‖ over sample tokens", row=1, col=1)
    grid.update_xaxes(title_text="cos(ŷ_t, y_t) over sample tokens", row=1, col=2)
    grid.update_yaxes(autorange="reversed", row=1, col=1)
    return _layout(grid, "Per-token geometry (box: quartiles, whiskers 5–95 %; 1 is perfect for both)",
                   height=max(260, 60 + 45 * len(methods)), subplot_titles=True)


def inner_products_figure(analysis: SublayerAnalysis, methods: Sequence[str]) -> go.Figure:
    """Inner products of compensated outputs against the original ones for token pairs."""
    score = _score_of(analysis)
    fig = go.Figure()
    y = _np(analysis.inner_products_y)
    keep = _thin(y.size, 400)
    values = {m: _np(analysis.methods[m].inner_products) for m in methods}
    shown = _visible([(y[keep], values[m][keep]) for m in methods], (480, 300))
    for m, drawn in zip(methods, shown):
        on = keep[drawn]
        fig.add_trace(go.Scatter(x=y[on], y=values[m][on], mode="markers", name=label(m, score),
                                 marker={"color": color(m), "size": 4, "opacity": 0.6}))
    if y.size:
        lo, hi = float(np.min(y)), float(np.max(y))
        fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="ŷ = y",
                                 line={"color": "black", "dash": "dot", "width": 1}))
    fig.update_xaxes(title_text="⟨y_t, y_u⟩ original")
    fig.update_yaxes(title_text="⟨ŷ_t, ŷ_u⟩ compensated")
    return _layout(fig, "Inner products of token pairs (diagonal = preserved)", height=420)


def gram_distortion_figure(analysis: SublayerAnalysis, methods: Sequence[str]) -> go.Figure:
    """Relative Gram distortion ‖Ŷᵀ Ŷ − Yᵀ Y‖_F / ‖Yᵀ Y‖_F per method."""
    score = _score_of(analysis)
    values = [analysis.methods[m].geometry["gram_distortion"] for m in methods]
    fig = go.Figure(go.Bar(x=[label(m, score) for m in methods], y=values,
                           marker_color=[color(m) for m in methods],
                           text=[f"{v:.3f}" for v in values], textposition="outside", name="Gram distortion"))
    fig.update_xaxes(title_text="method")
    fig.update_yaxes(title_text="relative Gram distortion", rangemode="tozero")
    return _layout(fig, "Gram distortion over sample tokens (lower is better)")


GEOMETRY_NOTE = (
    "A rotation keeps every length and every angle between tokens (Qᵀ Q = I), so its norm ratio and "
    "Gram distortion are exactly those of no compensation (none): it cannot repair them by design. "
    "What it changes is the direction of each token, the cosine to the original."
)


# ---------------------------------------------------------------------------
# Error and the spectrum of M
# ---------------------------------------------------------------------------


def error_figure(analysis: SublayerAnalysis, methods: Sequence[str]) -> go.Figure:
    """Relative output error on calibration and held-out tokens; the gap is overfitting.

    The pruned outputs come first, once: named after ``none`` when it is selected (same outputs).
    """
    score = _score_of(analysis)
    others = _others(methods)
    names = [baseline_name(analysis, methods)] + [label(m, score) for m in others]
    calib = [analysis.error_uncompensated["calibration"]] + [analysis.methods[m].error_calibration for m in others]
    held = [analysis.error_uncompensated["heldout"]] + [analysis.methods[m].error_heldout for m in others]
    fig = go.Figure()
    fig.add_trace(go.Bar(x=names, y=calib, name="calibration tokens", marker_color="#93c5fd",
                         text=[f"{v:.2f}" for v in calib], textposition="outside", textfont={"size": 10}))
    fig.add_trace(go.Bar(x=names, y=held, name="held-out tokens", marker_color="#1d4ed8",
                         text=[f"{v:.2f}" for v in held], textposition="outside", textfont={"size": 10}))
    fig.update_layout(barmode="group")
    fig.update_xaxes(title_text="method")
    fig.update_yaxes(title_text="‖Y − Ŷ‖_F / ‖Y‖_F", rangemode="tozero")
    return _layout(fig, "Relative output error: calibration vs held-out", height=400)


def condition_text(rot: dict) -> str:
    """``cond(M)`` for people: a number, or infinite with the rank when M is rank-deficient."""
    if rot.get("singular_values_M") is None:
        return "–"
    if rot.get("condition_number_M") is None:
        return f"∞ (rank {rot['rank_M']} of {len(rot['singular_values_M'])})"
    return f"{float(rot['condition_number_M']):.2g}"


def singular_values_figure(analysis: SublayerAnalysis, methods: Sequence[str]) -> go.Figure:
    """Singular values of M = Y Zᵀ for the rotation methods among ``methods``."""
    score = _score_of(analysis)
    rotations = [m for m in methods if analysis.methods[m].rotation.get("singular_values_M") is not None]
    title = "Singular values of M = Y Zᵀ"
    if not rotations:
        return _empty(title, "Select a rotation method to see the spectrum of M.")
    fig = go.Figure()
    for i, m in enumerate(rotations):
        rot = analysis.methods[m].rotation
        s = _np(rot["singular_values_M"])
        fig.add_trace(go.Scatter(
            x=np.arange(1, s.size + 1), y=_positive(s), mode="lines",
            line={"color": color(m), "dash": ("solid", "dash", "dot")[i % 3]},
            name=f"{label(m, score)}: cond {condition_text(rot)}, ‖Q − I‖ {rot['distance_from_identity']:.3g}",
        ))
    fig.update_xaxes(title_text="index")
    _log_axis(fig.update_yaxes, title_text="singular value of M")
    fig.update_layout(showlegend=True)  # one trace too: its name carries cond(M) and ‖Q − I‖
    return _layout(fig, title)


def method_table(analysis: SublayerAnalysis, methods: Sequence[str]) -> list[dict]:
    """One row per method, the pruned outputs first and once, numbers as text ("–" where none applies)."""
    score = _score_of(analysis)
    unc = analysis.error_uncompensated
    base = analysis.methods.get("none") if "none" in methods else None
    rows = [{
        "method": baseline_name(analysis, methods),
        "error (calibration)": dash(unc["calibration"]),
        "error (held-out)": dash(unc["heldout"]),
        "overfitting gap": dash(unc["heldout"] - unc["calibration"]),
        "mean cosine": dash(base.geometry["cosine"]["mean"] if base else None),
        "mean norm ratio": dash(base.geometry["norm_ratio"]["mean"] if base else None),
        "Gram distortion": dash(base.geometry["gram_distortion"] if base else None),
        "‖Q − I‖_F": "–",
        "cond(M)": "–",
        "seconds": dash(sum(base.seconds.values()) if base else None, ".2f"),
    }]
    for m in _others(methods):
        res = analysis.methods[m]
        rot = res.rotation
        rows.append({
            "method": label(m, score),
            "error (calibration)": dash(res.error_calibration),
            "error (held-out)": dash(res.error_heldout),
            "overfitting gap": dash(res.error_heldout - res.error_calibration),
            "mean cosine": dash(res.geometry["cosine"]["mean"]),
            "mean norm ratio": dash(res.geometry["norm_ratio"]["mean"]),
            "Gram distortion": dash(res.geometry["gram_distortion"]),
            "‖Q − I‖_F": dash(rot.get("distance_from_identity")),
            "cond(M)": condition_text(rot),
            "seconds": dash(sum(res.seconds.values()), ".2f"),
        })
    return rows


# ---------------------------------------------------------------------------
# Learn page: the toy example
# ---------------------------------------------------------------------------

TOY_NAMES = ("pruned", "least squares", "rotation")
SCENE_CAMERA = {"eye": {"x": 2.3, "y": 2.3, "z": 1.4}}  # far enough that axis titles stay inside the chart
TOY_COLORS = {"original": ORIGINAL, "pruned": UNCOMPENSATED, "least squares": METHOD_COLORS["ls"],
              "rotation": METHOD_COLORS["rotation"]}


def _segments(a: np.ndarray, b: np.ndarray) -> tuple[list, list, list]:
    """Line segments from each column of ``a`` to the same column of ``b`` (None-separated)."""
    xs, ys, zs = [], [], []
    for t in range(a.shape[1]):
        xs += [a[0, t], b[0, t], None]
        ys += [a[1, t], b[1, t], None]
        if a.shape[0] > 2:
            zs += [a[2, t], b[2, t], None]
    return xs, ys, zs


def toy_outputs_figure(example) -> go.Figure:
    """Original outputs against pruned, least-squares and rotation outputs (calibration points)."""
    y = _np(example.outputs["original"])
    if y.shape[0] == 3:
        return _toy_outputs_3d(example)
    fig = make_subplots(rows=1, cols=3, subplot_titles=[f"{n}: error {example.errors[n]['calibration']:.2f}"
                                                        for n in TOY_NAMES], horizontal_spacing=0.05,
                        shared_xaxes=True, shared_yaxes=True)
    for i, name in enumerate(TOY_NAMES, start=1):
        out = _np(example.outputs[name])
        xs, ys, _ = _segments(y, out)
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", line={"color": "#d1d5db", "width": 1},
                                 hoverinfo="skip", showlegend=False), row=1, col=i)
        fig.add_trace(go.Scatter(x=y[0], y=y[1], mode="markers", name="original y = W x", legendgroup="orig",
                                 showlegend=i == 1, marker={"color": ORIGINAL, "size": 7}), row=1, col=i)
        fig.add_trace(go.Scatter(x=out[0], y=out[1], mode="markers", name=name,
                                 marker={"color": TOY_COLORS[name], "size": 7, "symbol": "diamond"}), row=1, col=i)
        fig.update_xaxes(title_text="output 1", row=1, col=i)
        fig.update_yaxes(title_text="output 2" if i == 1 else None, row=1, col=i)
    return _layout(fig, f"Outputs after removing input dimension {example.removed + 1}: grey lines join "
                        "each original point to its approximation", height=420, subplot_titles=True)


def _toy_outputs_3d(example) -> go.Figure:
    fig = go.Figure()
    y = _np(example.outputs["original"])
    fig.add_trace(go.Scatter3d(x=y[0], y=y[1], z=y[2], mode="markers", name="original y = W x",
                               marker={"color": ORIGINAL, "size": 4}))
    for name in TOY_NAMES:
        out = _np(example.outputs[name])
        fig.add_trace(go.Scatter3d(x=out[0], y=out[1], z=out[2], mode="markers", name=name,
                                   marker={"color": TOY_COLORS[name], "size": 4, "symbol": "diamond"}))
    fig.update_layout(scene={"xaxis_title": "output 1", "yaxis_title": "output 2", "zaxis_title": "output 3",
                             "aspectmode": "data", "camera": SCENE_CAMERA})
    return _layout(fig, f"Outputs after removing input dimension {example.removed + 1}", height=520)


def toy_columns_figure(example) -> go.Figure:
    """The weight columns as arrows: original, least squares, rotation (2-D outputs)."""
    w = _np(example.weight)
    fig = go.Figure()
    series = [("original W", w, ORIGINAL, list(range(w.shape[1])))]
    series += [(name, _np(example.kept_weights[name]), TOY_COLORS[name], list(_np(example.kept).astype(int)))
               for name in ("least squares", "rotation")]
    for name, cols, col, idx in series:
        xs, ys, zs = _segments(np.zeros_like(cols), cols)
        if cols.shape[0] == 3:
            fig.add_trace(go.Scatter3d(x=xs, y=ys, z=zs, mode="lines", name=name, line={"color": col, "width": 5}))
        else:
            fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", name=name, line={"color": col, "width": 3}))
            # Text only on the original arrows: three labels per column overlapped where arrows are close.
            labelled = name == "original W"
            fig.add_trace(go.Scatter(x=cols[0], y=cols[1], mode="markers+text" if labelled else "markers",
                                     showlegend=False, text=[f"w{j + 1}" for j in idx],
                                     textposition="top center" if labelled else None,
                                     hovertemplate=name + ": %{text}<extra></extra>",
                                     marker={"color": col, "size": 6}, name=name))
    removed = int(example.removed)
    if w.shape[0] == 2:
        fig.add_trace(go.Scatter(x=[0, w[0, removed]], y=[0, w[1, removed]], mode="lines",
                                 name=f"removed column w{removed + 1}",
                                 line={"color": PRUNED, "width": 3, "dash": "dot"}))
        fig.update_xaxes(title_text="output 1")
        fig.update_yaxes(title_text="output 2", scaleanchor="x")
    else:
        fig.update_layout(scene={"xaxis_title": "output 1", "yaxis_title": "output 2", "zaxis_title": "output 3",
                                 "camera": SCENE_CAMERA})
    return _layout(fig, "Weight columns as arrows", height=420)


def toy_error_figure(example) -> go.Figure:
    """Toy errors on calibration and held-out points for pruned, least squares and rotation."""
    fig = go.Figure()
    for split, col in (("calibration", "#93c5fd"), ("heldout", "#1d4ed8")):
        values = [example.errors[n][split] for n in TOY_NAMES]
        fig.add_trace(go.Bar(x=list(TOY_NAMES), y=values, name="held-out points" if split == "heldout"
                             else "calibration points", marker_color=col,
                             text=[f"{v:.2f}" for v in values], textposition="outside"))
    fig.update_layout(barmode="group")
    fig.update_xaxes(title_text="approximation")
    fig.update_yaxes(title_text="relative error ‖Y − Ŷ‖ / ‖Y‖", rangemode="tozero")
    return _layout(fig, "Error on the fitted points and on new points", height=360)


# ---------------------------------------------------------------------------
# Whole model and sweeps
# ---------------------------------------------------------------------------


ERROR_SERIES = (
    ("error_calibration", "compensated, calibration", {"dash": "solid", "width": 2.5}, None),
    ("error_heldout", "compensated, held-out", {"dash": "dash", "width": 2.5}, None),
    ("error_uncompensated_calibration", "uncompensated, calibration", {"dash": "solid", "width": 1.5}, UNCOMPENSATED),
    ("error_uncompensated_heldout", "uncompensated, held-out", {"dash": "dash", "width": 1.5}, UNCOMPENSATED),
)
SUBLAYER_COLORS = {"o_proj": "#7c3aed", "down_proj": "#059669"}


def layer_errors_figure(layers: Sequence[dict], num_layers: int | None = None,
                        sublayers: Sequence[str] = ("o_proj", "down_proj")) -> go.Figure:
    """Per-layer relative output error of a sequential prune, compensated and not.

    ``layers``: ``PruneResult.layers`` records, ``{"layer": i, "o_proj": {"error_calibration": ...,
    "error_heldout": ..., "error_uncompensated_calibration": ..., ...}, "down_proj": {...}}``;
    they may arrive one at a time while the prune runs.
    """
    title = "Relative output error per layer (as each layer is pruned)"
    present = [s for s in sublayers if any(s in r for r in layers)] or list(sublayers)
    fig = make_subplots(rows=1, cols=len(present), subplot_titles=present, shared_yaxes=True,
                        horizontal_spacing=0.05)
    for c, sub in enumerate(present, start=1):
        rows = sorted((r for r in layers if sub in r), key=lambda r: r["layer"])
        for key, name, line, fixed in ERROR_SERIES:
            if rows and key not in rows[0][sub]:
                continue
            fig.add_trace(go.Scatter(
                x=[r["layer"] for r in rows], y=[r[sub][key] for r in rows], mode="lines+markers",
                name=name, legendgroup=name, showlegend=c == 1, marker={"size": 5},
                line=dict(color=fixed or SUBLAYER_COLORS.get(sub, "#6b7280"), **line),
            ), row=1, col=c)
        fig.update_xaxes(title_text="layer", row=1, col=c, range=[-0.5, num_layers - 0.5] if num_layers else None,
                         dtick=max(1, (num_layers or 10) // 10))
    fig.update_yaxes(title_text="‖Y − Ŷ‖_F / ‖Y‖_F", rangemode="tozero", row=1, col=1)
    if not layers:
        fig.add_annotation(text="Run the prune to see each layer's error as it goes.", showarrow=False,
                           x=0.5, y=0.5, xref="paper", yref="paper")
    return _layout(fig, title, height=400, subplot_titles=True)


def auto_choice_figure(layers: Sequence[dict], sublayers: Sequence[str] = ("o_proj", "down_proj")) -> go.Figure:
    """Which candidate ``auto`` chose in each layer and by how much it beat the runner-up.

    ``layers``: ``PruneResult.layers`` records whose sublayers carry ``"auto"`` (the choice);
    the bar is the runner-up's validation error over the winner's, minus 1, in percent.
    """
    title = "Auto: the compensation chosen per layer (bar: how far the runner-up was behind)"
    present = [s for s in sublayers if any("auto" in r.get(s, {}) for r in layers)]
    if not present:
        return _empty(title, "Prune with the method 'auto' to see its choices.")
    fig = make_subplots(rows=1, cols=len(present), subplot_titles=present, shared_yaxes=True,
                        horizontal_spacing=0.05)
    shown: set[str] = set()
    for c, sub in enumerate(present, start=1):
        rows = sorted((r for r in layers if "auto" in r.get(sub, {})), key=lambda r: r["layer"])
        for method in dict.fromkeys(r[sub]["auto"]["method"] for r in rows):
            mine = [r for r in rows if r[sub]["auto"]["method"] == method]
            choices = [r[sub]["auto"] for r in mine]
            fig.add_trace(go.Bar(
                x=[r["layer"] for r in mine],
                y=[100 * ch["margin"] / ch["validation_error"] if ch["validation_error"] > 0 else 0.0
                   for ch in choices],
                name=label(method), legendgroup=method, showlegend=method not in shown,
                marker_color=color(method),
                customdata=[[ch["candidate"], ch["validation_error"], ch["runner_up"]] for ch in choices],
                hovertemplate="layer %{x}: %{customdata[0]}<br>validation error %{customdata[1]:.4f}<br>"
                              "runner-up %{customdata[2]}, %{y:.2f}% worse<extra></extra>",
            ), row=1, col=c)
            shown.add(method)
        fig.update_xaxes(title_text="layer", row=1, col=c)
    fig.update_yaxes(title_text="runner-up worse by (%)", rangemode="tozero", row=1, col=1)
    return _layout(fig, title, height=360, subplot_titles=True)


def allocation_heatmap(layers: Sequence[dict], sublayers: Sequence[str] = ("o_proj", "down_proj")) -> go.Figure:
    """The share of units removed in each layer (x) and sublayer (y) of a prune."""
    title = "Ratio removed per layer and module"
    present = [s for s in sublayers if any("ratio" in r.get(s, {}) for r in layers)]
    if not present:
        return _empty(title, "Run the prune to see the ratio removed per layer.")
    rows = sorted(layers, key=lambda r: r["layer"])
    z = [[r[sub]["ratio"] if sub in r else None for r in rows] for sub in present]
    fig = go.Figure(go.Heatmap(
        z=z, x=[r["layer"] for r in rows], y=list(present), colorscale="Reds", zmin=0,
        colorbar={"title": "ratio"}, hovertemplate="layer %{x}, %{y}: %{z:.1%} removed<extra></extra>",
    ))
    fig.update_xaxes(title_text="layer")
    return _layout(fig, title, height=220 + 40 * len(present))


def _lines(points: Sequence[dict], x_key: str) -> list[go.Scatter]:
    traces = []
    for name in dict.fromkeys(p["config"] for p in points):
        rows = sorted((p for p in points if p["config"] == name), key=lambda p: p[x_key])
        method = rows[0].get("method")
        traces.append(go.Scatter(
            x=[r[x_key] for r in rows], y=[r["ppl"] for r in rows], mode="lines+markers", name=name,
            line={"color": color(method), "width": 2.5} if method in METHOD_COLORS else {"width": 2.5},
            marker={"size": 8},
        ))
    return traces


def _dense_line(fig: go.Figure, dense: float | None, x_range: list[float]) -> None:
    """The dense model's perplexity as a dotted line across the x range, named in the legend.

    A trace, not ``add_hline`` with an annotation: an annotation's y on a log axis is read as a
    power of ten (9.26 drew at 10^9.26 and stretched the axis to 1e8).
    """
    if dense is not None:
        fig.add_trace(go.Scatter(x=x_range, y=[dense, dense], mode="lines", name=f"dense {dense:.2f}",
                                 line={"color": "black", "dash": "dot", "width": 1.5}, hoverinfo="name"))


def _x_range(values: Sequence[float], pad: float, log: bool = False, default=(0.0, 0.6)) -> list[float]:
    """An x range that frames ``values`` (one value too) with a margin; log axes in log10 units."""
    if not values:
        return list(default)
    lo, hi = min(values), max(values)
    if log:
        lo, hi = math.log10(max(lo, 1e-12)), math.log10(max(hi, 1e-12))
    span = max(hi - lo, pad)
    return [lo - 0.15 * span, hi + 0.15 * span]


def _y_range(ppl: Sequence[float], dense: float | None) -> tuple[str, list[float]]:
    """Axis type and range that contain every perplexity and the dense line, with a margin.

    Log only when the values span more than a factor of 20; its range in log10 units.
    """
    values = [v for v in list(ppl) + ([dense] if dense is not None else []) if v and math.isfinite(v) and v > 0]
    if not values:
        return "linear", [0.0, 1.0]
    lo, hi = min(values), max(values)
    if hi / lo > 20:
        a, b = math.log10(lo), math.log10(hi)
        margin = 0.06 * (b - a)
        return "log", [a - margin, b + margin]
    margin = 0.08 * max(hi - lo, 0.05 * hi)
    return "linear", [max(0.0, lo - margin), hi + margin]


def _no_points_yet(fig: go.Figure, x_range: list[float]) -> None:
    """An empty perplexity chart: a note above the dense line (not struck through by it)."""
    fig.add_annotation(text="No points yet: compute them below.", showarrow=False, x=0.5, y=0.85,
                       xref="paper", yref="paper", bgcolor="white")
    fig.update_xaxes(range=x_range)


def _ppl_figure(points: Sequence[dict], dense: float | None, x_key: str, log_x: bool, title: str,
                x_title: str, default: tuple) -> go.Figure:
    xs = [p[x_key] for p in points]
    x_range = _x_range(xs, pad=1.0 if log_x else 0.1, log=log_x, default=default)
    fig = go.Figure(_lines(points, x_key))
    line_x = [10 ** v for v in x_range] if log_x else x_range
    _dense_line(fig, dense, line_x)
    kind, y_range = _y_range([p["ppl"] for p in points], dense)
    fig.update_xaxes(title_text=x_title, range=x_range, type="log" if log_x else "linear")
    fig.update_yaxes(title_text="perplexity", type=kind, range=y_range)
    if kind == "log":
        _log_axis(fig.update_yaxes, range=y_range)
    if not points:
        _no_points_yet(fig, x_range)
        if dense is None:  # no value at all: an axis from 0 to 1 would read as perplexities
            fig.update_yaxes(showticklabels=False, showgrid=False)
    fig.update_layout(showlegend=True)
    return _layout(fig, title, height=440)


def ppl_vs_ratio_figure(points: Sequence[dict], dense: float | None = None) -> go.Figure:
    """Perplexity against pruning ratio, one line per config, the dense model as a reference line.

    ``points``: sweep rows (``rcpu.sweep.prune_point``) with ``config``, ``method``, ``ratio``, ``ppl``.
    Both axes frame the points and the dense line (one ratio too).
    """
    fig = _ppl_figure(points, dense, "ratio", False, "Perplexity against pruning ratio", "pruning ratio",
                      (0.0, 0.6))
    fig.update_xaxes(tickformat=".0%")
    return fig


def ppl_vs_calibration_figure(points: Sequence[dict], dense: float | None = None) -> go.Figure:
    """Perplexity against the number of calibration samples, one line per config.

    ``points``: sweep rows with ``config``, ``method``, ``calib_samples``, ``ppl``.
    """
    return _ppl_figure(points, dense, "calib_samples", True, "Perplexity against calibration size",
                       "calibration samples", (0.0, 2.5))


def footprint_figure(rows: Sequence[dict]) -> go.Figure:
    """Pruned / dense for each measure of ``rcpu.footprint.compare``: below 1 is smaller, above 1 faster.

    ``rows``: ``{"measure", "dense", "pruned", "pruned / dense"}`` per measure.
    """
    title = "What pruning buys (pruned / dense)"
    if not rows:
        return _empty(title, "Prune the model to compare it with the dense one.")
    names = [r["measure"] for r in rows]
    ratios = [r["pruned / dense"] for r in rows]
    fig = go.Figure(go.Bar(
        x=ratios, y=names, orientation="h", marker={"color": ["#059669" if "tokens/s" in n else "#7c3aed"
                                                              for n in names]},
        text=[f"{v:.2f}×" for v in ratios], textposition="outside", cliponaxis=False,
        customdata=[[r["dense"], r["pruned"]] for r in rows],
        hovertemplate="%{y}: %{customdata[1]:,.4~g} against %{customdata[0]:,.4~g} dense<extra></extra>",
    ))
    fig.add_vline(x=1.0, line={"color": "black", "dash": "dot"})
    fig.update_xaxes(title_text="pruned / dense", range=[0, max(1.2, max(ratios) * 1.15)])
    fig.update_yaxes(autorange="reversed")
    return _layout(fig, title, height=120 + 34 * len(rows))


# The paper's experiments (rcpu.paper): figures shaped like the published ones, from sweep rows.

def _dense_reference(fig: go.Figure, dense: float | None) -> None:
    """The dense perplexity as a dotted line across a bar chart (a linear y axis)."""
    if dense is not None:
        fig.add_hline(y=dense, line={"color": "black", "dash": "dot"}, annotation_text=f"dense {dense:.2f}",
                      annotation_position="top left")


ABLATION_LABELS = {"none": "no compensation", "attn": "o_proj only", "mlp": "down_proj only", "both": "both"}
PAPER_TOKENS_PER_INPUT = {"LLaMA-7B, 128 x 128": 128 * 128 / 11008, "LLaMA-7B, 512 x 128": 512 * 128 / 11008}


def _bars(rows: Sequence[dict], group_key: str, groups: Sequence, title: str, dense: float | None,
          x_label) -> go.Figure:
    fig = go.Figure()
    for name in dict.fromkeys(r["config"] for r in rows):
        mine = {r[group_key]: r["ppl"] for r in rows if r["config"] == name}
        method = name.split(":")[-1].split()[0]
        fig.add_trace(go.Bar(x=[x_label(g) for g in groups], y=[mine.get(g) for g in groups], name=name,
                             marker_color=color(method), text=[f"{mine[g]:.2f}" if g in mine else "" for g in groups],
                             textposition="outside"))
    _dense_reference(fig, dense)
    fig.update_layout(barmode="group")
    fig.update_yaxes(title_text="perplexity")
    if not rows:
        return _empty(title, "No points yet: compute them below.")
    return _layout(fig, title, height=420)


def table1_figure(points: Sequence[dict], dense: float | None = None) -> go.Figure:
    """Table 1 as grouped bars: perplexity per ratio, one bar per config."""
    ratios = sorted({p["ratio"] for p in points})
    return _bars(points, "ratio", ratios, "Table 1: perplexity by method", dense, lambda r: f"{r:.0%}")


def ablation_figure(points: Sequence[dict], dense: float | None = None) -> go.Figure:
    """The ablation as bars: perplexity for each set of compensated sublayers."""
    rows = [{**p, "config": ABLATION_LABELS.get(p.get("compensate", "both"), p.get("compensate")),
             "group": "ratio " + f"{p['ratio']:.0%}"} for p in points]
    fig = go.Figure(go.Bar(x=[r["config"] for r in rows], y=[r["ppl"] for r in rows],
                           marker_color=[color("rotation") if r.get("compensate") != "none" else color("none")
                                         for r in rows],
                           text=[f"{r['ppl']:.2f}" for r in rows], textposition="outside", showlegend=False))
    _dense_reference(fig, dense)
    fig.update_xaxes(title_text="rotation applied to")
    fig.update_yaxes(title_text="perplexity")
    if not rows:
        return _empty("Ablation: which sublayers are compensated", "No points yet: compute them below.")
    return _layout(fig, "Ablation: which sublayers are compensated", height=420)


def calibration_curves_figure(points: Sequence[dict], dense: float | None = None) -> go.Figure:
    """Fig. 2: perplexity against calibration samples, one line per ratio."""
    fig = go.Figure()
    for ratio in sorted({p["ratio"] for p in points}):
        rows = sorted((p for p in points if p["ratio"] == ratio), key=lambda p: p["calib_samples"])
        fig.add_trace(go.Scatter(x=[r["calib_samples"] for r in rows], y=[r["ppl"] for r in rows],
                                 mode="lines+markers", name=f"{rows[0]['config']} at {ratio:.0%}"))
    x_range = _x_range([p["calib_samples"] for p in points], pad=1.0, log=True, default=(0.0, 2.7))
    _dense_line(fig, dense, [10**v for v in x_range])
    kind, y_range = _y_range([p["ppl"] for p in points], dense)
    sizes = sorted({p["calib_samples"] for p in points})
    # ticks at the measured sizes only: a log axis's minor labels ("3 4 5 ... 9") read as values
    fig.update_xaxes(title_text="calibration samples", type="log", range=x_range,
                     **({"tickvals": sizes, "ticktext": [str(n) for n in sizes]} if sizes else {}))
    fig.update_yaxes(title_text="perplexity", type=kind, range=y_range)
    if not points:
        _no_points_yet(fig, x_range)
    return _layout(fig, "Fig. 2: perplexity against calibration samples", height=440)


def _panels(n: int, titles: Sequence[str], rows: int = 1) -> go.Figure:
    cols = max(1, math.ceil(n / rows))
    return make_subplots(rows=rows, cols=cols, subplot_titles=list(titles), horizontal_spacing=0.08,
                         vertical_spacing=0.16)


def score_method_figure(points: Sequence[dict], dense: float | None = None) -> go.Figure:
    """Fig. 3: perplexity against ratio for each score:method, one panel per calibration size."""
    sizes = sorted({p["calib_samples"] for p in points}) or [0]
    fig = _panels(len(sizes), [f"{n} calibration samples" for n in sizes])
    shown: set[str] = set()
    for col, n in enumerate(sizes, start=1):
        mine = [p for p in points if p["calib_samples"] == n]
        for name in dict.fromkeys(p["config"] for p in mine):
            rows = sorted((p for p in mine if p["config"] == name), key=lambda p: p["ratio"])
            score, method = name.split(":")
            fig.add_trace(go.Scatter(
                x=[r["ratio"] for r in rows], y=[r["ppl"] for r in rows], mode="lines+markers", name=name,
                legendgroup=name, showlegend=name not in shown,
                line={"color": color(method), "dash": "dot" if score == "wanda_sp" else "solid"},
                # the score by marker too: with one ratio there is no line to show the dash
                marker={"symbol": "diamond-open" if score == "wanda_sp" else "circle", "size": 10,
                        "line": {"width": 2}},
            ), row=1, col=col)
            shown.add(name)
    x_range = _x_range([p["ratio"] for p in points], pad=0.1)
    kind, y_range = _y_range([p["ppl"] for p in points], dense)
    if dense is not None:  # a trace (a shape's y on a log axis would be read as a power of ten)
        for col in range(1, len(sizes) + 1):
            fig.add_trace(go.Scatter(x=x_range, y=[dense, dense], mode="lines", name=f"dense {dense:.2f}",
                                     legendgroup="dense", showlegend=col == 1, hoverinfo="name",
                                     line={"color": "black", "dash": "dot", "width": 1.5}), row=1, col=col)
    ratios = sorted({p["ratio"] for p in points})
    fig.update_xaxes(title_text="pruning ratio", range=x_range, tickvals=ratios, ticktext=[f"{r:.0%}" for r in ratios])
    fig.update_yaxes(title_text="perplexity", type=kind, range=y_range)
    if not points:
        return _empty("Fig. 3: score x compensation", "No points yet: compute them below.")
    return _layout(fig, "Fig. 3: score x compensation at two calibration sizes", height=440, subplot_titles=True)


def lambda_figure(points: Sequence[dict], dense: float | None = None) -> go.Figure:
    """Fig. 5: LS + ridge perplexity against lambda, rotation as a dashed line; a panel per (size, ratio)."""
    ridge = [p for p in points if p["method"] == "ls_ridge"]
    sizes = sorted({p["calib_samples"] for p in points})
    ratios = sorted({p["ratio"] for p in points})
    panels = [(n, r) for n in sizes for r in ratios]
    if not panels:
        return _empty("Fig. 5: LS + ridge against lambda", "No points yet: compute them below.")
    fig = make_subplots(rows=len(sizes), cols=len(ratios), horizontal_spacing=0.07, vertical_spacing=0.18,
                        subplot_titles=[f"{n} samples, {r:.0%}" for n, r in panels])
    for i, (n, r) in enumerate(panels):
        row, col = i // len(ratios) + 1, i % len(ratios) + 1
        curve = sorted((p for p in ridge if p["calib_samples"] == n and p["ratio"] == r), key=lambda p: p["lambda"])
        fig.add_trace(go.Scatter(x=[p["lambda"] for p in curve], y=[p["ppl"] for p in curve], mode="lines+markers",
                                 name="LS + ridge", legendgroup="ridge", showlegend=i == 0,
                                 line={"color": color("ls_ridge")}), row=row, col=col)
        rotation = [p for p in points if p["method"] == "rotation" and p["calib_samples"] == n and p["ratio"] == r]
        if rotation:
            fig.add_trace(go.Scatter(x=[1e-5, 1e5], y=[rotation[0]["ppl"]] * 2, mode="lines", name="RCPU rotation",
                                     legendgroup="rotation", showlegend=i == 0,
                                     line={"color": color("rotation"), "dash": "dash"}), row=row, col=col)
    fig.update_xaxes(type="log", title_text="λ", exponentformat="power")
    fig.update_yaxes(type="log", title_text="perplexity")
    return _layout(fig, "Fig. 5: LS + ridge against λ, rotation as a line", height=300 * len(sizes) + 80,
                   subplot_titles=True)


REGIME_NAMES = {"rcpu:ls": "LS", "rcpu:ls_ridge best λ": "LS + ridge (best λ)", "rcpu:rotation": "rotation",
                "rcpu:rotation_scale": "rotation + scale"}
SPLIT_WORDS = {"heldout": "held-out", "calibration": "calibration (in-sample)"}


REGIME_TICKS = (0.1, 0.25, 0.5, 1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)


def regime_figure(points: Sequence[dict], current: float | None = None, crossing: float | None = None
                  ) -> go.Figure:
    """Two panels against calibration tokens per ``down_proj`` input: perplexity (left) and the layer-level
    relative output error of ``down_proj`` averaged over the layers (right), for LS, best-lambda LS + ridge,
    rotation and rotation+scale; dotted lines where the paper's LLaMA-7B runs sit (1.5 and 5.95) and the
    current setting, a dashed one where LS overtakes rotation.

    ``points``: sweep rows (best-lambda rows already chosen, config ``rcpu:ls_ridge best λ``), each with
    ``tokens_per_down_input`` and, for the right panel, ``layer_errors`` (``rcpu.paper.layer_error_curve``:
    held-out errors where every point has them, else calibration errors, said in the panel's title).
    """
    from .paper import layer_error_curve

    curve = layer_error_curve(list(points))
    split = SPLIT_WORDS.get(curve["split"], "held-out")
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.1, subplot_titles=[
        "perplexity", f"down_proj {split} relative error, mean over layers"])
    configs = list(dict.fromkeys(p["config"] for p in points))
    for name in configs:
        method = name.split(":")[-1].split()[0]
        style = {"color": color(method), "width": 2.5}
        label = REGIME_NAMES.get(name, name)
        rows = sorted((p for p in points if p["config"] == name), key=lambda p: p["tokens_per_down_input"])
        fig.add_trace(go.Scatter(x=[r["tokens_per_down_input"] for r in rows], y=[r["ppl"] for r in rows],
                                 mode="lines+markers", name=label, legendgroup=name, line=style,
                                 hovertemplate=f"{label}: %{{y:.3f}} at %{{x:.3g}} tokens per input<extra></extra>"),
                      row=1, col=1)
        rows = sorted((p for p in curve["rows"] if p["config"] == name), key=lambda p: p["tokens_per_down_input"])
        fig.add_trace(go.Scatter(x=[r["tokens_per_down_input"] for r in rows], y=[r["layer_error"] for r in rows],
                                 mode="lines+markers", name=label, legendgroup=name, showlegend=False, line=style,
                                 hovertemplate=f"{label}: {split} error %{{y:.4f}} at %{{x:.3g}}<extra></extra>"),
                      row=1, col=2)
    # the error of removing the same units without compensation (every method shares the selection at a size)
    reference = {r["tokens_per_down_input"]: r["layer_error_uncompensated"] for r in curve["rows"]}
    if reference:
        xs = sorted(reference)
        fig.add_trace(go.Scatter(x=xs, y=[reference[x] for x in xs], mode="lines", name="no compensation",
                                 line={"color": "#111827", "dash": "dashdot", "width": 1.5},
                                 hovertemplate=f"no compensation: {split} error %{{y:.4f}}<extra></extra>"),
                      row=1, col=2)
    marks = dict(PAPER_TOKENS_PER_INPUT)
    if current is not None:
        marks["current settings"] = current
    # Lines as shapes (data units) and their labels as annotations, whose x on a log axis is log10(x).
    for i, (what, x) in enumerate(marks.items()):
        fig.add_vline(x=x, line={"color": "#6b7280" if what != "current settings" else "#111827", "dash": "dot"},
                      row=1, col="all")
        fig.add_annotation(x=math.log10(x), y=1.0 - 0.06 * i, xref="x", yref="paper", text=f"{what}: {x:.2g}",
                           showarrow=False, xanchor="left", bgcolor="white")
    if crossing is not None:
        fig.add_vline(x=crossing, line={"color": color("ls"), "dash": "dash"}, row=1, col="all")
        fig.add_annotation(x=math.log10(crossing), y=0.02, xref="x", yref="paper",
                           text=f"LS overtakes rotation: {crossing:.2g}", showarrow=False, xanchor="left",
                           bgcolor="white")
    xs = [p["tokens_per_down_input"] for p in points] + list(marks.values())
    ticks = [t for t in REGIME_TICKS if xs and min(xs) / 1.5 <= t <= max(xs) * 1.5]
    # labelled ticks only: a log axis's minor labels ("3 4 5 ... 9") read as values
    fig.update_xaxes(title_text="calibration tokens per down_proj input dimension", type="log", tickvals=ticks,
                     ticktext=[f"{t:g}" for t in ticks])
    fig.update_xaxes(matches="x", row=1, col=2)  # one x range for both panels
    # LS with fewer tokens than inputs reaches perplexities of 1e10 and errors of 10x the output: each axis
    # keeps the readable range (values up to ten times the median) and its title says what lies above it
    for col, rows, key, title in ((1, list(points), "ppl", "perplexity"),
                                  (2, curve["rows"], "layer_error", f"relative output error ({split})")):
        values = sorted(r[key] for r in rows if r.get(key) is not None and math.isfinite(r[key]) and r[key] > 0)
        if not values:
            continue
        limit = 10 * values[len(values) // 2]
        axis, y_range = _y_range([v for v in values if v <= limit], None)
        above = sorted((r for r in rows if r[key] > limit), key=lambda r: r["tokens_per_down_input"])
        if above:
            text = ", ".join(f"{REGIME_NAMES.get(r['config'], r['config'])} {r[key]:.2g} at "
                             f"{r['tokens_per_down_input']:.2g}" for r in above)
            panel = fig.layout.annotations[col - 1]  # the subplot titles come first
            panel.text = f"{panel.text}<br><sup>above the axis: {text}</sup>"
        fig.update_yaxes(title_text=title, type=axis, range=y_range, row=1, col=col)
    if not points:
        fig.add_annotation(text="No points yet: compute them below.", showarrow=False, x=0.5, y=0.5,
                           xref="paper", yref="paper")
    elif not curve["rows"]:
        fig.add_annotation(text="These points were cached without layer errors.", showarrow=False, x=0.5,
                           y=0.5, xref="x2 domain", yref="y2 domain")
    return _layout(fig, "Regime: perplexity and layer error against calibration tokens per input dimension",
                   height=460, subplot_titles=True)


def accuracy_figure(points: Sequence[dict]) -> go.Figure:
    """Table 2 as bars: mean zero-shot accuracy per config (``points`` with ``config`` and ``mean_accuracy``)."""
    if not points:
        return _empty("Table 2: mean zero-shot accuracy", "No points yet: compute them below.")
    fig = go.Figure(go.Bar(x=[p["config"] for p in points], y=[100 * p["mean_accuracy"] for p in points],
                           marker_color=[color(p["config"].split(":")[-1]) for p in points],
                           text=[f"{100 * p['mean_accuracy']:.1f}" for p in points], textposition="outside"))
    fig.update_yaxes(title_text="mean accuracy (%)")
    return _layout(fig, "Table 2: mean zero-shot accuracy", height=420)


def paper_figure(result: dict, current: float | None = None) -> go.Figure:
    """The figure of one of the paper's experiments from ``rcpu.paper.run_experiment``'s result."""
    from .paper import best_lambda

    name, rows = result["experiment"], result["points"]
    dense = None if result.get("dense") is None else result["dense"]["ppl"]
    if name == "table1":
        return table1_figure(rows, dense)
    if name == "ablation":
        return ablation_figure(rows, dense)
    if name == "fig2":
        return calibration_curves_figure(rows, dense)
    if name == "fig3":
        return score_method_figure(rows, dense)
    if name == "fig5":
        return lambda_figure(rows, dense)
    if name == "regime":
        shown = [r for r in rows if r["method"] != "ls_ridge"] + best_lambda(rows)
        crossing = (result.get("ls_overtakes_rotation_at") or {}).get("0.2", {}).get("rcpu:ls")
        return regime_figure(shown, current, crossing)
    if name == "table2":
        return accuracy_figure(rows)
    raise ValueError(f"no figure for {name!r}")
