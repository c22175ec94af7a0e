"""The paper's experiments (method page, section 8) as lists of sweep points, and their tables.

Each experiment is a list of ``(DataConfig, PruneConfig)`` points run through the sweep
cache (``rcpu.sweep.run_points``), so ``rcpu reproduce``, the Paper page and ``rcpu sweep``
share every point. Sizes come in presets: ``paper`` (the published sizes), ``quick``
(minutes on 2 cores) and ``tiny`` (the tests). ``scaled`` turns the paper's sample counts
into the same calibration tokens per ``down_proj`` input on the model at hand.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path

from .compensate import DEFAULT_LAMBDA
from .config import DataConfig, EvalConfig, PruneConfig
from .errors import RcpuError

PAPER_DATA = Path(__file__).with_name("paper_data.json")
PAPER_LAMBDAS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 1e2, 1e3, 1e4, 1e5)
PAPER_SEQ_LEN = 128
PAPER_DOWN_INPUTS = 11008  # LLaMA-7B intermediate size
TABLE1_CONFIGS = ("wanda_sp:none", "fluctuation:bias", "rcpu:rotation", "rcpu:rotation_scale")
FIG3_CONFIGS = tuple(f"{s}:{m}" for s in ("wanda_sp", "rcpu") for m in ("none", "ls", "rotation"))
ABLATION = ("none", "attn", "mlp", "both")  # PruneConfig.compensate
REGIME_CONFIGS = ("rcpu:ls", "rcpu:ls_ridge", "rcpu:rotation", "rcpu:rotation_scale")
TABLE2_RATIO = 0.2


@cache
def published() -> dict:
    """The published LLaMA-7B numbers, with where they come from (``paper_data.json``)."""
    return json.loads(PAPER_DATA.read_text())


def paper_tokens_per_input(samples: int) -> float:
    """Calibration tokens per LLaMA-7B ``down_proj`` input for the paper's ``samples`` x 128 tokens."""
    return samples * PAPER_SEQ_LEN / PAPER_DOWN_INPUTS


@dataclass(frozen=True)
class Sizes:
    """How big an experiment runs: its calibration-size axis, ratios, lambdas and evaluation windows."""

    name: str
    table_samples: int  # Table 1, ablation, Table 2
    fig2_samples: tuple[int, ...]
    fig_samples: tuple[int, ...]  # Fig. 3 and Fig. 5: the paper's two regimes
    regime_samples: tuple[int, ...]
    ratios: tuple[float, ...]  # figures
    table_ratios: tuple[float, ...]
    lambdas: tuple[float, ...]
    eval_windows: int | None
    seq_len: int = PAPER_SEQ_LEN


SIZES = {
    "paper": Sizes("paper", 128, (8, 16, 32, 64, 128, 256, 512), (128, 512), (8, 16, 32, 64, 128, 256, 512),
                   (0.1, 0.2, 0.3), (0.2, 0.3), PAPER_LAMBDAS, None),
    # quick: one ratio; the calibration sizes are the embedded model's (1536 down_proj inputs) scaled paper
    # regimes: 18 x 128 tokens = 1.5 tokens per input (the paper's 128 samples), 71 x 128 = 5.9 (its 512)
    "quick": Sizes("quick", 18, (4, 18, 71), (18, 71), (4, 9, 18, 36, 71), (0.2,), (0.2,),
                   (1e-2, 1.0, 1e2), 32),
    "tiny": Sizes("tiny", 2, (1, 2), (1, 2), (1, 2), (0.2,), (0.2,), (1e-4, 1e2), 2, seq_len=32),
}


def scaled_samples(samples: int, down_inputs: int, seq_len: int) -> int:
    """Calibration windows of ``seq_len`` giving a model with ``down_inputs`` the paper's tokens per
    ``down_proj`` input at ``samples`` x 128 (at least 1)."""
    return max(1, round(paper_tokens_per_input(samples) * down_inputs / seq_len))


@dataclass(frozen=True)
class Experiment:
    name: str
    title: str
    reading: str  # one paragraph: what to read in it
    points: Callable[[DataConfig, Sizes], list[tuple[DataConfig, PruneConfig]]]
    perplexity: bool = True  # table2 measures zero-shot accuracy instead


def _cfg(config: str, ratio: float, **kw) -> PruneConfig:
    score, method = config.split(":")
    return PruneConfig(ratio, "both", score, method, rounding="truncate", **kw)


