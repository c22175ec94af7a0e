"""``rcpu prune``, ``rcpu eval`` and ``rcpu sweep``: whole-model commands."""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import replace
from pathlib import Path

from ..config import DataConfig, EvalConfig, PruneConfig, SweepConfig, check_device, parse_configs
from ..errors import RcpuError
from . import args as common

log = logging.getLogger("rcpu")


def add_commands(sub) -> None:
    p = sub.add_parser("prune", help="prune the whole model sequentially, evaluate, optionally save")
    common.add_data_options(p)
    common.add_targets_option(p)
    common.add_method_options(p, PruneConfig)
    common.add_allocation_option(p)
    common.add_eval_options(p)
    p.add_argument("--out", help="save the pruned model to this new directory")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--json", help="write the result to this file")
    p.add_argument("--stream", action="store_true",
                   help="models larger than memory: read one layer at a time from the --model folder's safetensors "
                        "and write each pruned layer to --out as it finishes (no evaluation; run 'rcpu eval' after)")
    p.set_defaults(func=run_prune)

    p = sub.add_parser("eval", help="perplexity of a model (dense, or a pruned directory)")
    p.add_argument("--model", default=DataConfig.model)
    p.add_argument("--data", default=None,
                   help="evaluate this text from its start (default: held-out part of the embedded text)")
    p.add_argument("--seq-len", type=int, default=DataConfig.seq_len)
    p.add_argument("--eval-windows", type=int, default=EvalConfig.eval_windows)
    p.add_argument("--trust-remote-code", action="store_true")
    common.add_device_option(p)
    p.add_argument("--json", help="write the result to this file")
    p.set_defaults(func=run_eval)

    p = sub.add_parser("sweep", help="perplexity for every (ratio, score:method), cached per point")
    common.add_data_options(p, calib_samples=False)
    common.add_targets_option(p)
    common.add_alpha_option(p, SweepConfig.alpha)
    p.add_argument("--lambdas", default=",".join(f"{v:g}" for v in SweepConfig.lambdas),
                   help="comma-separated strengths for ls_ridge configs (an axis of the sweep)")
    common.add_rounding_option(p, SweepConfig.rounding)
    p.add_argument("--ratios", default=",".join(f"{r:g}" for r in SweepConfig.ratios))
    p.add_argument("--configs", default=SweepConfig().configs_text)
    common.add_allocation_option(p, sweep=True)
    p.add_argument("--calib-samples", dest="calib_samples", default=None,
                   help=f"comma-separated calibration sizes to sweep (default {DataConfig.calib_samples})")
    common.add_eval_options(p)
    p.add_argument("--json", help="write all points to this file")
    p.add_argument("--csv", help="write all points as CSV")
    p.set_defaults(func=run_sweep)


def run_prune(args: argparse.Namespace) -> int:
    from ..export import check_output_dir, save_pruned
    from ..pipeline import prune_and_evaluate
    from ..reports import spread_text, units_removed_text

    data = common.data_config(args)
    cfg = PruneConfig(args.ratio, args.targets, args.score, args.method, args.alpha, args.lam, args.rounding,
                      args.gqa_balanced, args.allocation, compensate=args.compensate)
    evaluation = common.eval_config(args)
    cfg.check()
    data.sampling.check()
    out = Path(args.out) if args.out else None
    if out is not None:
        check_output_dir(out, args.overwrite)
    json_out = common.check_output(args.json)
    data.check()
    if getattr(args, "stream", False):
        return _run_stream(data, cfg, out, json_out, args.overwrite)
    evaluation.check()
    lm = common.load(data)
    bars = common.StageBars()
    try:
        report = prune_and_evaluate(lm, data, cfg, evaluation, progress=bars)
    finally:
        bars.close()
    payload = report.to_json()
    if out is not None:
        save_pruned(report.result.model, lm.tokenizer, out, record=report.settings(), overwrite=args.overwrite)
        payload["out"] = str(out)
    units = units_removed_text(payload)
    per_dim = ", ".join(f"{s} {v:.2f}" for s, v in payload["calibration_tokens_per_input_dim"].items())
    print(
        f"pruned {cfg.ratio:.0%} of heads/channels ({cfg.targets}) by {cfg.label}: {units} "
        f"({cfg.rounding}); params {payload['params_before']:,} -> {payload['params_after']:,}\n"
        f"calibration tokens per input dimension: {per_dim}\n"
        + "all layers: "
        + ", ".join(f"{what.replace('_', ' ')} {a:,} -> {b:,}" for what, (a, b) in payload["shape"].items())
        + ("; loads with stock transformers as " + payload["stock_class"] if payload["stock_loadable"]
           else "; not stock-loadable (" + payload["why_not_stock"] + "): load with rcpu.load_pruned or rcpu eval")
        + "\n"
        f"perplexity {payload['ppl_dense']:.3f} (dense) -> {payload['ppl']:.3f} on {payload['eval_tokens']} tokens; "
        f"took {payload['timing_s']['total']:.1f} s"
        + (f"\nallocation: {spread_text(payload['allocated']['spread'])}" if "spread" in payload["allocated"] else "")
        + (f"\nsaved to {out}" if out else "")
    )
    common.write_json(json_out, payload)
    return 0


