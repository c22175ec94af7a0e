"""What every command shares: options whose defaults come from the config classes, configs
built from parsed options, output paths checked before any work, JSON output, progress bars."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..allocate import ALLOCATIONS
from ..compensate import LAMBDA_METHODS, METHODS
from ..config import COMPENSATE, PROTOCOLS, TARGETS, DataConfig, EvalConfig, PruneConfig
from ..errors import RcpuError
from ..models import LoadedModel
from ..scores import ROUNDINGS, SCORES


def add_data_options(p: argparse.ArgumentParser, calib_samples: bool = True) -> None:
    d = DataConfig
    p.add_argument("--model", default=d.model, help="'embedded', a local model directory, a .gguf file or a hub id")
    p.add_argument("--data", default=d.data, help="'embedded', a .txt file or folder, 'wikitext2', 'hf:NAME[:CONFIG]'")
    if calib_samples:
        p.add_argument("--calib-samples", type=int, default=d.calib_samples)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--heldout-samples", type=int, default=d.heldout_samples,
                   help="held-out windows for held-out statistics")
    add_device_option(p)
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow a hub model's own code to run (off by default)")
    p.add_argument("--protocol", choices=list(PROTOCOLS), default=None,
                   help="a preset of settings; 'paper': 128 x 128 calibration tokens, 128-token perplexity windows, "
                        "int(ratio * units) units, both targets, WikiText-2 test for --data wikitext2 "
                        "(options given explicitly still win)")


def add_device_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=DataConfig.device,
                   help="where the model, statistics, compensation and evaluation run: cpu (default) or cuda[:N]")


def add_method_options(p: argparse.ArgumentParser, defaults, ratio: bool = True) -> None:
    """--ratio, --score, --method and --alpha with the defaults of ``defaults`` (a config class)."""
    if ratio:
        p.add_argument("--ratio", type=float, default=defaults.ratio)
    p.add_argument("--score", default=defaults.score, help=f"one of {', '.join(SCORES)}")
    p.add_argument("--method", default=defaults.method, help=f"one of {', '.join(METHODS)}; a whole-model prune "
                   "also takes 'auto' (chosen per sublayer on calibration folds)")
    add_alpha_option(p, defaults.alpha)
    p.add_argument("--lambda", dest="lam", type=float, default=defaults.lam,
                   help=f"strength of {', '.join(LAMBDA_METHODS)} (absolute, on the summed Gram)")
    add_rounding_option(p, defaults.rounding)


def add_alpha_option(p: argparse.ArgumentParser, default: float) -> None:
    p.add_argument("--alpha", type=float, default=default, help="ridge strength (relative to trace(G_KK) / k)")


def add_rounding_option(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--rounding", choices=list(ROUNDINGS), default=default,
                   help="units removed: ratio * units to the nearest, or truncated as the authors' code does")


def add_targets_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--targets", choices=list(TARGETS), default=PruneConfig.targets)
    p.add_argument("--gqa-balanced", action="store_true", default=PruneConfig.gqa_balanced,
                   help="remove the same number of query heads from every KV group, so that the pruned "
                        "model stays loadable by stock transformers")
    p.add_argument("--compensate", choices=list(COMPENSATE), default=PruneConfig.compensate,
                   help="which pruned sublayers get the compensation method (the paper's ablation: attn = o_proj "
                        "only, mlp = down_proj only); the others keep their weights")


def add_allocation_option(p: argparse.ArgumentParser, sweep: bool = False) -> None:
    """--allocation (prune) or --allocations (sweep: comma-separated, an axis)."""
    what = ("units removed per layer: 'uniform' (the ratio in every layer) or 'greedy' (the same total per "
            "sublayer kind, placed where the calibration-fold error rises least; layers then differ in shape, "
            "so the model is no longer stock-loadable, only by rcpu.load_pruned)")
    if sweep:
        p.add_argument("--allocations", default=PruneConfig.allocation, help=f"comma-separated; {what}")
    else:
        p.add_argument("--allocation", choices=list(ALLOCATIONS), default=PruneConfig.allocation, help=what)


def add_eval_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eval-data", default=EvalConfig.eval_data,
                   help="evaluate on this text from its start (default: held-out part of --data)")
    p.add_argument("--eval-windows", type=int, default=EvalConfig.eval_windows,
                   help="evaluate at most this many windows (default: all)")


def data_config(args: argparse.Namespace, **overrides) -> DataConfig:
    fields = {
        "model": args.model,
        "data": args.data,
        "calib_samples": getattr(args, "calib_samples", DataConfig.calib_samples),
        "seq_len": args.seq_len,
        "seed": args.seed,
        "heldout_samples": args.heldout_samples,
        "trust_remote_code": args.trust_remote_code,
        "device": getattr(args, "device", DataConfig.device),
    }
    return DataConfig(**{**fields, **overrides})


def eval_config(args: argparse.Namespace) -> EvalConfig:
    return EvalConfig(args.eval_data, args.eval_windows)


def apply_protocol(parser: argparse.ArgumentParser, sub: argparse.ArgumentParser, argv: list[str] | None,
                   args: argparse.Namespace) -> argparse.Namespace:
    """Parse again with ``--protocol``'s values as the command's defaults (explicit options still win)."""
    name = getattr(args, "protocol", None)
    if name is None:
        return args
    actions = {a.dest: a for a in sub._actions}
    preset = {}
    for dest, value in PROTOCOLS[name].items():
        if dest in actions:  # a list option (sweep's --calib-samples) takes the value as text
            preset[dest] = str(value) if actions[dest].type is None and actions[dest].choices is None else value
    sub.set_defaults(**preset)
    args = parser.parse_args(argv)
    if hasattr(args, "eval_data"):
        from ..config import protocol_eval_data

        args.eval_data = protocol_eval_data(name, args.data, args.eval_data)
    return args


def check_output(path: str | None, option: str = "--json") -> Path | None:
    """A JSON/CSV output path, checked before any work (its folder must exist)."""
    if path is None:
        return None
    out = Path(path)
    if out.exists() and out.is_dir():
        raise RcpuError(f"{option} {out} is a directory")
    if not out.parent.exists():
        raise RcpuError(f"folder {out.parent} does not exist")
    return out


def write_text(path: Path | None, text: str) -> None:
    if path is None:
        return
    from ..cache import atomic_write_bytes

    atomic_write_bytes(path, text.encode())
    print(f"wrote {path}")


def write_json(path: Path | None, payload: dict) -> None:
    write_text(path, json.dumps(payload, indent=2) + "\n")


def progress_bar(desc: str):
    """A tqdm-backed progress callback (done, total, what); ``.close()`` ends the bar."""
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


STAGE_LABELS = {"dense": "dense perplexity", "prune": "pruning layers", "eval": "perplexity"}


class StageBars:
    """One progress bar per stage of a workflow (``StageProgress``); a new stage closes the last."""

    def __init__(self):
        self._stage: str | None = None
        self._bar = None

    def __call__(self, stage: str, done: int, total: int, what: str) -> None:
        if stage != self._stage:
            self.close()
            self._stage, self._bar = stage, progress_bar(STAGE_LABELS.get(stage, stage))
        self._bar(done, total, what)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._stage, self._bar = None, None


def load(data: DataConfig) -> LoadedModel:
    from ..models import load_model

    return load_model(data.model, trust_remote_code=data.trust_remote_code, device=data.device)
