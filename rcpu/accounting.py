"""What a prune removed, per unit kind and per module: heads, KV heads, channels, parameters.

The parameter total alone can hide that a step saved nothing (heads removed from ``o_proj``'s
inputs while ``q/k/v`` keep their size); these tables show each module's count before and after.
"""

from __future__ import annotations

from collections import defaultdict

from torch import nn

UNIT_NAMES = {"heads": "attention heads", "kv_heads": "KV heads", "channels": "MLP channels"}


def params_by_module(model: nn.Module) -> dict[str, int]:
    """Parameters per kind of linear module (its attribute name in the layer) summed over layers."""
    counts: dict[str, int] = defaultdict(int)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and ".layers." in f".{name}":
            kind = name.rsplit(".", 1)[-1]
            counts[kind] += sum(p.numel() for p in module.parameters(recurse=False))
    return dict(counts)


def unit_rows(shape: dict) -> list[dict]:
    """Rows of units summed over layers from a ``PruneReport`` JSON's ``shape`` ({what: [before, after]})."""
    return [{"units": UNIT_NAMES.get(what, what), "before": before, "after": after, "removed": before - after,
             "removed (%)": f"{(before - after) / before:.1%}" if before else "–"}
            for what, (before, after) in shape.items()]


def module_rows(before: dict[str, int], after: dict[str, int]) -> list[dict]:
    """Rows of parameters per module kind, before and after, and what was saved."""
    rows = []
    for kind, b in before.items():
        a = after.get(kind, 0)
        rows.append({"module": kind, "parameters before": b, "parameters after": a, "saved": b - a,
                     "saved (%)": f"{(b - a) / b:.1%}" if b else "–"})
    return rows