def _run_stream(data: DataConfig, cfg: PruneConfig, out: Path | None, json_out: Path | None, overwrite: bool) -> int:
    from ..stream import stream_prune

    if out is None:
        raise RcpuError("--stream writes each pruned layer as it finishes: give the folder with --out")
    bar = common.progress_bar("prune (streamed)")
    result = stream_prune(data.model, out, data, cfg, progress=bar, overwrite=overwrite, device=data.device,
                          record={"config": cfg.label, "model": data.model, "data": data.data,
                                  "calib_samples": data.calib_samples, "seq_len": data.seq_len, "seed": data.seed})
    payload = {"out": str(out), "config": cfg.label, "ratio": cfg.ratio, "targets": cfg.targets,
               "params_before": result.params_before, "params_after": result.params_after,
               "layers": result.layers, "timing_s": result.timing_s}
    print(f"pruned {cfg.ratio:.0%} of heads/channels ({cfg.targets}) by {cfg.label}, one layer at a time; params "
          f"{result.params_before:,} -> {result.params_after:,}; took {result.timing_s['total']:.1f} s\n"
          f"saved to {out} (rcpu layout: 'rcpu eval --model {out}' or rcpu.load_pruned loads it)")
    common.write_json(json_out, payload)
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from ..evaluate import evaluation_windows, perplexity
    from ..models import count_parameters
    from ..text import load_text

    explicit = args.data is not None
    data = DataConfig(model=args.model, data=args.data or DataConfig.data, seq_len=args.seq_len,
                      trust_remote_code=args.trust_remote_code, device=args.device)
    evaluation = EvalConfig(data.data if explicit else None, args.eval_windows)
    data.sampling.check()
    check_device(data.device)
    evaluation.check()
    json_out = common.check_output(args.json)
    load_text(data.data, split="test" if explicit else "train")
    lm = common.load(data)
    windows = evaluation_windows(lm, data, evaluation)
    bar = common.progress_bar("perplexity")
    try:
        ev = perplexity(lm.model, windows, progress=bar)
    finally:
        bar.close()
    record = getattr(lm.model.config, "rcpu", None) or {}
    params = count_parameters(lm.model)
    dense = _source_perplexity(record, data, evaluation) if record else None
    report = {
        "model": args.model,
        "eval_data": evaluation.describe(data),
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
    common.write_json(json_out, report)
    return 0


def _source_perplexity(record: dict, data, evaluation: EvalConfig) -> dict | None:
    """Perplexity of the model a pruned folder came from, on the same windows (cached)."""
    from ..models import load_model
    from ..pipeline import dense_perplexity

    try:
        source = load_model(record["model"])
        return dense_perplexity(source, replace(data, model=record["model"]), evaluation)
    except (RcpuError, KeyError) as exc:
        log.warning("dense perplexity of the source model skipped: %s", exc)
        return None


def _numbers(text: str, kind: type, what: str) -> tuple:
    try:
        return tuple(kind(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise RcpuError(f"expected comma-separated {what}, got {text!r}") from None


def run_sweep(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..pipeline import check_before_work
    from ..sweep import run_sweep as sweep
    from ..sweep import to_csv

    ratios = _numbers(args.ratios, float, "numbers")
    if not ratios:
        raise RcpuError(f"no ratios given in --ratios {args.ratios!r}; e.g. --ratios 0.1,0.2")
    sizes = _numbers(args.calib_samples, int, "integers") if args.calib_samples else None
    lambdas = _numbers(args.lambdas, float, "numbers")
    allocations = tuple(filter(None, (a.strip() for a in args.allocations.split(","))))
    spec = SweepConfig(ratios, parse_configs(args.configs), sizes, args.targets, args.alpha, lambdas, args.rounding,
                       args.gqa_balanced, allocations, compensate=args.compensate)
    data = common.data_config(args, calib_samples=(sizes or (DataConfig.calib_samples,))[0])
    evaluation = common.eval_config(args)
    spec.check(data)
    json_out = common.check_output(args.json)
    csv_out = common.check_output(args.csv, "--csv")
    data.check()
    evaluation.check()
    lm = common.load(data)
    check_before_work(lm, spec.points(data), evaluation)
    bar = tqdm(total=len(spec.points(data)), desc="sweep points", unit="point")
    layer_bar = common.progress_bar("layers")

    def on_point(done, total, row):
        bar.update(1)
        bar.set_postfix_str(f"{row['config']} r={row['ratio']} ppl={row['ppl']:.2f}")

    start = time.perf_counter()
    try:
        result = sweep(lm, data, spec, evaluation, progress=layer_bar, on_point=on_point)
    finally:  # an error or Ctrl-C then prints on a line of its own
        layer_bar.close()
        bar.close()
    result["timing_s"] = time.perf_counter() - start
    result["settings"] = {"model": data.model, "data": data.data, "seq_len": data.seq_len, "seed": data.seed,
                          "eval_data": evaluation.eval_data, "eval_windows": evaluation.eval_windows,
                          "targets": spec.targets}
    print(format_sweep(result))
    common.write_json(json_out, result)
    if csv_out is not None:
        common.write_text(csv_out, to_csv(result["points"]))
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
