"""``--method auto`` (per-sublayer choice on calibration folds) and ``--allocation greedy``."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from conftest import make_tiny_llama
from conftest import random_tokens as _tokens
from conftest import tiny_lm as _lm

from rcpu.allocate import (
    HOLD_BACK,
    SPREADS,
    STAND_IN_ALPHA,
    allocate,
    capped,
    greedy_counts,
    grid_counts,
    heldback_split,
    trial_fit,
)
from rcpu.compensate import (
    AUTO_CANDIDATES,
    AUTO_RIDGE_GRID,
    METHODS,
    Regularisation,
    compensate_problem,
    validation_errors,
)
from rcpu.config import DataConfig, PruneConfig
from rcpu.problem import KeptProblem
from rcpu.prune import prune_model
from rcpu.stats import LayerStats, StatsAccumulator


def _fold_stats(windows: torch.Tensor, folds: int = 2, batch: int = 3) -> LayerStats:
    acc = StatsAccumulator(windows.shape[-1], sample_size=0, folds=folds)
    for start in range(0, len(windows), batch):  # batches of windows, as the hooks see them
        acc.add(windows[start : start + batch])
    return acc.finish()


def test_folds_are_whole_windows_alternating_and_sum_to_the_full_statistics():
    gen = torch.Generator().manual_seed(0)
    windows = torch.randn(7, 5, 6, generator=gen, dtype=torch.float64)  # (windows, tokens, d_in)
    stats = _fold_stats(windows)
    full = LayerStats.from_inputs(windows.reshape(-1, 6).T, sample_size=0)
    for i, fold in enumerate(stats.folds):
        own = windows[i::2].reshape(-1, 6)  # window w goes to fold w % 2, across batches
        torch.testing.assert_close(fold.gram, own.T @ own)
        assert fold.count == own.shape[0]
    torch.testing.assert_close(stats.gram, full.gram)
    torch.testing.assert_close(stats.total, full.total)
    assert stats.count == full.count == 35


def _problem(tokens: int, d_in: int = 12, d_out: int = 5, seed: int = 0, kept: int = 8, folds: int = 2):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(d_in, d_in, generator=gen, dtype=torch.float64)
    windows = (torch.randn(tokens // 4, 4, d_in, generator=gen, dtype=torch.float64) @ mix) + 0.5
    weight = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
    return KeptProblem(weight, _fold_stats(windows, folds), torch.arange(kept)), weight, windows


@pytest.mark.parametrize("folds", [2, 3])
def test_validation_error_is_the_cross_validation_error_over_the_folds(folds):
    """Fit on every fold but one (from their windows, not from Gram differences), measure on that one."""
    problem, weight, windows = _problem(64, folds=folds)
    errors = validation_errors(problem, Regularisation())
    assert set(errors) == set(AUTO_CANDIDATES) | {f"ls_ridge@{a:g}" for a in AUTO_RIDGE_GRID}
    expect = 0.0
    for i in range(folds):
        rest = torch.cat([windows[j::folds] for j in range(folds) if j != i]).reshape(-1, windows.shape[-1])
        fit = KeptProblem(weight, LayerStats.from_inputs(rest.T, sample_size=0), problem.kept)
        held = KeptProblem(weight, LayerStats.from_inputs(windows[i::folds].reshape(-1, windows.shape[-1]).T,
                                                          sample_size=0), problem.kept)
        comp = METHODS["ls"](fit, Regularisation())
        expect += held.error(comp.weight, comp.bias)[0]
    assert errors["ls"] == pytest.approx(math.sqrt(expect / problem.reference), rel=1e-9)


def test_auto_refits_the_lowest_validation_error_on_all_calibration_tokens():
    problem, _, _ = _problem(64)
    comp = compensate_problem("auto", problem)
    errors = comp.choice["validation_errors"]
    assert comp.choice["candidate"] == min(errors, key=errors.get)
    assert comp.choice["margin"] >= 0
    refit = compensate_problem(comp.choice["method"], problem, lam=comp.choice["lambda"] or 1e-4)
    torch.testing.assert_close(comp.weight, refit.weight)


def test_a_ridge_winner_is_refitted_with_the_absolute_lambda_of_its_fits():
    """The refit's lambda is the mean of the fits' absolute lambdas (each from the fit's own windows:
    fewer tokens than all, so smaller than the same relative strength on all of them)."""
    folds = 4
    problem, weight, windows = _problem(24, d_in=16, kept=12, folds=folds)  # few tokens per input: a ridge wins
    comp = compensate_problem("auto", problem)
    assert comp.choice["method"] == "ls_ridge"
    a = float(comp.choice["candidate"].split("@")[1])
    fit_lams = []
    for i in range(folds):
        rest = torch.cat([windows[j::folds] for j in range(folds) if j != i]).reshape(-1, windows.shape[-1])
        fit = KeptProblem(weight, LayerStats.from_inputs(rest.T, sample_size=0), problem.kept)
        fit_lams.append(a * float(torch.trace(fit.gram_kk)) / len(problem.kept))
    assert comp.choice["lambda"] == pytest.approx(sum(fit_lams) / folds, rel=1e-12)
    relative = a * float(torch.trace(problem.gram_kk)) / len(problem.kept)
    assert comp.choice["lambda"] < relative  # fits on (K-1)/K of the tokens: a smaller absolute lambda


def test_folds_without_windows_are_left_out():
    """Fewer calibration windows than folds: the empty folds are not kept, so they neither count as
    validation folds nor scale the refit's lambda; the choice is the one on the non-empty folds alone."""
    problem, weight, windows = _problem(12, d_in=8, kept=6, folds=8)  # 3 windows: folds 3..7 get none
    assert [f.count for f in problem.stats.folds] == [4, 4, 4]
    three = KeptProblem(weight, _fold_stats(windows, folds=3), problem.kept)
    assert validation_errors(problem, Regularisation()) == pytest.approx(validation_errors(three, Regularisation()))
    got, want = compensate_problem("auto", problem).choice, compensate_problem("auto", three).choice
    assert got["candidate"] == want["candidate"]
    assert got["lambda"] == pytest.approx(want["lambda"], rel=1e-12)


