"""Command-line interface: ``rcpu layer | prune | eval | sweep | cache``.

The CLI only parses arguments into configs and prints; the work is in the library.
Errors the user can fix are one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from .compensate import DEFAULT_ALPHA, METHODS, check_alpha
from .config import DataConfig, LayerConfig
from .errors import RcpuError
from .scores import SCORES, check_ratio
from .text import load_text

log = logging.getLogger("rcpu")


def _data_args(p: argparse.ArgumentParser, calib_samples: bool = True) -> None:
    p.add_argument("--model", default="embedded", help="'embedded', a local model directory, a .gguf file or a hub id")
    p.add_argument("--data", default="embedded", help="'embedded', a .txt file or folder, 'wikitext2', 'hf:NAME[:CONFIG]'")
    if calib_samples:
        p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heldout-samples", type=int, default=8, help="held-out windows for held-out statistics")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a hub model's own code to run (off by default)")


def _data_config(args: argparse.Namespace) -> DataConfig:
    return DataConfig(
        model=args.model,
        data=args.data,
        calib_samples=args.calib_samples,
        seq_len=args.seq_len,
        seed=args.seed,
        heldout_samples=args.heldout_samples,
        trust_remote_code=args.trust_remote_code,
    )


def _check_output(path: str | None) -> Path | None:
    """A JSON/CSV output path, checked before any work (its folder must exist)."""
    if path is None:
        return None
    out = Path(path)
    if out.exists() and out.is_dir():
        raise RcpuError(f"--json {out} is a directory")
    if not out.parent.exists():
        raise RcpuError(f"folder {out.parent} does not exist")
    return out


def _write_json(path: Path | None, payload: dict) -> None:
    if path is None:
        return
    from .cache import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(payload, indent=2) + "\n").encode())
    print(f"wrote {path}")


def _progress_bar(desc: str):
    """A tqdm-backed progress callback (done, total, what)."""
    from tqdm import tqdm

    bar = {"bar": None}

    def update(done: int, total: int, what: str) -> None:
        if bar["bar"] is None or bar["bar"].total != total:
            if bar["bar"] is not None:
                bar["bar"].close()
            bar["bar"] = tqdm(total=total, desc=desc, unit="step", leave=False, file=sys.stderr)
        bar["bar"].n = done
        bar["bar"].set_postfix_str(what, refresh=True)

    update.close = lambda: bar["bar"] and bar["bar"].close()  # type: ignore[attr-defined]
    return update


def _load(data: DataConfig):
    from .models import load_model

    return load_model(data.model, trust_remote_code=data.trust_remote_code)


# rcpu layer -------------------------------------------------------------------


def cmd_layer(args: argparse.Namespace) -> int:
    from .explore import layer_report

    data = _data_config(args)
    cfg = LayerConfig(args.layer, args.sublayer, args.ratio, args.score, args.method, args.alpha)
    out = _check_output(args.json)
    _validate_choices(cfg.score, cfg.method)
    check_ratio(cfg.ratio)
    check_alpha(cfg.alpha)
    data.sampling.check()
    load_text(data.data)  # fail on a bad text before the model loads
    lm = _load(data)
    progress = _progress_bar("statistics")
    try:
        report = layer_report(lm, data, cfg, progress)
    finally:
        progress.close()
    print(format_layer_report(report))
    _write_json(out, report)
    return 0


def _validate_choices(score: str, method: str) -> None:
    from .compensate import check_method
    from .scores import check_score

    check_score(score)
    check_method(method)


def _num(value, spec: str = ".4f") -> str:
    return "n/a" if value is None else format(value, spec)


def format_layer_report(r: dict) -> str:
    unit = "heads" if r["sublayer"] == "o_proj" else "channels"
    n_units = len(r["kept_units"]) + len(r["pruned_units"])
    lines = [
        f"layer {r['layer']} {r['sublayer']}  ({r['d_out']} x {r['d_in']})  model={r['model']} data={r['data']}",
        f"pruned {len(r['pruned_units'])} of {n_units} {unit} (ratio {r['ratio']}) by score '{r['score']}', "
        f"compensated by '{r['method']}'",
        f"  calibration tokens {r['settings']['calibration_tokens']}, held-out tokens {r['settings']['heldout_tokens']}",
        "",
        f"  {'relative output error':<28}{'calibration':>12}{'held-out':>12}",
        f"  {'uncompensated':<28}{r['error_uncompensated']['calibration']:>12.4f}{r['error_uncompensated']['heldout']:>12.4f}",
        f"  {'compensated (' + r['method'] + ')':<28}{r['error']['calibration']:>12.4f}{r['error']['heldout']:>12.4f}",
        "",
        "  norm ratio ||yhat||/||y||   " + "  ".join(f"{k} {_num(r['norm_ratio'][k])}" for k in ("mean", "p05", "p95")),
        "  cosine(yhat, y)             " + "  ".join(f"{k} {_num(r['cosine'][k])}" for k in ("mean", "p05", "p95")),
        f"  Gram distortion             {r['gram_distortion']:.4f}",
        f"  principal angles (deg)      {', '.join(f'{a:.1f}' for a in r['principal_angles_deg'][:4])} ...",
    ]
    if r["orthogonality_error"] is not None:
        lines.append(
            f"  Q: ||Q^T Q - I|| {r['orthogonality_error']:.1e}, ||Q - I|| {r['distance_from_identity']:.3f}, "
            f"cond(M) {_num(r['condition_number_M'], '.3g')}"
        )
    t = r["timing_s"]
    lines.append(
        f"  time: statistics {t['statistics']:.2f} s ({'cache' if t['statistics_from_cache'] else 'computed'}), "
        f"total {t['total']:.2f} s"
    )
    return "\n".join(lines)


# rcpu cache -------------------------------------------------------------------

CACHE_SECTIONS = ("models", "stats", "results", "uploads")


def cmd_cache(args: argparse.Namespace) -> int:
    from .cache import cache_root, cache_size, clear_cache

    if args.action == "clear":
        known = sorted(set(CACHE_SECTIONS) | set(cache_size()))
        if args.section is not None and args.section not in known:
            raise RcpuError(f"unknown cache section {args.section!r}; choose one of: {', '.join(known)}")
        freed = clear_cache(args.section)
        print(f"freed {freed / 1e6:.1f} MB in {cache_root()}")
    else:
        sizes = cache_size()
        print(f"cache: {cache_root()}")
        for name, size in sorted(sizes.items()):
            print(f"  {name:<12}{size / 1e6:>10.1f} MB")
        print(f"  {'total':<12}{sum(sizes.values()) / 1e6:>10.1f} MB")
    return 0


# parser -------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rcpu", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("layer", help="prune and compensate one sublayer, print diagnostics")
    _data_args(p)
    p.add_argument("--layer", type=int, default=15)
    p.add_argument("--sublayer", choices=["o_proj", "down_proj"], default="down_proj")
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--score", default="rcpu", help=f"one of {', '.join(SCORES)}")
    p.add_argument("--method", default="rotation", help=f"one of {', '.join(METHODS)}")
    p.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help="ridge strength")
    p.add_argument("--json", help="write the full result to this file")
    p.set_defaults(func=cmd_layer)

    from .cli_model import add_model_commands

    add_model_commands(sub)

    p = sub.add_parser("cache", help="show or clear the local cache")
    p.add_argument("action", choices=["info", "clear"], nargs="?", default="info")
    p.add_argument("--section", help="only this part (models, stats, results)")
    p.set_defaults(func=cmd_cache)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s"
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        return args.func(args)
    except RcpuError as exc:
        _close_progress_bars()
        print(f"rcpu: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _close_progress_bars()
        print("rcpu: interrupted; finished work is kept in the cache", file=sys.stderr)
        return 130


def _close_progress_bars() -> None:
    """Close bars left open by an error, so that its message starts a line of its own."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()