def _grid(data: DataConfig, sizes: tuple[int, ...], ratios, configs, lambdas=(DEFAULT_LAMBDA,)) -> list:
    points = []
    for n in sizes:
        for r in ratios:
            for c in configs:
                for lam in (lambdas if c.endswith(":ls_ridge") else (DEFAULT_LAMBDA,)):
                    points.append((replace(data, calib_samples=n), _cfg(c, r, lam=lam)))
    return points


EXPERIMENTS: dict[str, Experiment] = {e.name: e for e in (
    Experiment(
        "table1", "Table 1: perplexity of each method at 20% and 30%",
        "Wanda-sp removes by its score and compensates nothing; FLAP (fluctuation score) adds a bias; RCPU "
        "rotates the kept weights (and scales them in RCPU+scale). The paper's ordering is RCPU < FLAP < "
        "Wanda-sp at both ratios; on another model the ordering is what carries over, not the numbers.",
        lambda d, s: _grid(d, (s.table_samples,), s.table_ratios, TABLE1_CONFIGS)),
    Experiment(
        "ablation", "Ablation at 20%: which sublayers are compensated",
        "Every run prunes both sublayers with the RCPU score; only the rotation is switched on per sublayer. "
        "In the paper each sublayer's compensation helps on its own (o_proj more than down_proj) and both "
        "together help most.",
        lambda d, s: [(replace(d, calib_samples=s.table_samples), _cfg("rcpu:rotation", 0.2, compensate=c))
                      for c in ABLATION]),
    Experiment(
        "fig2", "Fig. 2: RCPU against the number of calibration samples",
        "Rotation has few degrees of freedom, so it needs little data: in the paper perplexity is very high "
        "at 8-16 samples and flat from 64. The x axis is samples of the run's sequence length.",
        lambda d, s: _grid(d, s.fig2_samples, s.ratios, ("rcpu:rotation",))),
    Experiment(
        "fig3", "Fig. 3: score x compensation at two calibration sizes",
        "Each panel is one calibration size. The paper: with 128 samples rotation beats least squares (LS "
        "overfits about 1.5 tokens per down_proj input); with 512 samples LS beats rotation. Which regime a "
        "model is in depends on calibration tokens per input dimension, not on the sample count.",
        lambda d, s: _grid(d, s.fig_samples, s.ratios, FIG3_CONFIGS)),
    Experiment(
        "fig5", "Fig. 5: LS + ridge against lambda, RCPU as a line",
        "ls_ridge pulls the LS solution toward the original weights with strength lambda. Small lambda is LS, "
        "large lambda is no compensation; in between it can beat rotation, and in the paper a tuned lambda "
        "does in several panels. The dashed line in each panel is RCPU's perplexity.",
        lambda d, s: _grid(d, s.fig_samples, s.ratios, ("rcpu:ls_ridge", "rcpu:rotation"), s.lambdas)),
    Experiment(
        "regime", "Regime: perplexity against calibration tokens per down_proj input, at 20%",
        "LS, the best-lambda LS + ridge, rotation and rotation+scale at one ratio, against calibration tokens "
        "per down_proj input dimension (dotted lines: the paper's LLaMA-7B runs at about 1.5 tokens per input, "
        "128 x 128 tokens, and 6, 512 x 128; and the sidebar's current setting). Left, perplexity: where LS "
        "crosses rotation (dashed) is the answer to 'which compensation for my data?'. Right, the same runs one "
        "layer at a time: each down_proj's relative output error on held-out windows the compensation never saw, "
        "averaged over the layers, with removing the units uncompensated as the dash-dotted reference. Few "
        "tokens per input let LS fit the calibration windows and miss the held-out ones (its error sits high, "
        "even above no compensation), which rotation's few degrees of freedom cannot do; with more tokens LS's "
        "held-out error falls below rotation's. If the panel says calibration instead of held-out, the points "
        "were cached without held-out errors and LS is lowest by construction: read the left panel.",
        lambda d, s: _grid(d, s.regime_samples, (0.2,), REGIME_CONFIGS, s.lambdas)),
    Experiment(
        "table2", "Table 2: mean zero-shot accuracy at 20%",
        "Accuracy of the pruned model on multiple-choice tasks through lm-evaluation-harness. In the paper "
        "RCPU keeps the most accuracy (61.57 against 66.00 dense) and the proposed score with LS loses the "
        "most (56.83): LS's lower calibration error does not carry to the tasks.",
        lambda d, s: [(replace(d, calib_samples=s.table_samples), _cfg(c, TABLE2_RATIO))
                      for c in (*TABLE1_CONFIGS, "rcpu:ls")],
        perplexity=False),
)}


