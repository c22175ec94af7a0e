"""``rcpu cache``: show or clear the local cache."""

from __future__ import annotations

import argparse

from ..errors import RcpuError

SECTIONS = ("models", "stats", "results", "uploads")


def add_command(sub) -> None:
    p = sub.add_parser("cache", help="show or clear the local cache")
    p.add_argument("action", choices=["info", "clear"], nargs="?", default="info")
    p.add_argument("--section", help=f"only this part ({', '.join(SECTIONS)})")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..cache import cache_root, cache_size, clear_cache

    if args.action == "clear":
        known = sorted(set(SECTIONS) | set(cache_size()))
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