def test_auto_picks_what_generalises():
    """Plenty of tokens: a least-squares fit wins; fewer tokens than kept inputs: exact least squares
    interpolates one fold and cannot win on the other."""
    many, _, _ = _problem(4000, kept=8)
    assert compensate_problem("auto", many).choice["method"] in ("ls", "ls_ridge")
    few, _, _ = _problem(12, d_in=40, kept=30)
    choice = compensate_problem("auto", few).choice
    assert choice["candidate"] != "ls"
    assert choice["validation_errors"]["ls"] > choice["validation_error"]


def test_auto_without_folds_is_refused():
    from rcpu.errors import RcpuError

    gen = torch.Generator().manual_seed(0)
    stats = LayerStats.from_inputs(torch.randn(6, 40, generator=gen), sample_size=0)
    with pytest.raises(RcpuError, match="folds"):
        compensate_problem("auto", KeptProblem(torch.randn(3, 6, generator=gen), stats, torch.arange(4)))


def test_greedy_counts_keep_the_total_and_go_where_the_cost_is_lowest():
    costs = {(0, "down_proj"): [(0, 0.0), (4, 4.0), (8, 16.0)], (1, "down_proj"): [(0, 0.0), (4, 1.0), (8, 2.0)],
             (0, "o_proj"): [(0, 0.0), (2, 1.0), (4, 9.0)], (1, "o_proj"): [(0, 0.0), (2, 5.0), (4, 10.0)]}
    steps = {k: 1 for k in costs}
    counts = greedy_counts(costs, steps, {"down_proj": 8, "o_proj": 4})
    assert counts[0, "down_proj"] + counts[1, "down_proj"] == 8
    assert counts[1, "down_proj"] == 8  # the cheap layer takes all it can
    assert counts[0, "o_proj"] + counts[1, "o_proj"] == 4
    assert counts == {**counts, (0, "o_proj"): 2, (1, "o_proj"): 2}  # marginals 0.5, 2.5 vs 4: two each


def test_grid_counts_stay_in_steps_and_keep_units():
    assert grid_counts(3, 10, 1) == [0, 2, 3, 4, 6, 8]
    levels = grid_counts(6, 9, 3)  # GQA-balanced: whole steps of one head per KV group
    assert all(n % 3 == 0 and n < 9 for n in levels)


def test_a_spread_caps_every_sublayer_and_spread_one_is_uniform():
    uniform = {(i, sub): 4 for i in range(3) for sub in ("down_proj", "o_proj")}
    units, steps = dict.fromkeys(uniform, 20), dict.fromkeys(uniform, 1)
    costs = {key: [(n, (0.1 if key[0] == 0 else 1.0) * n) for n in grid_counts(4, 20, 1)] for key in uniform}
    totals = {"down_proj": 12, "o_proj": 12}
    assert greedy_counts(capped(costs, 1.0, uniform, units, steps), steps, totals) == uniform
    for spread in SPREADS:
        counts = greedy_counts(capped(costs, spread, uniform, units, steps), steps, totals)
        assert counts[0, "down_proj"] == min(round(spread * 4), 12)  # the cheap layer goes to its cap, no further
        assert sum(counts[i, "o_proj"] for i in range(3)) == 12