def experiment(name: str) -> Experiment:
    if name not in EXPERIMENTS:
        raise RcpuError(f"unknown experiment {name!r}; choose one of: {', '.join(EXPERIMENTS)}")
    return EXPERIMENTS[name]


def sizes_for(preset: str, down_inputs: int | None = None, scaled: bool = False, **override) -> Sizes:
    """A size preset; ``scaled`` maps every calibration size to the paper's tokens per ``down_proj`` input on
    a model with ``down_inputs``; ``override`` replaces fields (None values are ignored)."""
    if preset not in SIZES:
        raise RcpuError(f"unknown sizes {preset!r}; choose one of: {', '.join(SIZES)}")
    sizes = replace(SIZES[preset], **{k: v for k, v in override.items() if v is not None})
    if scaled:
        if down_inputs is None:
            raise RcpuError("scaled sizes need the model's down_proj input count")
        base = SIZES["paper"]

        def scale(values):
            return tuple(sorted({scaled_samples(n, down_inputs, sizes.seq_len) for n in values}))

        sizes = replace(sizes, table_samples=scaled_samples(base.table_samples, down_inputs, sizes.seq_len),
                        fig2_samples=scale(base.fig2_samples), fig_samples=scale(base.fig_samples),
                        regime_samples=scale(base.regime_samples))
    return sizes


def experiment_points(name: str, data: DataConfig, sizes: Sizes, configs: tuple[str, ...] | None = None
                      ) -> list[tuple[DataConfig, PruneConfig]]:
    """The points of one experiment; ``data`` gives the model, the text and the seed; ``configs`` keeps only
    those ``score:method`` (a part of the experiment, e.g. LS and rotation of the regime)."""
    points = experiment(name).points(experiment_data(data, sizes), sizes)
    if configs is not None:
        points = [(d, c) for d, c in points if f"{c.score}:{c.method}" in configs]
        if not points:
            raise RcpuError(f"no point of {name} uses {', '.join(configs)}")
    return points


def experiment_data(data: DataConfig, sizes: Sizes) -> DataConfig:
    """The DataConfig an experiment's dense perplexity is measured with (calibration size does not matter)."""
    return DataConfig(model=data.model, data=data.data, seed=data.seed, seq_len=sizes.seq_len,
                      trust_remote_code=data.trust_remote_code)


def evaluation_for(sizes: Sizes, eval_data: str | None = None) -> EvalConfig:
    return EvalConfig(eval_data, sizes.eval_windows)


def down_tokens(row: dict) -> float:
    """Calibration tokens per ``down_proj`` input dimension of a sweep row."""
    return float(row["calibration_tokens_per_input_dim"]["down_proj"])


def best_lambda(rows: list[dict]) -> list[dict]:
    """Per (calibration size, ratio): the ``ls_ridge`` row with the lowest perplexity, as config
    ``rcpu:ls_ridge best λ``."""
    best: dict[tuple, dict] = {}
    for row in rows:
        if row.get("method") != "ls_ridge":
            continue
        key = (row["calib_samples"], row["ratio"], row["score"])
        if key not in best or row["ppl"] < best[key]["ppl"]:
            best[key] = row
    return [{**row, "config": f"{row['score']}:ls_ridge best λ"} for row in best.values()]


def layer_error_curve(rows: list[dict], sublayer: str = "down_proj") -> dict:
    """Each row's relative output error of ``sublayer`` averaged over the layers, from the points' ``layer_errors``.

    The held-out error (statistics of held-out windows the compensation never saw: what shows LS overfitting)
    when every point with layer errors has it, else the calibration error (in-sample: LS has the lowest by
    construction), so one figure never mixes the two. {split: "heldout" | "calibration" | None, rows: the rows
    with ``layer_error`` and ``layer_error_uncompensated``, without_errors: how many rows carry none (points
    cached before sweep points kept their layer errors)}.
    """
    def records(row):
        return [layer[sublayer] for layer in row.get("layer_errors") or [] if sublayer in layer]

    have = [r for r in rows if records(r)]
    split = None
    if have:
        split = "heldout" if all("error_heldout" in x for r in have for x in records(r)) else "calibration"
    out = []
    for row in have:
        errors = records(row)
        out.append({**row, "layer_error": sum(x[f"error_{split}"] for x in errors) / len(errors),
                    "layer_error_uncompensated":
                        sum(x[f"error_uncompensated_{split}"] for x in errors) / len(errors)})
    return {"split": split, "rows": out, "without_errors": len(rows) - len(have)}


