"""``rcpu zeroshot``: zero-shot accuracy through lm-evaluation-harness (dense, a pruned folder, or pruned in memory)."""

from __future__ import annotations

import argparse

from ..config import PruneConfig
from ..errors import RcpuError
from . import args as common


def add_command(sub) -> None:
    p = sub.add_parser("zeroshot", help="zero-shot accuracy through lm-evaluation-harness (offline: local task files)")
    common.add_data_options(p)
    common.add_targets_option(p)
    common.add_method_options(p, PruneConfig, ratio=False)
    p.add_argument("--ratio", type=float, default=None,
                   help="prune this share in memory first (default: evaluate --model as it is, e.g. a pruned folder)")
    add_task_options(p)
    p.add_argument("--json", help="write the result to this file")
    p.set_defaults(func=run_zeroshot)


def add_task_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tasks", required=True,
                   help="comma-separated lm-eval task names (need the hub: --online) or local YAML task files")
    p.add_argument("--limit", type=int, default=None, help="at most this many examples per task")
    p.add_argument("--online", action="store_true", help="let lm-eval download task data from the Hugging Face hub")


def task_list(text: str) -> list[str]:
    from ..zeroshot import LOCAL_TASK_HELP

    tasks = [t.strip() for t in text.split(",") if t.strip()]
    if not tasks:
        raise RcpuError("no tasks given; " + LOCAL_TASK_HELP)
    return tasks


def run_zeroshot(args: argparse.Namespace) -> int:
    from ..zeroshot import task_spec, zeroshot_point

    tasks = task_list(args.tasks)
    for task in tasks:
        task_spec(task, args.online)  # a name offline, or a missing file: one line before the model loads
    json_out = common.check_output(args.json)
    data = common.data_config(args)
    cfg = None
    if args.ratio is not None:
        cfg = PruneConfig(args.ratio, args.targets, args.score, args.method, args.alpha, args.lam, args.rounding,
                          args.gqa_balanced, compensate=args.compensate)
        cfg.check()
        data.check()
    lm = common.load(data)
    bar = common.progress_bar("pruning layers")
    try:
        row = zeroshot_point(lm, data, cfg, tasks, limit=args.limit, online=args.online, progress=bar)
    finally:
        bar.close()
    accuracies = ", ".join(f"{name} {acc:.4f}" for name, acc in row["tasks"].items())
    print(f"{row['config']}: mean accuracy {row['mean_accuracy']:.4f} ({accuracies})"
          + (" (cached)" if row.get("cached") else ""))
    common.write_json(json_out, {"model": data.model, **row})
    return 0