def test_heldback_windows_are_every_fourth_and_too_few_windows_are_refused():
    from rcpu.errors import RcpuError

    windows = torch.arange(10)[:, None].expand(10, 3)
    fit, held = heldback_split(windows)
    assert held[:, 0].tolist() == [i for i in range(10) if i % HOLD_BACK == HOLD_BACK - 1] == [3, 7]
    assert sorted(fit[:, 0].tolist() + held[:, 0].tolist()) == list(range(10))
    with pytest.raises(RcpuError, match="at least 4 calibration windows"):
        heldback_split(windows[:3])
    # Random windows may overlap: a fit window sharing a token with a held-back one is left out.
    starts = torch.tensor([0, 100, 200, 300, 396, 500, 600, 700, 650, 900])  # held back: 300 and 700
    fit, held = heldback_split(torch.arange(10)[:, None].expand(10, 5), starts)  # 5-token windows: no overlap
    assert held[:, 0].tolist() == [3, 7] and fit[:, 0].tolist() == [0, 1, 2, 4, 5, 6, 8, 9]
    fit, held = heldback_split(torch.arange(10)[:, None].expand(10, 100), starts)  # 396 and 650 overlap
    assert held[:, 0].tolist() == [3, 7] and fit[:, 0].tolist() == [0, 1, 2, 5, 6, 9]


def test_auto_trials_fit_the_costs_stand_in_toward_the_kept_weights():
    """auto's trial prunes compensate with ls_ridge toward W_K at STAND_IN_ALPHA relative strength, the fit
    whose fold error is the cost; a fixed method's trials use the method itself."""
    from rcpu.compensate import ridge_lambda

    gen = torch.Generator().manual_seed(3)
    stats = LayerStats.from_inputs(torch.randn(6, 40, generator=gen), sample_size=0)
    problem = KeptProblem(torch.randn(5, 6, generator=gen, dtype=torch.float64), stats, torch.arange(4))
    lam = ridge_lambda(problem.gram_kk, STAND_IN_ALPHA)
    expected = compensate_problem("ls_ridge", problem, lam=lam).weight
    assert torch.equal(trial_fit(PruneConfig(method="auto"))(problem).weight, expected)
    assert not torch.allclose(expected, compensate_problem("ridge", problem, alpha=STAND_IN_ALPHA).weight)
    assert trial_fit(PruneConfig(method="rotation")) is None


def test_greedy_keeps_the_spread_whose_trial_loses_least_on_held_back_windows(one_thread):
    """The trial of each spread fits on the other windows and is judged on the held-back ones; the spread
    with the lowest held-back loss is kept (the one closest to uniform on a tie), a spread that places the
    same counts as one already tried is not tried again, and the costs never see a held-back window."""
    import rcpu.allocate

    lm = _lm(make_tiny_llama(heads=4, kv_heads=4, layers=3, intermediate=48))
    tokens = _tokens(n=8)
    cfg = PruneConfig(ratio=0.25, method="auto", allocation="greedy")
    seen: list[torch.Tensor] = []
    real_flow = rcpu.allocate.LayerFlow

    def flow(adapter, windows, batch_size=8):
        seen.append(windows)
        return real_flow(adapter, windows, batch_size)

    for losses, expected in (({"1": 3.0, "1.5": 1.0, "2": 2.0, "2.5": 1.0}, 1.5),
                             ({"1": 1.0, "1.5": 1.0, "2": 1.0, "2.5": 1.0}, 1.0)):
        trials: list[tuple[dict, str]] = []

        def trial(counts, fit, held, label, losses=losses, trials=trials):
            assert torch.equal(held, tokens.calibration[HOLD_BACK - 1 :: HOLD_BACK])
            assert len(fit) + len(held) == len(tokens.calibration)
            trials.append((counts, label))
            spread = label.removeprefix("spread ").removesuffix("x")
            return losses[spread]

        seen.clear()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(rcpu.allocate, "LayerFlow", flow)
            plan = allocate(lm, tokens, cfg, seed=0, trial=trial)
        assert plan["spread"]["chosen"] == expected
        nll = plan["spread"]["heldback_nll"]
        assert set(nll) == set(losses)
        label_of = [(c, label.removeprefix("spread ").removesuffix("x")) for c, label in trials]
        for spread, counts in plan["placements"].items():  # a spread placing counts already tried shares their loss
            assert nll[f"{spread:g}"] == losses[next(label for c, label in label_of if c == counts)]
        placed = [c for c, _ in trials]
        assert len(placed) == len({tuple(sorted(c.items())) for c in placed})  # no placement tried twice
        assert placed[0] == plan["uniform"]  # spread 1x is uniform
        assert plan["counts"] == next(c for c, label in trials if label == f"spread {expected:g}x")
        held = tokens.calibration[HOLD_BACK - 1 :: HOLD_BACK]
        assert seen and all(not (w[:, None] == held[None]).all(-1).any() for w in seen)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_prune_with_auto_and_greedy_allocation_removes_the_uniform_total(kv_heads, one_thread):
    model = make_tiny_llama(heads=4, kv_heads=kv_heads, layers=3, intermediate=48)
    lm = _lm(model)
    tokens = _tokens(n=8)
    data = DataConfig(seed=0)
    uniform = prune_model(lm, data, PruneConfig(ratio=0.25, method="auto"), tokens=tokens)
    greedy = prune_model(lm, data, PruneConfig(ratio=0.25, method="auto", allocation="greedy"), tokens=tokens)
    for sub in ("o_proj", "down_proj"):
        assert greedy.allocation[sub]["total_removed"] == uniform.allocation[sub]["total_removed"]
        assert greedy.allocation[sub]["uniform_total_removed"] == uniform.allocation[sub]["total_removed"]
        assert [r[sub]["pruned_units"] for r in greedy.layers] == greedy.allocation[sub]["removed"]
        for record in uniform.layers:
            assert record[sub]["auto"]["candidate"] in record[sub]["auto"]["validation_errors"]
    if kv_heads == 4:  # MHA, same shapes in every layer: exactly the same weights removed (the compensation
        # may add an output bias to a sublayer, d_out parameters, wherever bias or rotation_bias wins)
        def weights(model):
            return sum(p.numel() for name, p in model.named_parameters() if not name.endswith(".bias"))

        assert weights(greedy.model) == weights(uniform.model) < weights(model)


