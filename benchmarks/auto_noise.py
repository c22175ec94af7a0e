"""How precisely does the auto table's evaluation rank two methods? ``python -m benchmarks.auto_noise``

The auto benchmark (``docs/benchmarks.md`` section 7) compares perplexities on 16 held-out windows
of 128 tokens against a 2% goal. This prunes the embedded model in its "more tokens per dimension"
regime (64 x 128 calibration tokens) with ``auto`` and with ``ls`` (the best fixed method there) at
each ratio given, evaluates both on the same held-out windows (the first 16, and every one the text
has), and prints the paired difference of mean NLL per window with its standard error: the
perplexity ratio is ``exp(difference)``, and the standard error says which differences the windows
can resolve. Windows are consecutive, so neighbours correlate and the true error is if anything
larger. It also prints the per-window spread of the difference, and the standard error a choice
between the two models measured end to end on the calibration windows (each held back once)
would have. A diagnostic of the evaluation (nothing here feeds a choice).
"""

from __future__ import annotations

import argparse
import math

import torch

from rcpu.allocate import FOLDS
from rcpu.calibration import prepare_tokens
from rcpu.config import DataConfig, EvalConfig, PruneConfig
from rcpu.evaluate import evaluation_windows, perplexity
from rcpu.models import load_model
from rcpu.prune import prune_model

TABLE_WINDOWS = 16  # what the auto benchmark's quick mode evaluates on


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of ``a - b`` and its standard deviation per window."""
    d = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    return float(d.mean()), float(d.std()) if len(d) > 1 else math.inf


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.3])
    parser.add_argument("--methods", nargs=2, default=["auto", "ls"], metavar=("A", "B"))
    parser.add_argument("--folds", type=int, default=FOLDS, help=f"auto's calibration folds (default {FOLDS})")
    args = parser.parse_args(argv)
    lm = load_model("embedded")
    data = DataConfig(model="embedded", calib_samples=64, seq_len=128, heldout_samples=0)
    tokens = prepare_tokens(lm, data.data, data.sampling)
    windows = evaluation_windows(lm, data, EvalConfig(None, None))
    first, second = args.methods
    print(f"{len(windows)} held-out windows of {data.seq_len} tokens; {first} against {second}; "
          f"auto on {args.folds} folds")
    print("ratio windows  ppl " + f"{first:>8s} {second:>8s}  ratio  mean NLL difference +- standard error")
    for ratio in args.ratios:
        nll = {}
        for method in args.methods:
            model = prune_model(lm, data, PruneConfig(ratio=ratio, method=method), tokens=tokens,
                                folds=args.folds).model
            nll[method] = perplexity(model, windows)["window_nll"]
            del model
        for n in (TABLE_WINDOWS, len(windows)):
            a, b = nll[first][:n], nll[second][:n]
            diff, spread = paired(a, b)  # windows as independent samples: standard error spread / sqrt(n)
            ppl_a, ppl_b = math.exp(sum(a) / n), math.exp(sum(b) / n)
            print(f"{ratio:5g} {n:7d}      {ppl_a:8.2f} {ppl_b:8.2f}  {math.exp(diff):.3f}  {diff:+.4f} +- "
                  f"{spread / math.sqrt(n):.4f}")
        # What a choice between the two measured end to end on calibration windows could resolve: each of
        # the calibration text's windows held back once, if its windows vary as the held-out ones do.
        _, spread = paired(nll[first], nll[second])
        print(f"      per-window standard deviation of the difference {spread:.3f}; on the {data.calib_samples} "
              f"calibration windows, one held back at a time: standard error "
              f"{spread / math.sqrt(data.calib_samples):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
