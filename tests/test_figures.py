"""Figure functions: traces present, axis titles, kept + pruned = d_in; synthetic analyses only."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import pytest
import torch

from rcpu import figures
from rcpu.analysis import analyze_sublayer
from rcpu.compensate import METHODS, PRUNE_METHODS
from rcpu.learn import ToyConfig, build_example
from rcpu.plotgrid import Grid
from rcpu.scores import select
from rcpu.stats import LayerStats

ALL = list(METHODS)
D_OUT, D_IN, TOKENS = 10, 24, 300


def _inputs(seed: int, tokens: int = TOKENS) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-1, 1, D_IN, dtype=torch.float64)[torch.randperm(D_IN, generator=gen)]
    mean = torch.randn(D_IN, 1, generator=gen, dtype=torch.float64) * 2
    mix = torch.eye(D_IN, dtype=torch.float64) + 0.3 * torch.randn(D_IN, D_IN, generator=gen, dtype=torch.float64)
    return mix @ (scale[:, None] * torch.randn(D_IN, tokens, generator=gen, dtype=torch.float64)) + mean


@pytest.fixture(scope="module", params=[1, 4], ids=["channels", "heads"])
def analysis(request):
    unit = request.param
    weight = torch.randn(D_OUT, D_IN, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    calib = LayerStats.from_inputs(_inputs(2), sample_size=200)
    held = LayerStats.from_inputs(_inputs(3, 150), sample_size=100)
    result = analyze_sublayer(weight, calib, held, score="rcpu", ratio=0.25, methods=ALL, unit_size=unit)
    result.weight = weight  # for tests that need a second selection
    result.stats = calib
    return result


def _titles(fig: go.Figure, axis: str) -> list[str]:
    return [getattr(fig.layout[name].title, "text", None) for name in fig.layout if name.startswith(axis)]


def _n(values) -> int:
    return 0 if values is None else len(values)


def test_method_registry_has_colours_and_labels():
    assert set(figures.METHOD_COLORS) == set(PRUNE_METHODS)
    assert set(figures.METHOD_LABELS) == set(PRUNE_METHODS)


@pytest.mark.parametrize("order", ["index", "sorted"])
def test_dimension_figure_kept_and_pruned_cover_every_dimension(analysis, order):
    fig = figures.dimension_figure(analysis, order)
    assert len(fig.data) == 4  # kept / pruned on the score row and on the variance row
    for row_axis in ("y", "y2"):
        traces = [t for t in fig.data if t.yaxis == row_axis]
        assert {t.legendgroup for t in traces} == {"kept", "pruned"}
        assert sum(len(t.x) for t in traces) == analysis.d_in
        xs = np.concatenate([np.asarray(t.x) for t in traces])
        assert sorted(xs.tolist()) == list(range(analysis.d_in))
    kept = next(t for t in fig.data if t.legendgroup == "kept")
    assert len(kept.x) == len(analysis.selection.kept)
    assert fig.layout.yaxis.type == "log" and fig.layout.yaxis2.type == "log"
    assert "score" in fig.layout.yaxis.title.text and fig.layout.yaxis2.title.text == "variance"
    assert fig.layout.xaxis2.title.text
    assert fig.layout.title.text


def test_dimension_figure_marks_heads_for_o_proj(analysis):
    fig = figures.dimension_figure(analysis, "index")
    heads = [a.text for a in fig.layout.annotations if a.text.startswith("head")]
    if analysis.selection.unit_size > 1:
        assert heads == [f"head {u}" for u in range(D_IN // analysis.selection.unit_size)]
        assert len(fig.layout.shapes) > 0
    else:
        assert heads == []


def test_sorted_order_is_a_permutation_keeping_units_together(analysis):
    sel = analysis.selection
    position = figures.dimension_order(sel, "sorted")
    assert sorted(position.tolist()) == list(range(D_IN))
    unit = sel.unit_size
    by_position = np.argsort(position)  # column at each rank
    units_in_rank_order = by_position // unit
    # Each unit's columns are consecutive in rank order, and unit scores descend.
    blocks = units_in_rank_order.reshape(-1, unit)
    assert (blocks == blocks[:, :1]).all()
    unit_scores = sel.unit_scores.numpy()[blocks[:, 0]]
    assert (np.diff(unit_scores) <= 1e-12).all()
    with pytest.raises(ValueError):
        figures.dimension_order(sel, "random")


def test_unit_score_figure_has_one_bar_per_unit(analysis):
    fig = figures.unit_score_figure(analysis)
    sel = analysis.selection
    assert sum(len(t.x) for t in fig.data) == sel.unit_scores.numel()
    assert len(fig.data[1].x) == len(sel.pruned_units)
    assert fig.layout.xaxis.title.text in ("head", "channel")
    assert fig.layout.yaxis.type != "log"  # bars on a log axis make a small head look like zero
    assert fig.layout.yaxis.title.text


def test_overlap_counts_and_figure(analysis):
    first = analysis.selection
    second = select(analysis.weight, analysis.stats, "wanda_sp", 0.25, first.unit_size)
    counts = figures.overlap_counts(first, second)
    n = first.unit_scores.numel()
    assert counts["both_kept"] + counts["only_first"] + counts["only_second"] + counts["both_pruned"] == n
    assert 0.0 <= counts["jaccard"] <= 1.0
    same = figures.overlap_counts(first, first)
    assert same["jaccard"] == 1.0 and same["only_first"] == same["only_second"] == 0
    fig = figures.overlap_figure(first, second)
    assert len(fig.data) == 4
    assert sum(len(t.x) for t in fig.data) == n
    assert fig.layout.xaxis.title.text == "rcpu score" and fig.layout.yaxis.title.text == "wanda_sp score"
    assert fig.layout.xaxis.type == "log"


def test_mean_variance_figure(analysis):
    fig = figures.mean_variance_figure(analysis)
    assert [t.name.split(" ")[0] for t in fig.data] == ["kept", "pruned"]
    assert sum(len(t.x) for t in fig.data) == analysis.d_in
    assert fig.layout.xaxis.type == "log" and fig.layout.yaxis.type == "log"
    assert "mean" in fig.layout.xaxis.title.text and "variance" in fig.layout.yaxis.title.text


def lab(analysis, method: str) -> str:
    return figures.label(method, analysis.selection.score)


def test_labels_name_a_paper_only_for_its_score():
    assert figures.label("none", "wanda_sp") == "none (Wanda-sp)"
    assert figures.label("none", "rcpu") == "none" and figures.label("none") == "none"
    assert figures.label("rotation", "rcpu") == "rotation (RCPU)"
    assert figures.label("rotation", "wanda_sp") == "rotation"
    assert figures.label("rotation_scale", "rcpu") == "rotation + scale"  # only the paper's method is RCPU
    assert figures.label("bias", "fluctuation") == "bias (FLAP)" and figures.label("bias", "rcpu") == "bias"


def test_effective_ratio_text(analysis):
    sel = analysis.selection
    text = figures.effective_ratio_text(sel)
    what = "heads" if sel.unit_size > 1 else "channels"
    assert text == f"{len(sel.pruned_units)} / {sel.unit_scores.numel()} {what} = " \
                   f"{len(sel.pruned_units) / sel.unit_scores.numel():.0%}"


def no_duplicate_series(fig) -> None:
    names = [t.name for t in fig.data if t.name and t.showlegend is not False]
    assert len(names) == len(set(names)), names


def test_spectra_figure(analysis):
    methods = ["none", "ls", "rotation"]
    fig = figures.spectra_figure(analysis, methods)
    # "none" is the pruned Z itself: one series for both, named after both
    assert [t.name for t in fig.data] == ["original Y", "pruned Z = none"] + [lab(analysis, m) for m in methods[1:]]
    no_duplicate_series(fig)
    assert all(len(t.y) == min(64, D_OUT) for t in fig.data)
    assert fig.layout.yaxis.type == "log" and fig.layout.yaxis.dtick == 1  # no minor labels read as values
    assert fig.layout.xaxis.title.text and fig.layout.yaxis.title.text


def test_directions_figure_shows_alignment_with_y(analysis):
    methods = ["none", "ls", "rotation"]
    fig = figures.directions_figure(analysis, methods)
    assert all(isinstance(t, go.Heatmap) for t in fig.data)
    assert [t.name for t in fig.data] == ["pruned Z = none", lab(analysis, "ls"), lab(analysis, "rotation")]
    rot = np.asarray(fig.data[2].z)
    expected = figures.direction_cosines(analysis.basis.top, analysis.methods["rotation"].top_directions)
    np.testing.assert_allclose(rot, expected)
    assert rot.shape == (analysis.basis.top.shape[1],) * 2 and (rot >= 0).all() and (rot <= 1 + 1e-9).all()
    # Y's own directions against themselves: the identity
    np.testing.assert_allclose(figures.direction_cosines(analysis.basis.top, analysis.basis.top),
                               np.eye(rot.shape[0]), atol=1e-9)
    # a rotation's directions are Q times Z's: the cosines differ from Z's although the spectrum is the same
    assert not np.allclose(rot, np.asarray(fig.data[0].z))


def test_projection_figure_one_panel_per_method(analysis):
    methods = ["bias", "rotation", "rotation_scale", "ls"]
    fig = figures.projection_figure(analysis, methods)
    assert len(fig.data) == 2 * (1 + len(methods))  # original + approximation per panel
    titles = [a.text for a in fig.layout.annotations]
    assert titles[0] == "pruned Z" and titles[1:] == [lab(analysis, m) for m in methods]
    assert "PC1" in fig.layout.xaxis.title.text and "PC2" in fig.layout.yaxis.title.text
    m = analysis.projection_y.shape[1]
    assert 0 < len(fig.data[0].x) <= min(m, figures.PROJECTION_POINTS)
    with_none = figures.projection_figure(analysis, ["none", "rotation"])
    assert [a.text for a in with_none.layout.annotations] == ["pruned Z = none", lab(analysis, "rotation")]


def test_principal_angles_figure(analysis):
    fig = figures.principal_angles_figure(analysis, ["rotation", "ls"])
    assert len(fig.data) == 3
    assert len(fig.data[0].y) == analysis.principal_angles_z_deg.numel()
    assert "degrees" in fig.layout.yaxis.title.text


def test_geometry_figure_boxes_per_method(analysis):
    methods = ["none", "rotation", "ls"]
    fig = figures.geometry_figure(analysis, methods)
    assert len(fig.data) == 2 * len(methods)
    assert all(isinstance(t, go.Box) for t in fig.data)  # side by side, not overlaid histograms
    rot = [t for t in fig.data if t.name == lab(analysis, "rotation")]
    values = analysis.methods["rotation"].geometry["norm_ratio_values"].numpy()
    assert rot[0].median[0] == pytest.approx(float(np.median(values)))
    assert fig.layout.xaxis.title.text and fig.layout.xaxis2.title.text
    # a rotation keeps lengths: its norm ratios are those of no compensation (the page says why)
    none = [t for t in fig.data if t.name == lab(analysis, "none")]
    assert rot[0].median[0] == pytest.approx(none[0].median[0])


def test_inner_products_figure(analysis):
    fig = figures.inner_products_figure(analysis, ["rotation", "ls"])
    assert [t.name for t in fig.data][:2] == [lab(analysis, "rotation"), lab(analysis, "ls")]
    assert fig.data[-1].name == "ŷ = y"
    assert len(fig.data[0].x) == len(fig.data[0].y) > 0
    assert fig.layout.xaxis.title.text and fig.layout.yaxis.title.text


def test_gram_distortion_figure_values(analysis):
    fig = figures.gram_distortion_figure(analysis, ALL)
    assert list(fig.data[0].x) == [lab(analysis, m) for m in ALL]
    np.testing.assert_allclose(fig.data[0].y, [analysis.methods[m].geometry["gram_distortion"] for m in ALL])


def test_error_figure_includes_uncompensated_once(analysis):
    methods = ["ls", "rotation"]
    fig = figures.error_figure(analysis, methods)
    assert [t.name for t in fig.data] == ["calibration tokens", "held-out tokens"]
    assert list(fig.data[0].x) == ["uncompensated", lab(analysis, "ls"), lab(analysis, "rotation")]
    assert fig.data[1].y[0] == pytest.approx(analysis.error_uncompensated["heldout"])
    assert fig.data[0].y[1] == pytest.approx(analysis.methods["ls"].error_calibration)
    assert fig.layout.yaxis.title.text
    # with "none" selected, the pruned outputs are one bar named after it, not two identical bars
    fig = figures.error_figure(analysis, ["none", "rotation"])
    assert list(fig.data[0].x) == [lab(analysis, "none"), lab(analysis, "rotation")]


def test_singular_values_figure_only_rotations(analysis):
    fig = figures.singular_values_figure(analysis, ["ls", "rotation", "rotation_bias"])
    assert len(fig.data) == 2
    assert all(len(t.y) == D_OUT for t in fig.data)
    assert fig.layout.yaxis.type == "log"
    one = figures.singular_values_figure(analysis, ["rotation"])
    assert one.layout.showlegend is True  # the legend carries cond(M)
    empty = figures.singular_values_figure(analysis, ["ls", "none"])
    assert len(empty.data) == 0 and "rotation" in empty.layout.annotations[0].text


def test_condition_text_is_short():
    assert figures.condition_text({"singular_values_M": [1.0], "condition_number_M": 123456789012345678901}) \
        == "1.2e+20"
    assert figures.condition_text({}) == "–"


def test_method_table(analysis):
    rows = figures.method_table(analysis, ["none", "rotation"])
    assert [r["method"] for r in rows] == [lab(analysis, "none"), lab(analysis, "rotation")]
    assert rows[1]["‖Q − I‖_F"] != "–" and rows[0]["‖Q − I‖_F"] == "–"
    rows = figures.method_table(analysis, ["ls", "rotation"])
    assert rows[0]["method"] == "uncompensated"
    for row in rows:  # every row has every column, and no cell says None
        assert list(row) == list(rows[-1])
        assert all(v is not None and v != "None" for v in row.values())


def test_ppl_figure_axes_contain_the_points_and_the_dense_line():
    points = [{"config": "rcpu:rotation", "method": "rotation", "ratio": r, "ppl": p}
              for r, p in ((0.1, 11.0), (0.2, 14.5), (0.3, 30.0))]
    fig = figures.ppl_vs_ratio_figure(points, dense=9.26)
    lo, hi = fig.layout.yaxis.range
    assert fig.layout.yaxis.type == "linear" and lo <= 9.26 and hi >= 30.0 and hi < 40
    x0, x1 = fig.layout.xaxis.range
    assert x0 < 0.1 and x1 > 0.3 and x0 > -0.2 and x1 < 0.5
    dense = [t for t in fig.data if t.name == "dense 9.26"]
    assert dense and list(dense[0].y) == [9.26, 9.26] and not fig.layout.annotations
    no_duplicate_series(fig)
    one = figures.ppl_vs_ratio_figure(points[:1], dense=9.26)  # one ratio: a narrow range around it
    x0, x1 = one.layout.xaxis.range
    assert 0.0 <= x0 < 0.1 < x1 <= 0.2
    wide = figures.ppl_vs_ratio_figure(points + [{**points[0], "ratio": 0.6, "ppl": 900.0}], dense=9.26)
    lo, hi = wide.layout.yaxis.range  # log10 units on a log axis
    assert wide.layout.yaxis.type == "log" and 10 ** lo <= 9.26 and 900 <= 10 ** hi < 2000
    empty = figures.ppl_vs_ratio_figure([], dense=9.26)
    note = empty.layout.annotations[0]
    assert note.y > 0.6  # above the dense line (which lies mid-axis), not struck through by it


def test_ppl_vs_calibration_log_x_range():
    points = [{"config": "rcpu:rotation", "method": "rotation", "calib_samples": n, "ppl": 12.0} for n in (4, 32)]
    fig = figures.ppl_vs_calibration_figure(points, dense=10.0)
    x0, x1 = fig.layout.xaxis.range
    assert fig.layout.xaxis.type == "log" and 10 ** x0 < 4 and 10 ** x1 > 32


def test_regime_note():
    from rcpu.regime import regime_note

    assert "fewer tokens than dimensions" in regime_note(256, 576)
    assert "least squares" in regime_note(16384, 576) and "28.4 per dimension" in regime_note(16384, 576)


def test_figures_serialise(analysis):
    methods = ["none", "rotation"]
    for fig in (figures.dimension_figure(analysis), figures.projection_figure(analysis, methods),
                figures.error_figure(analysis, methods)):
        assert fig.to_json()


@pytest.mark.parametrize("dims", [2, 3])
def test_toy_figures(dims):
    example = build_example(ToyConfig(dims=dims, removed=0, calib_points=10))
    outputs = figures.toy_outputs_figure(example)
    names = {t.name for t in outputs.data}
    assert {"original y = W x", "pruned", "least squares", "rotation"} <= names
    if dims == 2:
        assert outputs.layout.xaxis.title.text == "output 1"
    if dims == 3:  # the camera far enough that "output 1" is not clipped at the chart's edge
        assert outputs.layout.scene.camera.eye.x >= 2.0
    columns = figures.toy_columns_figure(example)
    assert {"original W", "least squares", "rotation"} <= {t.name for t in columns.data}
    errors = figures.toy_error_figure(example)
    assert len(errors.data) == 2 and list(errors.data[0].x) == list(figures.TOY_NAMES)
    assert errors.data[1].y[2] == pytest.approx(example.errors["rotation"]["heldout"])


def test_stage_text_counts_layers_and_estimates_time_left():
    from rcpu.eta import StageText, duration_text

    now = [0.0]
    text = StageText(clock=lambda: now[0])
    assert text("prune", 0, 30, "layer 0") == (0.0, "Pruning: layer 1 of 30")  # no pace yet: no estimate
    now[0] = 10.0
    fraction, line = text("prune", 2, 30, "layer 2")
    assert fraction == pytest.approx(2 / 30) and line == "Pruning: layer 3 of 30 · about 2 min left"  # 5 s a layer
    assert text("prune", 30, 30, "done")[1] == "Pruning: all 30 layers done"
    assert "computed once" in text("dense", 4, 44, "perplexity")[1]
    assert duration_text(45) == "45 s" and duration_text(3725) == "1 h 02 min"

    # A greedy allocation's passes (costs, then one trial prune per spread) are steps of their own, each with
    # its own estimate, and they do not start the prune's clock.
    greedy = StageText(clock=lambda: now[0])
    now[0] = 0.0
    assert greedy("prune", 0, 30, "allocation: layer 0")[1] == "Allocation: layer 1 of 30"
    now[0] = 20.0
    assert greedy("prune", 10, 30, "allocation: layer 10")[1] == "Allocation: layer 11 of 30 · about 40 s left"
    trial = "allocation, trial of spread 1.5x"
    assert greedy("prune", 0, 30, f"{trial}: layer 0")[1] == "Allocation, trial of spread 1.5x: layer 1 of 30"
    now[0] = 30.0
    assert greedy("prune", 5, 30, f"{trial}: layer 5")[1].endswith("layer 6 of 30 · about 50 s left")
    assert greedy("prune", 30, 30, f"{trial}: done")[1] == "Allocation, trial of spread 1.5x: layer 30 of 30"
    assert greedy("prune", 0, 30, "layer 0") == (0.0, "Pruning: layer 1 of 30")  # the prune's own clock starts now


def test_every_paces_redraws_but_never_drops_the_first_or_last():
    from rcpu.eta import Every

    now = [0.0]
    every = Every(5.0, clock=lambda: now[0])
    said = []
    for layer in range(30):  # a layer every 2 s
        now[0] = 2.0 * layer
        said.append(every(last=layer == 29))
    assert said[0] and said[-1]  # the first layer's chart at once, the finished one always
    assert [i for i, yes in enumerate(said) if yes] == [0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 29]


def test_accounting_rows():
    from torch import nn

    from rcpu.accounting import module_rows, params_by_module, unit_rows

    rows = unit_rows({"heads": [270, 210], "kv_heads": [90, 90], "channels": [46080, 36864]})
    assert [r["units"] for r in rows] == ["attention heads", "KV heads", "MLP channels"]
    assert rows[0]["removed"] == 60 and rows[1]["removed"] == 0 and rows[0]["removed (%)"] == "22.2%"

    def model(d: int) -> nn.Module:
        m = nn.Module()
        m.layers = nn.ModuleList([nn.Module()])
        m.layers[0].q_proj = nn.Linear(4, d, bias=False)
        m.layers[0].o_proj = nn.Linear(d, 4, bias=False)
        return m

    before, after = params_by_module(model(8)), params_by_module(model(6))
    assert before == {"q_proj": 32, "o_proj": 32}
    assert module_rows(before, after)[0] == {"module": "q_proj", "parameters before": 32, "parameters after": 24,
                                             "saved": 8, "saved (%)": "25.0%"}


def test_messages_in_the_apps_words():
    from ui.common import for_the_page

    assert for_the_page("pass its local directory (--model /path/to/model), or use 'embedded'") == \
        "pass its local directory (type the folder into the sidebar's Model field), or use 'embedded'"
    assert for_the_page("too short for --seq-len 512") == "too short for Sequence length 512"
    assert for_the_page("cannot read /srv/cache/uploads/" + "ab" * 32 + ".txt: binary") == \
        "cannot read the uploaded file: binary"


def test_visible_keeps_one_point_per_occupied_cell_and_drops_only_hidden_ones():
    """The point-cloud reduction: the drawn points occupy exactly the cells the whole cloud occupies
    (the picture is the same at the chart's size), one each, and NaN / non-positive-on-log are left out."""
    rng = np.random.default_rng(0)
    dense = (rng.normal(size=5000), np.exp(rng.normal(size=5000)))
    sparse = (np.array([0.0, 100.0, np.nan, 3.0]), np.array([1.0, 2.0, 1.0, -1.0]))
    size = (300.0, 200.0)
    shown = figures._visible([dense, sparse], size, log=(False, True))
    x_all = np.concatenate([dense[0], sparse[0]])
    y_all = np.concatenate([dense[1], sparse[1]])
    ok = np.isfinite(x_all) & (y_all > 0)
    lo_x, span_x = x_all[ok].min(), np.ptp(x_all[ok])
    ly = np.log10(y_all[ok])
    lo_y, span_y = ly.min(), np.ptp(ly)
    cells = (int(size[0] / figures.CELL_PX), int(size[1] / figures.CELL_PX))

    def cell(x, y):
        cx = np.minimum(((x - lo_x) / span_x * cells[0]).astype(int), cells[0])
        cy = np.minimum(((np.log10(y) - lo_y) / span_y * cells[1]).astype(int), cells[1])
        return set(zip(cx.tolist(), cy.tolist()))

    drawn = shown[0]
    assert len(drawn) < 5000 and len(set(drawn.tolist())) == len(drawn)  # a real reduction, no repeats
    assert cell(dense[0][drawn], dense[1][drawn]) == cell(*dense)
    assert len(cell(dense[0][drawn], dense[1][drawn])) == len(drawn)  # one point per occupied cell
    assert shown[1].tolist() == [0, 1]  # NaN x and a negative y on a log axis are not drawn


@pytest.mark.parametrize("order", ["index", "sorted"])
def test_dimension_figure_with_many_columns_draws_kept_as_one_line_in_x_order(order, monkeypatch):
    """Above LINE_ABOVE columns the kept ones are a line through every kept column, left to right (the band
    their overlapping markers would draw), and the pruned ones markers; kept + pruned still cover d_in."""
    monkeypatch.setattr(figures, "LINE_ABOVE", 10)
    weight = torch.randn(D_OUT, D_IN, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    calib = LayerStats.from_inputs(_inputs(2), sample_size=200)
    held = LayerStats.from_inputs(_inputs(3, 150), sample_size=100)
    result = analyze_sublayer(weight, calib, held, score="rcpu", ratio=0.25, methods=["rotation"])
    fig = figures.dimension_figure(result, order)
    for row_axis in ("y", "y2"):
        kept = next(t for t in fig.data if t.yaxis == row_axis and t.legendgroup == "kept")
        pruned = next(t for t in fig.data if t.yaxis == row_axis and t.legendgroup == "pruned")
        assert kept.mode == "lines" and pruned.mode == "markers"
        assert len(kept.x) == len(result.selection.kept) and list(kept.x) == sorted(kept.x)
        assert sorted([*kept.x, *pruned.x]) == list(range(D_IN))


@pytest.mark.parametrize("rows, cols, shared", [(1, 4, None), (2, 3, None), (2, 1, "x"), (1, 2, "y")])
def test_grid_lays_out_panels_as_make_subplots_does(rows, cols, shared):
    """The explorer's panel figures skip make_subplots' validation (rcpu.plotgrid), not its layout."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from rcpu.plotgrid import Grid

    titles = [f"panel {i}" for i in range(rows * cols - 1)]  # one panel without a title
    kw = dict(rows=rows, cols=cols, horizontal_spacing=0.05, vertical_spacing=0.15,
              shared_xaxes=shared == "x", shared_yaxes=shared == "y")
    stock = make_subplots(subplot_titles=titles, **kw)
    grid = Grid(titles=titles, **kw)
    for r in range(1, rows + 1):
        for c in range(1, cols + 1):
            stock.add_trace(go.Scatter(x=[r], y=[c]), row=r, col=c)
            grid.add_trace(go.Scatter(x=[r], y=[c]), row=r, col=c)
    stock.update_xaxes(title_text="x title", dtick=1, row=rows, col=1)
    grid.update_xaxes(title_text="x title", dtick=1, row=rows, col=1)
    stock.update_yaxes(type="log")
    grid.update_yaxes(type="log")
    ours = grid.figure()
    assert [(t.xaxis, t.yaxis) for t in ours.data] == [(t.xaxis, t.yaxis) for t in stock.data]
    for name in [k for k in stock.layout.to_plotly_json() if k.startswith(("xaxis", "yaxis"))]:
        a, b = ours.layout[name], stock.layout[name]
        assert a.anchor == b.anchor and a.type == b.type and a.dtick == b.dtick, name
        assert a.title.text == b.title.text, name
        assert a.domain == pytest.approx(b.domain, abs=1e-9), name
        assert (a.matches, bool(a.showticklabels is False)) == (b.matches, bool(b.showticklabels is False)), name
    spots = [(n.text, round(n.x, 9), round(n.y, 9), n.xanchor, n.yanchor) for n in ours.layout.annotations]
    assert spots == [(n.text, round(n.x, 9), round(n.y, 9), n.xanchor, n.yanchor) for n in stock.layout.annotations]


def test_set_props_is_update_layout():
    """``set_props`` (each property set once) gives the figure ``update_layout`` gives: nested dicts
    merge into what is already set, other values replace it."""
    import json

    import plotly.graph_objects as go
    import plotly.io as pio

    from rcpu.plotgrid import set_props

    def made() -> go.Figure:
        fig = go.Figure(go.Scatter(x=[1, 2], y=[3, 4], name="a"))
        fig.update_layout(legend={"traceorder": "reversed", "font": {"color": "red"}},
                          title={"font": {"family": "serif"}}, annotations=[{"text": "old", "x": 0, "y": 0}])
        return fig

    props = {"title": {"text": "T", "x": 0.0, "pad": {"l": 8}, "font": {"size": 15}}, "height": 300,
             "legend": {"orientation": "h", "font": {"size": 9}}, "margin": {"l": 60},
             "annotations": [{"text": "new", "x": 1, "y": 1}]}
    stock, ours = made(), made()
    stock.update_layout(**props)
    set_props(ours.layout, props)
    assert json.loads(pio.to_json(ours)) == json.loads(pio.to_json(stock))


def test_layout_of_a_grid_is_the_layout_of_its_figure():
    """A grid gets the common look as it becomes a figure; the same look as set on the built figure."""
    import json

    import plotly.io as pio

    def grid() -> Grid:
        g = Grid(rows=1, cols=2, titles=["a", "b"])
        g.add_trace(go.Scatter(x=[1, 2], y=[1, 2], name="first"), row=1, col=1)
        g.add_trace(go.Scatter(x=[1, 2], y=[2, 1], name="second"), row=1, col=2)
        return g

    notes = [{"text": "extra", "x": 0.5, "y": 0.5, "xref": "paper", "yref": "paper", "showarrow": False}]
    ours = figures._layout(grid(), "title", height=300, subplot_titles=True, annotations=notes)
    built = figures._layout(grid().figure(annotations=notes), "title", height=300, subplot_titles=True)
    assert json.loads(pio.to_json(ours)) == json.loads(pio.to_json(built))
    assert ours.layout.title.text == "title" and ours.layout.legend.orientation == "h"