def test_evaluation_windows_are_never_read_before_the_pruned_model_exists(monkeypatch, tmp_path, one_thread):
    """Instrument the evaluation-window loader, the perplexity and the pruning: no perplexity runs and
    no evaluation window reaches a model before ``prune_model`` has returned the pruned model, no
    window the pruning runs on is an evaluation window, and the greedy allocation's trials are judged
    on held-back calibration windows."""
    import rcpu.flow
    import rcpu.prune
    from rcpu import pipeline
    from rcpu.config import EvalConfig

    monkeypatch.setenv("RCPU_CACHE", str(tmp_path))  # no cached dense perplexity
    model = make_tiny_llama(heads=4, kv_heads=4, layers=2)
    lm = _lm(model)
    tokens = _tokens(n=8)
    eval_windows = torch.randint(0, 128, (3, 32), generator=torch.Generator().manual_seed(99))
    events: list[str] = []
    flow_windows: list[torch.Tensor] = []

    monkeypatch.setattr(pipeline, "check_before_work", lambda *a, **k: events.append("check"))
    monkeypatch.setattr(pipeline, "evaluation_windows", lambda *a, **k: events.append("eval windows") or eval_windows)
    real_prune, real_ppl, real_flow = pipeline.prune_model, pipeline.perplexity, rcpu.flow.LayerFlow.__init__

    def prune(*args, **kwargs):
        events.append("prune start")
        result = real_prune(*args, tokens=tokens, **kwargs)
        events.append("prune done")
        return result

    def ppl(model, windows, **kwargs):
        events.append("perplexity")
        return real_ppl(model, windows, **kwargs)

    def flow_init(self, adapter, windows, batch_size=8):
        flow_windows.append(windows)
        real_flow(self, adapter, windows, batch_size)

    trial_windows: list[torch.Tensor] = []
    real_trial_ppl = rcpu.prune.perplexity

    def trial_ppl(model, windows, **kwargs):  # the greedy allocation's held-back loss
        trial_windows.append(windows)
        return real_trial_ppl(model, windows, **kwargs)

    monkeypatch.setattr(pipeline, "prune_model", prune)
    monkeypatch.setattr(pipeline, "perplexity", ppl)
    monkeypatch.setattr(rcpu.prune, "perplexity", trial_ppl)
    monkeypatch.setattr(rcpu.flow.LayerFlow, "__init__", flow_init)
    monkeypatch.setattr(lm, "fingerprint", "tiny-ordering-test", raising=False)
    report = pipeline.prune_and_evaluate(lm, DataConfig(seq_len=32), PruneConfig(ratio=0.25, method="auto",
                                                                                   allocation="greedy"),
                                         EvalConfig(), only_perplexity=True)
    done = events.index("prune done")
    assert "eval windows" not in events[:done] and "perplexity" not in events[:done]
    assert events[done:].count("perplexity") == 2  # dense and pruned, both after
    assert flow_windows and all(not bool((w[:, None] == eval_windows[None]).all(-1).any()) for w in flow_windows)
    assert trial_windows and all(torch.equal(w, tokens.calibration[3::4]) for w in trial_windows)
    assert math.isfinite(report.pruned["ppl"])


