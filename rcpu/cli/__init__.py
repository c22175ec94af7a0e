"""Command-line interface: ``rcpu layer | prune | eval | sweep | cache | reproduce | zeroshot``.

The CLI only parses arguments into configs and prints; the work is in the library.
Errors the user can fix are one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from ..errors import RcpuError
from . import cache, layer, model, paper, zeroshot
from .args import apply_protocol, data_config, load

__all__ = ["build_parser", "data_config", "load", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rcpu", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    layer.add_command(sub)
    model.add_commands(sub)
    cache.add_command(sub)
    paper.add_command(sub)
    zeroshot.add_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    commands = next(a for a in parser._actions if a.dest == "command").choices
    args = apply_protocol(parser, commands[args.command], argv, args)
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
