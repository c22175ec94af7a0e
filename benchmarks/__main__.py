"""``python -m benchmarks all|floor|explorer|memory|eval|quality|size|auto|report [--quick|--tiny]``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from . import BENCHMARKS
from .common import DOCS_PATH, RESULTS_DIR, machine, say, settings_for


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("what", choices=("all", *BENCHMARKS, "report", "memory-worker"),
                   help="a benchmark, all of them, or 'report' (only rewrite the docs from the JSON files)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="reduced sizes (listed in the summary); meant to finish in minutes on 2 cores")
    size.add_argument("--tiny", action="store_true", help="a tiny random model and small shapes (tests only)")
    p.add_argument("--mode", choices=("full", "quick", "tiny"), help=argparse.SUPPRESS)
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where the JSON results go")
    p.add_argument("--docs", type=Path, default=DOCS_PATH, help="the Markdown summary (plots go to its img/)")
    p.add_argument("--eval-data", action="append", default=[],
                   help="quality: also evaluate on this text (a .txt file or folder); repeatable")
    p.add_argument("--cached-only", action="store_true",
                   help="auto: tabulate only the sweep points already cached (compute none)")
    p.add_argument("--regime", action="append", default=[],
                   help="auto: run only this calibration regime (repeatable; the others keep their tables from "
                        "the previous result)")
    p.add_argument("--profile", action="store_true", help="cProfile the timed work; top functions go in the JSON")
    p.add_argument("--threads", type=int, help="torch.set_num_threads for this run (default: torch's choice)")
    p.add_argument("--samples", type=int, help=argparse.SUPPRESS)  # memory-worker
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    mode = args.mode or ("quick" if args.quick else "tiny" if args.tiny else "full")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.what == "memory-worker":
        from .memory import worker

        print(json.dumps(worker(mode, args.samples)))
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from .report import write_docs

    command = "python -m benchmarks " + " ".join(argv)
    if args.what == "report":
        say(f"wrote {write_docs(args.results_dir, args.docs, command)}")
        return 0
    settings = settings_for(mode)
    names = BENCHMARKS if args.what == "all" else (args.what,)
    m = machine()
    say(f"benchmarks {', '.join(names)} ({mode} mode): {m['nproc']} CPUs ({m['cpu']}), torch threads "
        f"{m['torch_threads']}, load average {m['load_average']}")
    from .common import load_lm

    lm = load_lm(settings) if set(names) - {"memory"} else None
    from . import appcost, auto, evalspeed, explorer, floor, memory, quality, size

    modules = {"floor": floor, "explorer": explorer, "memory": memory, "eval": evalspeed, "quality": quality,
               "size": size, "auto": auto, "appcost": appcost}
    total = time.perf_counter()
    for name in names:
        started = time.perf_counter()
        extra = {"eval_data": args.eval_data} if name == "quality" else {}
        if name == "auto":
            extra = {"cached_only": args.cached_only, "only": tuple(args.regime)}
        modules[name].run(lm, settings, args.results_dir, started, profile=args.profile, **extra)
        say(f"  ({name}: {time.perf_counter() - started:.0f} s)")
        write_docs(args.results_dir, args.docs, command)
    say(f"done in {time.perf_counter() - total:.0f} s; results in {args.results_dir}, summary in {args.docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