def test_greedy_prune_figures_and_what_it_costs_in_stock_loadability(one_thread):
    """The app's charts are built from the records alone; a non-uniform allocation gives layers different
    shapes, which no stock config holds (uniform MHA stays stock-loadable)."""
    from rcpu import figures
    from rcpu.export import stock_verdict

    model = make_tiny_llama(heads=4, kv_heads=4, layers=3, intermediate=48)
    lm = _lm(model)
    tokens = _tokens(n=8)
    uniform = prune_model(lm, DataConfig(), PruneConfig(ratio=0.25, method="auto"), tokens=tokens)
    greedy = prune_model(lm, DataConfig(), PruneConfig(ratio=0.25, method="auto", allocation="greedy"),
                         tokens=tokens)
    heat = figures.allocation_heatmap(greedy.layers)
    assert [list(row) for row in heat.data[0].z] == [
        [r[sub]["pruned_units"] / (r[sub]["pruned_units"] + r[sub]["kept_units"]) for r in greedy.layers]
        for sub in ("o_proj", "down_proj")]
    bars = figures.auto_choice_figure(greedy.layers)
    chose = sum("auto" in r[sub] for r in greedy.layers for sub in ("o_proj", "down_proj"))
    assert sum(len(t.x) for t in bars.data) == chose  # one bar per sublayer that lost units (and so chose)
    assert all(y >= 0 for t in bars.data for y in t.y)
    assert "auto" in figures.auto_choice_figure([]).layout.annotations[0].text
    assert stock_verdict(uniform.model).loadable
    shapes_differ = any(len({r[sub]["pruned_units"] for r in greedy.layers}) > 1 for sub in ("o_proj", "down_proj"))
    assert stock_verdict(greedy.model).loadable is not shapes_differ


def test_sweeps_and_configs_take_auto_and_allocations_like_any_other_setting():
    from rcpu.config import LayerConfig, SweepConfig, parse_configs
    from rcpu.errors import RcpuError

    spec = SweepConfig(ratios=(0.1, 0.3), configs=parse_configs("rcpu:auto,rcpu:rotation"),
                       allocations=("uniform", "greedy"))
    points = spec.points(DataConfig())
    assert len(points) == 2 * 2 * 2
    assert {(cfg.method, cfg.allocation) for _, cfg in points} == {
        (m, a) for m in ("auto", "rotation") for a in ("uniform", "greedy")}
    spec.check()
    assert PruneConfig(method="auto", allocation="greedy").label == "rcpu:auto [greedy]"
    assert PruneConfig(method="auto").label == "rcpu:auto"
    with pytest.raises(RcpuError, match="allocation"):
        PruneConfig(allocation="flap").check()
    with pytest.raises(RcpuError, match="whole-model"):
        LayerConfig(method="auto").check()  # one sublayer's statistics have no calibration folds


def test_greedy_with_gqa_balanced_heads_removes_exactly_the_uniform_parameters(one_thread):
    """GQA: a KV head goes with the last query head of its group, so without ``gqa_balanced`` a greedy
    model that empties a group removes more parameters than uniform. Balanced selection takes one query
    head per group at a time and never empties one (at most 80% of a layer's heads go), so greedy and
    uniform remove exactly the same parameters."""
    model = make_tiny_llama(heads=6, kv_heads=2, layers=4, hidden=48, intermediate=48)
    lm = _lm(model)
    tokens = _tokens(n=8)
    data = DataConfig(seed=0)
    cfg = PruneConfig(ratio=1 / 3, method="rotation", gqa_balanced=True)  # rotation: no added bias
    uniform = prune_model(lm, data, cfg, tokens=tokens)
    greedy = prune_model(lm, data, replace(cfg, allocation="greedy"), tokens=tokens)

    def parameters(model):
        return sum(p.numel() for p in model.parameters())

    assert parameters(greedy.model) == parameters(uniform.model) < parameters(model)
    assert greedy.allocation["o_proj"]["total_removed"] == uniform.allocation["o_proj"]["total_removed"]
    heads = [r["o_proj"]["pruned_units"] for r in greedy.layers]
    assert all(n % 2 == 0 for n in heads)  # whole steps of one head per KV group
