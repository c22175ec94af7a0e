"""``rcpu reproduce EXPERIMENT``: one of the paper's experiments, every point through the sweep cache."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..errors import RcpuError
from . import args as common

OUT_DIR = "results/paper"


def add_command(sub) -> None:
    from ..paper import EXPERIMENTS, SIZES

    p = sub.add_parser("reproduce", help="run one of the paper's experiments (table1, ablation, fig2, fig3, fig5, "
                                         "regime, table2); CSV + JSON + HTML figure")
    p.add_argument("experiment", choices=list(EXPERIMENTS))
    p.add_argument("--model", default="embedded", help="'embedded', a local model directory, a .gguf file or a hub id")
    p.add_argument("--data", default="embedded", help="calibration text (as for rcpu prune)")
    p.add_argument("--seed", type=int, default=common.DataConfig.seed)
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--eval-data", default=None, help="evaluate on this text (default: held-out part of --data)")
    p.add_argument("--quick", action="store_const", const="quick", dest="sizes", default="paper",
                   help="small sizes that run in minutes on 2 cores (see docs/paper.md)")
    p.add_argument("--sizes", choices=list(SIZES), default="paper",
                   help="size preset: paper (the published sizes), quick (= --quick), tiny (tests)")
    p.add_argument("--scaled", action="store_true",
                   help="calibration sizes at the paper's calibration tokens per down_proj input (LLaMA-7B, 11008 "
                        "inputs) instead of its sample counts")
    p.add_argument("--calib-samples", default=None, help="override the calibration-size axis (comma-separated)")
    p.add_argument("--ratios", default=None, help="override the ratios of the figures (comma-separated)")
    p.add_argument("--lambdas", default=None, help="override the lambdas of Fig. 5 / regime (comma-separated)")
    p.add_argument("--seq-len", type=int, default=None, help="override the window length (default 128, the paper's)")
    p.add_argument("--eval-windows", type=int, default=None, help="override the evaluation windows")
    p.add_argument("--configs", default=None,
                   help="only these score:method of the experiment (comma-separated), e.g. rcpu:ls,rcpu:rotation")
    p.add_argument("--cached-only", action="store_true",
                   help="compute nothing: report the points already cached (and how many are missing)")
    p.add_argument("--tasks", default=None, help="table2: task names or local lm-eval YAML files (comma-separated)")
    p.add_argument("--limit", type=int, default=None, help="table2: at most this many examples per task")
    p.add_argument("--online", action="store_true", help="table2: let lm-eval download task data from the hub")
    p.add_argument("--out", default=OUT_DIR, help=f"folder for EXPERIMENT.csv/.json/.html (default {OUT_DIR})")
    p.set_defaults(func=run_reproduce)


def _numbers(text: str | None, kind: type) -> tuple | None:
    if text is None:
        return None
    try:
        values = tuple(kind(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise RcpuError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise RcpuError(f"no values in {text!r}")
    return values


def experiment_sizes(args: argparse.Namespace, down_inputs: int | None):
    from ..paper import sizes_for

    samples = _numbers(args.calib_samples, int)
    ratios = _numbers(args.ratios, float)
    override = dict(ratios=ratios, table_ratios=ratios, lambdas=_numbers(args.lambdas, float), seq_len=args.seq_len,
                    eval_windows=args.eval_windows)
    if samples:
        override.update(table_samples=samples[0], fig2_samples=samples, fig_samples=samples, regime_samples=samples)
    return sizes_for(args.sizes, down_inputs, args.scaled and not samples, **override)


def run_reproduce(args: argparse.Namespace) -> int:
    from ..config import DataConfig, EvalConfig, parse_configs
    from ..figures import paper_figure
    from ..paper import RESULT_COLUMNS, experiment, experiment_points, run_experiment
    from ..pipeline import check_before_work
    from ..sweep import to_csv

    exp = experiment(args.experiment)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise RcpuError(f"--out {out} is a file")
    data = DataConfig(model=args.model, data=args.data, seed=args.seed, trust_remote_code=args.trust_remote_code)
    experiment_sizes(args, None if not args.scaled else 1)  # option errors before the model loads
    data.check()
    if args.eval_data:
        EvalConfig(args.eval_data).check()
    if not exp.perplexity:
        return reproduce_table2(args, data, out)
    lm = common.load(data)
    sizes = experiment_sizes(args, lm.adapter.num_channels(0))
    configs = tuple(f"{s}:{m}" for s, m in parse_configs(args.configs)) if args.configs else None
    points = experiment_points(exp.name, data, sizes, configs)
    if not args.cached_only:
        check_before_work(lm, points, EvalConfig(args.eval_data, sizes.eval_windows))
    bars = common.StageBars()
    print(f"{exp.title}: {len(points)} points ({sizes.name} sizes{', scaled' if args.scaled else ''})")

    def on_point(done: int, total: int, row: dict) -> None:
        bars.close()
        print(f"  [{done}/{total}] {row['config']} ratio {row['ratio']:g}, {row['calib_samples']} samples: "
              f"ppl {row['ppl']:.3f}{' (cached)' if row.get('cached') else ''}")

    start = time.perf_counter()
    try:
        result = run_experiment(lm, exp.name, data, sizes, args.eval_data, configs=configs,
                                compute=not args.cached_only, progress=lambda d, t, w: bars("prune", d, t, w),
                                on_point=on_point)
    finally:
        bars.close()
    result["timing_s"] = time.perf_counter() - start
    result["settings"] = {"model": data.model, "data": data.data, "seed": data.seed, "eval_data": args.eval_data,
                          "scaled": args.scaled}
    write_outputs(out, exp.name, result, to_csv(result["points"], RESULT_COLUMNS), paper_figure(result))
    print(format_result(result))
    return 0


def write_outputs(out: Path, name: str, result: dict, csv: str, fig) -> None:
    """EXPERIMENT.csv, .json and a standalone .html (and .png where a renderer is installed), atomically."""
    from ..cache import atomic_write_bytes

    out.mkdir(parents=True, exist_ok=True)
    common.write_text(out / f"{name}.csv", csv)
    common.write_json(out / f"{name}.json", result)
    atomic_write_bytes(out / f"{name}.html", fig.to_html(include_plotlyjs=True, full_html=True).encode())
    print(f"wrote {out / f'{name}.html'}")
    try:
        png = fig.to_image(format="png", width=1100, height=int(fig.layout.height or 500))
    except Exception:  # no static renderer (kaleido + a browser) installed: the HTML is the figure
        return
    atomic_write_bytes(out / f"{name}.png", png)
    print(f"wrote {out / f'{name}.png'}")


def format_result(result: dict) -> str:
    lines = [result["title"]]
    if result.get("dense"):
        lines.append(f"dense perplexity {result['dense']['ppl']:.3f}")
    for row in result["measured"]:
        lines.append("  " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    lines.append("published (LLaMA-7B):")
    for row in result["published"]:
        lines.append("  " + ", ".join(f"{k} {v}" for k, v in row.items()))
    for ratio, sentences in (result.get("against_rotation") or {}).items():
        for sentence in sentences.values():
            lines.append(f"at ratio {ratio}, {sentence}")
    cached = sum(1 for r in result["points"] if r.get("cached"))
    lines.append(f"{len(result['points'])} points ({cached} from cache, {len(result['points']) - cached} computed)"
                 + (f"; {result['missing']} not computed (--cached-only)" if result.get("missing") else ""))
    return "\n".join(lines)


def reproduce_table2(args: argparse.Namespace, data, out: Path) -> int:
    """``rcpu reproduce table2``: the dense model and each Table 2 config at 20%, through the zero-shot cache
    (``rcpu.paper.run_zeroshot_experiment``, which the Paper page calls too)."""
    from ..config import parse_configs
    from ..figures import accuracy_figure
    from ..paper import run_zeroshot_experiment
    from ..zeroshot import task_spec
    from .zeroshot import task_list

    if not args.tasks:
        from ..zeroshot import LOCAL_TASK_HELP

        raise RcpuError("table2 needs --tasks (the paper's: boolq, piqa, hellaswag, winogrande, arc_easy, "
                        f"arc_challenge, openbookqa with --online); {LOCAL_TASK_HELP}")
    tasks = task_list(args.tasks)
    for task in tasks:
        task_spec(task, args.online)  # before the model loads
    lm = common.load(data)
    sizes = experiment_sizes(args, lm.adapter.num_channels(0))
    configs = tuple(f"{s}:{m}" for s, m in parse_configs(args.configs)) if args.configs else None

    def on_point(done: int, total: int, row: dict) -> None:
        print(f"  [{done}/{total}] {row['config']}: mean accuracy {row['mean_accuracy']:.4f}"
              f"{' (cached)' if row.get('cached') else ''}")

    result = run_zeroshot_experiment(lm, data, sizes, tasks, configs=configs, limit=args.limit, online=args.online,
                                     compute=not args.cached_only, on_point=on_point)
    rows = result["points"]
    csv = "config,ratio,calib_samples,mean_accuracy,cached\n" + "".join(
        f"{r['config']},{r['ratio']},{r.get('calib_samples') or ''},{r['mean_accuracy']},{r.get('cached')}\n"
        for r in rows)
    write_outputs(out, "table2", result, csv, accuracy_figure(rows))
    print(format_result(result))
    return 0
