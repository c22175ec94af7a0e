"""``rcpu prune``, ``rcpu eval`` and ``rcpu sweep``: whole-model commands."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from .compensate import DEFAULT_ALPHA, METHODS, check_alpha
from .errors import RcpuError
from .scores import SCORES


def _cli():
    from . import cli  # the shared argument helpers live there

    return cli


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eval-data", help="evaluate on this text from its start (default: held-out part of --data)")
    p.add_argument("--eval-windows", type=int, help="evaluate at most this many windows (default: all)")


def _prune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--targets", choices=["attn", "mlp", "both"], default="both")
    p.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help="ridge strength")


def cmd_prune(args: argparse.Namespace) -> int:
    from .evaluate import evaluation_windows, perplexity
    from .export import check_output_dir, save_pruned
    from .prune import PruneConfig, prune_model
    from .sweep import EvalSpec, dense_result
    from .text import load_text

    cli = _cli()
    data = cli._data_config(args)
    cfg = PruneConfig(args.ratio, args.targets, args.score, args.method, args.alpha)
    cfg.check()
    check_alpha(cfg.alpha)
    data.sampling.check()
    out = Path(args.out) if args.out else None
    if out is not None:
        check_output_dir(out, args.overwrite)
    json_out = cli._check_output(args.json)
    load_text(data.data)
    if args.eval_data:
        load_text(args.eval_data, split="test")
    lm = cli._load(data)
    _check_before_work(lm, [data], [cfg], args.eval_data, args.eval_windows)
    start = time.perf_counter()
    spec = EvalSpec(args.eval_data, args.eval_windows)
    bar = cli._progress_bar("dense perplexity")
    dense = dense_result(lm, data, spec, progress=bar)
    bar.close()
    bar = cli._progress_bar("pruning layers")
    result = prune_model(lm, data, cfg, progress=bar)
    bar.close()
    bar = cli._progress_bar("perplexity")
    ev = perplexity(result.model, evaluation_windows(lm, data, args.eval_data, args.eval_windows), progress=bar)
    bar.close()
    report = {
        **result.record(),
        "ppl": ev["ppl"],
        "ppl_dense": dense["ppl"],
        "params_before": result.params_before,
        "params_after": result.params_after,
        "eval_data": args.eval_data or f"{data.data} (held-out part)",
        "eval_tokens": ev["eval_tokens"],
        "eval_tokens_per_s": ev["tokens_per_s"],
        "layers": result.layers,
        "timing_s": {**result.timing_s, "eval": ev["seconds"], "total": time.perf_counter() - start},
    }
    if out is not None:
        record = {k: v for k, v in report.items() if k not in ("layers", "timing_s")}
        save_pruned(result.model, lm.tokenizer, out, record=record, overwrite=args.overwrite)
        report["out"] = str(out)
    print(
        f"pruned {cfg.ratio:.0%} of heads/channels ({cfg.targets}) by {cfg.label}: "
        f"params {result.params_before:,} -> {result.params_after:,}\n"
        f"perplexity {dense['ppl']:.3f} (dense) -> {ev['ppl']:.3f} on {ev['eval_tokens']} tokens; "
        f"took {report['timing_s']['total']:.1f} s"
        + (f"\nsaved to {out}" if out else "")
    )
    cli._write_json(json_out, report)
    return 0


def _check_before_work(lm, datas: list, configs: list, eval_data: str | None, eval_windows: int | None) -> None:
    """Refuse what would fail midway before anything is computed, cached or drawn as a progress bar:
    a ratio that leaves a layer nothing, a text too short for the sampling, too few evaluation tokens."""
    from .calibration import prepare_tokens
    from .evaluate import evaluation_windows
    from .prune import TARGETS
    from .scores import check_keeps_some

    adapter = lm.adapter
    for cfg in configs:
        for sub in TARGETS[cfg.targets]:
            for index in range(adapter.num_layers):
                check_keeps_some(adapter.num_units(index, sub), cfg.ratio, adapter.unit_name(sub))
    for data in {d.sampling: d for d in datas}.values():
        prepare_tokens(lm, data.data, data.sampling)  # kept in memory: the run reuses these tokens
    evaluation_windows(lm, datas[0], eval_data, eval_windows)


def cmd_eval(args: argparse.Namespace) -> int:
    from .config import DataConfig
    from .evaluate import evaluation_windows, perplexity
    from .models import count_parameters
    from .sweep import EvalSpec
    from .text import load_text

    cli = _cli()
    explicit = args.data is not None
    data = DataConfig(model=args.model, data=args.data or "embedded", seq_len=args.seq_len,
                      trust_remote_code=args.trust_remote_code)
    data.sampling.check()
    json_out = cli._check_output(args.json)
    load_text(data.data, split="test" if explicit else "train")
    lm = cli._load(data)
    windows = evaluation_windows(lm, data, data.data if explicit else None, args.eval_windows)
    bar = cli._progress_bar("perplexity")
    ev = perplexity(lm.model, windows, progress=bar)
    bar.close()
    record = getattr(lm.model.config, "rcpu", None) or {}
    params = count_parameters(lm.model)
    dense = _dense_of(record, data, EvalSpec(data.data if explicit else None, args.eval_windows)) if record else None
    report = {
        "model": args.model,
        "eval_data": data.data if explicit else f"{data.data} (held-out part)",
        "ppl": ev["ppl"],
        "ppl_dense": dense["ppl"] if dense else None,
        "params_before": record.get("params_before", params),
        "params_after": params,
        "eval_tokens": ev["eval_tokens"],
        "eval_tokens_per_s": ev["tokens_per_s"],
        "seq_len": data.seq_len,
        "pruning": record or None,
        "timing_s": {"eval": ev["seconds"]},
    }
    print(f"perplexity {ev['ppl']:.3f} on {ev['eval_tokens']} tokens ({ev['tokens_per_s']:.0f} tokens/s), "
          f"{params:,} parameters" + (f"; dense source model {dense['ppl']:.3f}" if dense else ""))
    cli._write_json(json_out, report)
    return 0


def _dense_of(record: dict, data, spec) -> dict | None:
    """Perplexity of the model a pruned folder came from, on the same windows (cached)."""
    import logging
    from dataclasses import replace

    from .models import load_model
    from .sweep import dense_result

    try:
        source = load_model(record["model"])
        return dense_result(source, replace(data, model=record["model"]), spec)
    except (RcpuError, KeyError) as exc:
        logging.getLogger("rcpu").warning("dense perplexity of the source model skipped: %s", exc)
        return None


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise RcpuError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise RcpuError(f"expected comma-separated integers, got {text!r}") from None


def cmd_sweep(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from .scores import check_ratio
    from .sweep import EvalSpec, SweepSpec, parse_configs, run_sweep, to_csv
    from .text import load_text

    cli = _cli()
    ratios = _floats(args.ratios)
    if not ratios:
        raise RcpuError(f"no ratios given in --ratios {args.ratios!r}; e.g. --ratios 0.1,0.2")
    for r in ratios:
        check_ratio(r)
    check_alpha(args.alpha)
    sizes = _ints(args.calib_samples) if args.calib_samples else None
    spec = SweepSpec(ratios, tuple(parse_configs(args.configs)), sizes, args.targets, args.alpha)
    data = cli._data_config(argparse.Namespace(**{**vars(args), "calib_samples": (sizes or (32,))[0]}))
    for n in sizes or (data.calib_samples,):
        replace(data, calib_samples=n).sampling.check()
    json_out = cli._check_output(args.json)
    csv_out = cli._check_output(args.csv)
    load_text(data.data)
    if args.eval_data:
        load_text(args.eval_data, split="test")
    lm = cli._load(data)
    points = spec.points(data)
    _check_before_work(lm, [d for d, _ in points], [c for _, c in points], args.eval_data, args.eval_windows)
    evaluation = EvalSpec(args.eval_data, args.eval_windows)
    n_points = len(points)
    from tqdm import tqdm

    bar = tqdm(total=n_points, desc="sweep points", unit="point")
    layer_bar = cli._progress_bar("layers")

    def on_point(done, total, row):
        bar.update(1)
        bar.set_postfix_str(f"{row['config']} r={row['ratio']} ppl={row['ppl']:.2f}")

    start = time.perf_counter()
    try:
        result = run_sweep(lm, data, spec, evaluation, progress=layer_bar, on_point=on_point)
    finally:  # an error or Ctrl-C then prints on a line of its own
        layer_bar.close()
        bar.close()
    result["timing_s"] = time.perf_counter() - start
    result["settings"] = {"model": data.model, "data": data.data, "seq_len": data.seq_len, "seed": data.seed,
                          "eval_data": evaluation.eval_data, "eval_windows": evaluation.eval_windows,
                          "targets": spec.targets}
    print(format_sweep(result))
    cli._write_json(json_out, result)
    if csv_out is not None:
        from .cache import atomic_write_bytes

        atomic_write_bytes(csv_out, to_csv(result["points"]).encode())
        print(f"wrote {csv_out}")
    return 0


def format_sweep(result: dict) -> str:
    rows = result["points"]
    dense = result["dense"]["ppl"]
    ratios = sorted({r["ratio"] for r in rows})
    sizes = sorted({r["calib_samples"] for r in rows})
    lines = [f"dense perplexity {dense:.3f}"]
    for n in sizes:
        lines.append(f"\ncalibration samples {n}")
        lines.append(f"  {'config':<28}" + "".join(f"{f'ratio {r:g}':>12}" for r in ratios))
        configs = list(dict.fromkeys(r["config"] for r in rows if r["calib_samples"] == n))
        for c in configs:
            cells = {r["ratio"]: r["ppl"] for r in rows if r["config"] == c and r["calib_samples"] == n}
            lines.append(f"  {c:<28}" + "".join(f"{cells.get(r, float('nan')):>12.3f}" for r in ratios))
    cached = sum(1 for r in rows if r.get("cached"))
    lines.append(f"\n{len(rows)} points ({cached} from cache, {len(rows) - cached} computed)")
    return "\n".join(lines)


def add_model_commands(sub) -> None:
    cli = _cli()
    p = sub.add_parser("prune", help="prune the whole model sequentially, evaluate, optionally save")
    cli._data_args(p)
    _prune_args(p)
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--score", default="rcpu", help=f"one of {', '.join(SCORES)}")
    p.add_argument("--method", default="rotation", help=f"one of {', '.join(METHODS)}")
    _eval_args(p)
    p.add_argument("--out", help="save the pruned model to this new directory")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--json", help="write the result to this file")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("eval", help="perplexity of a model (dense, or a pruned directory)")
    p.add_argument("--model", default="embedded")
    p.add_argument("--data", default=None, help="evaluate this text from its start (default: held-out part of the embedded text)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-windows", type=int)
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--json", help="write the result to this file")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("sweep", help="perplexity for every (ratio, score:method), cached per point")
    cli._data_args(p, calib_samples=False)
    _prune_args(p)
    p.add_argument("--ratios", default="0.1,0.2,0.3")
    p.add_argument("--configs", default="rcpu:rotation,wanda_sp:none,fluctuation:bias")
    p.add_argument("--calib-samples", dest="calib_samples", default=None,
                   help="comma-separated calibration sizes to sweep (default 32)")
    _eval_args(p)
    p.add_argument("--json", help="write all points to this file")
    p.add_argument("--csv", help="write all points as CSV")
    p.set_defaults(func=cmd_sweep)