def crossover(rows: list[dict], ratio: float = 0.2, first: str = "rcpu:ls", second: str = "rcpu:rotation"
              ) -> float | None:
    """Calibration tokens per ``down_proj`` input at which ``first`` overtakes ``second`` at ``ratio``.

    From the smallest size up: the first size where ``first``'s perplexity is below ``second``'s after
    being above it; the crossing is interpolated linearly in log(tokens) on log(ppl first / ppl second).
    ``None`` when the two never cross (or the points are missing).
    """
    def curve(config):
        return {down_tokens(r): r["ppl"] for r in rows if r["config"] == config and math.isclose(r["ratio"], ratio)}

    a, b = curve(first), curve(second)
    xs = sorted(set(a) & set(b))
    gaps = [math.log(a[x] / b[x]) for x in xs]
    for (x0, g0), (x1, g1) in zip(zip(xs, gaps), zip(xs[1:], gaps[1:])):
        if g0 > 0 >= g1:
            t = g0 / (g0 - g1)
            return math.exp(math.log(x0) + t * (math.log(x1) - math.log(x0)))
    return None


def measured_table(name: str, rows: list[dict], dense: dict | None) -> list[dict]:
    """The measured numbers laid out like the published table (perplexity experiments)."""
    if name == "table1":
        out = []
        for ratio in sorted({r["ratio"] for r in rows}):
            line = {"ratio": ratio}
            for c in TABLE1_CONFIGS:
                line[c] = next((r["ppl"] for r in rows if r["config"] == c and r["ratio"] == ratio), None)
            out.append(line)
        return out
    if name == "ablation":
        return [{"compensate": r["compensate"], "ppl": r["ppl"]} for c in ABLATION
                for r in rows if r.get("compensate") == c]
    out = [{"config": r["config"], "ratio": r["ratio"], "calib_samples": r["calib_samples"],
            "tokens_per_down_input": round(down_tokens(r), 3), "ppl": r["ppl"]} for r in rows]
    if dense is not None:
        out.insert(0, {"config": "dense", "ppl": dense["ppl"]})
    return out


def published_table(name: str) -> list[dict]:
    """The published LLaMA-7B numbers of an experiment as table rows (a finding's text for the figures)."""
    paper = published()
    if name == "table1":
        t = paper["table1"]
        return [{"ratio": float(r), **dict(zip(t["columns"], values))} for r, values in t["rows"].items()]
    if name == "ablation":
        return [{"compensate": c, "ppl": v} for c, v in paper["ablation"]["rows"].items()]
    if name == "table2":
        return [{"config": c, "mean_accuracy": v} for c, v in paper["table2"]["mean_accuracy"].items()]
    if name == "regime":
        return [{"run": f"LLaMA-7B, {n} x 128 tokens", "tokens_per_down_input": round(paper_tokens_per_input(n), 2)}
                for n in (128, 512)]
    return [{"finding": paper[name]["finding"]}]


RESULT_COLUMNS = ("config", "score", "method", "lambda", "compensate", "ratio", "rounding", "calib_samples",
                  "seq_len", "tokens_per_down_input", "ppl", "ppl_dense", "params_after", "eval_tokens", "cached")


def csv_rows(rows: list[dict]) -> list[dict]:
    """Rows with the columns of ``RESULT_COLUMNS`` that a sweep row does not carry directly."""
    return [{**r, "tokens_per_down_input": round(down_tokens(r), 4)} for r in rows]


def run_experiment(lm, name: str, data: DataConfig, sizes: Sizes, eval_data: str | None = None, *,
                   configs: tuple[str, ...] | None = None, compute: bool = True, progress=None,
                   on_point=None) -> dict:
    """Every point of one perplexity experiment through the sweep cache (``compute=False``: only what is
    cached, nothing runs): {experiment, title, reading, sizes, dense, points, missing, measured, published}."""
    from dataclasses import asdict

    from .sweep import run_points

    exp = experiment(name)
    if not exp.perplexity:
        raise RcpuError(f"{name} measures zero-shot accuracy: use rcpu zeroshot / run_zeroshot_experiment")
    points = experiment_points(name, data, sizes, configs)
    # the regime view draws each layer's held-out error too: its points keep held-out statistics
    result = run_points(lm, experiment_data(data, sizes), points, evaluation_for(sizes, eval_data),
                        compute=compute, progress=progress, on_point=on_point, heldout_errors=name == "regime")
    rows = csv_rows(result["points"])
    out = {"experiment": name, "title": exp.title, "reading": exp.reading, "sizes": asdict(sizes),
           "total": len(points), **result, "points": rows,
           "measured": measured_table(name, rows, result["dense"]), "published": published_table(name)}
    if name in ("regime", "fig3", "fig5"):
        with_best = rows + [{**r, "tokens_per_down_input": down_tokens(r)} for r in best_lambda(rows)]
        present = {row["config"] for row in with_best}
        configs = [c for c in ("rcpu:ls", "rcpu:ls_ridge best λ") if c in present]
        ratios = sorted({row["ratio"] for row in rows})
        out["ls_overtakes_rotation_at"] = {f"{r:g}": {c: crossover(with_best, r, first=c) for c in configs}
                                           for r in ratios}
        out["against_rotation"] = {f"{r:g}": {c: against_rotation(with_best, r, c) for c in configs} for r in ratios}
    return out


