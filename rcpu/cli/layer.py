"""``rcpu layer``: prune and compensate one sublayer, print its diagnostics."""

from __future__ import annotations

import argparse

from ..adapters import SUBLAYERS
from ..config import LayerConfig
from . import args as common


def add_command(sub) -> None:
    p = sub.add_parser("layer", help="prune and compensate one sublayer, print diagnostics")
    common.add_data_options(p)
    p.add_argument("--layer", type=int, default=LayerConfig.layer)
    p.add_argument("--sublayer", choices=list(SUBLAYERS), default=LayerConfig.sublayer)
    common.add_method_options(p, LayerConfig)
    p.add_argument("--json", help="write the full result to this file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..explorer import LayerExplorer

    data = common.data_config(args)
    cfg = LayerConfig(args.layer, args.sublayer, args.ratio, args.score, args.method, args.alpha, args.lam,
                      args.rounding)
    out = common.check_output(args.json)
    cfg.check()
    data.check()  # a bad text fails before the model loads
    lm = common.load(data)
    progress = common.progress_bar("statistics")
    try:
        report = LayerExplorer().explore(lm, data, cfg, progress=progress).to_json()
    finally:
        progress.close()
    print(format_report(report))
    common.write_json(out, report)
    return 0


def _num(value, spec: str = ".4f") -> str:
    return "n/a" if value is None else format(value, spec)


def format_report(r: dict) -> str:
    unit = "heads" if r["sublayer"] == "o_proj" else "channels"
    n_units = len(r["kept_units"]) + len(r["pruned_units"])
    unc, err = r["error_uncompensated"], r["error"]
    tokens = r["settings"]
    lines = [
        f"layer {r['layer']} {r['sublayer']}  ({r['d_out']} x {r['d_in']})  model={r['model']} data={r['data']}",
        (f"pruned {len(r['pruned_units'])} of {n_units} {unit} (ratio {r['ratio']}) by score '{r['score']}', "
         f"compensated by '{r['method']}'"),
        (f"  calibration tokens {tokens['calibration_tokens']} "
         f"({tokens['calibration_tokens_per_input_dim']:.2f} per input dimension), "
         f"held-out tokens {tokens['heldout_tokens']}"),
        "",
        f"  {'relative output error':<28}{'calibration':>12}{'held-out':>12}",
        f"  {'uncompensated':<28}{unc['calibration']:>12.4f}{unc['heldout']:>12.4f}",
        f"  {'compensated (' + r['method'] + ')':<28}{err['calibration']:>12.4f}{err['heldout']:>12.4f}",
        "",
        "  norm ratio ||yhat||/||y||   " + "  ".join(f"{k} {_num(r['norm_ratio'][k])}" for k in ("mean", "p05", "p95")),
        "  cosine(yhat, y)             " + "  ".join(f"{k} {_num(r['cosine'][k])}" for k in ("mean", "p05", "p95")),
        f"  Gram distortion             {r['gram_distortion']:.4f}",
        f"  principal angles (deg)      {', '.join(f'{a:.1f}' for a in r['principal_angles_deg'][:4])} ...",
    ]
    if r["orthogonality_error"] is not None:
        lines.append(
            f"  Q: ||Q^T Q - I|| {r['orthogonality_error']:.1e}, ||Q - I|| {r['distance_from_identity']:.3f}, "
            f"rank(M) {r['rank_M']} of {r['d_out']}, cond(M) {_num(r['condition_number_M'], '.3g')}"
        )
    t = r["timing_s"]
    lines.append(
        f"  time: statistics {t['statistics']:.2f} s ({'cache' if t['statistics_from_cache'] else 'computed'}), "
        f"total {t['total']:.2f} s"
    )
    return "\n".join(lines)