def against_rotation(rows: list[dict], ratio: float, config: str) -> str:
    """One sentence: where ``config`` overtakes ``rcpu:rotation`` at ``ratio`` along the calibration sizes, or
    that it is ahead (or behind) at every measured size."""
    x = crossover(rows, ratio, first=config)
    if x is not None:
        return f"{config} overtakes rcpu:rotation at {x:.2f} calibration tokens per down_proj input"
    mine = {down_tokens(r): r["ppl"] for r in rows if r["config"] == config and math.isclose(r["ratio"], ratio)}
    theirs = {down_tokens(r): r["ppl"] for r in rows
              if r["config"] == "rcpu:rotation" and math.isclose(r["ratio"], ratio)}
    shared = sorted(set(mine) & set(theirs))
    if not shared:
        return f"{config} and rcpu:rotation share no calibration size yet"
    if all(mine[x] < theirs[x] for x in shared):
        return f"{config} is ahead of rcpu:rotation at every measured size ({len(shared)})"
    if all(mine[x] >= theirs[x] for x in shared):
        return f"{config} stays behind rcpu:rotation at every measured size ({len(shared)})"
    return f"{config} and rcpu:rotation trade places without overtaking from below"


def table2_configs() -> tuple[str, ...]:
    """The configs of Table 2 (``score:method``, all at ``TABLE2_RATIO``), in the paper's order."""
    return tuple(dict.fromkeys(f"{c.score}:{c.method}" for _, c in
                               experiment_points("table2", DataConfig(), SIZES["tiny"])))


def run_zeroshot_experiment(lm, data: DataConfig, sizes: Sizes, tasks: list[str], *,
                            configs: tuple[str, ...] | None = None, limit: int | None = None, online: bool = False,
                            compute: bool = True, progress=None, on_point=None) -> dict:
    """Table 2: the dense model and each config at 20% through the zero-shot cache (``rcpu.zeroshot``), the
    one route of ``rcpu reproduce table2`` and the Paper page. ``compute=False``: only what is cached.

    Checks every task first (a task given by name offline is one ``RcpuError`` line). Returns
    {experiment, title, reading, tasks, sizes, points, missing, total, dense, measured, published}.
    """
    from dataclasses import asdict

    from .zeroshot import LOCAL_TASK_HELP, task_spec, zeroshot_point

    if not tasks:
        raise RcpuError("table2 needs tasks (the paper's: boolq, piqa, hellaswag, winogrande, arc_easy, "
                        f"arc_challenge, openbookqa, online); {LOCAL_TASK_HELP}")
    for task in tasks:
        task_spec(task, online)  # a name offline, a missing file: one line before any work
    exp = experiment("table2")
    points = [(data, None)]  # the dense model, then the configs (configs=(): the dense model only)
    if configs is None or configs:
        points += experiment_points("table2", data, sizes, configs)
    rows = []
    for i, (point_data, cfg) in enumerate(points):
        row = zeroshot_point(lm, point_data, cfg, tasks, limit=limit, online=online, compute=compute,
                             progress=progress)
        if row is None:
            continue
        rows.append(row)
        if on_point:
            on_point(i + 1, len(points), row)
    return {"experiment": "table2", "title": exp.title, "reading": exp.reading, "tasks": list(tasks),
            "sizes": asdict(sizes), "points": rows, "dense": None, "total": len(points),
            "missing": len(points) - len(rows),
            "measured": [{"config": r["config"], "mean_accuracy": round(100 * r["mean_accuracy"], 2),
                          **{f"{t} (%)": round(100 * a, 2) for t, a in r["tasks"].items()}} for r in rows],
            "published": published_table("table2")}
