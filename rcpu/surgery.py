"""Physical removal of heads and channels, and the masked equivalent.

A layer's attention keeps its query heads in original order, so the kept heads of
one KV group stay contiguous. When KV groups keep different numbers of query
heads (GQA, e.g. 9 query heads in 3 groups), each KV head is repeated so that
every group has the same size ``g`` (the gcd of the kept group sizes): the
result runs in stock transformers' attention with ``num_key_value_groups = g``
and computes exactly what the unevenly grouped heads would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .adapters import LlamaLayoutAdapter
from .compensate import Compensation


@dataclass
class SublayerPlan:
    """What to do to one sublayer: which units stay and the compensated weights."""

    sublayer: str  # o_proj | down_proj
    kept_units: Tensor  # sorted original unit indices
    kept: Tensor  # kept columns
    compensation: Compensation


def _linear(weight: Tensor, bias: Tensor | None, like: nn.Linear) -> nn.Linear:
    out_f, in_f = weight.shape
    layer = nn.Linear(in_f, out_f, bias=bias is not None, device=like.weight.device, dtype=like.weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    layer.requires_grad_(False)
    return layer


def _rows(linear: nn.Linear, rows: Tensor) -> nn.Linear:
    bias = linear.bias[rows] if linear.bias is not None else None
    return _linear(linear.weight[rows], bias, linear)


def _compensated(linear: nn.Linear, comp: Compensation) -> nn.Linear:
    dtype = linear.weight.dtype
    bias = linear.bias.detach().to(torch.float64) if linear.bias is not None else None
    if comp.bias is not None:
        bias = comp.bias if bias is None else bias + comp.bias
    return _linear(comp.weight.to(dtype), None if bias is None else bias.to(dtype), linear)


def head_rows(heads: Tensor, head_dim: int) -> Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)


def kv_layout(kept_heads: Tensor, n_rep: int) -> tuple[Tensor, int]:
    """(KV head for each new KV slot, new group size g) for kept query heads (sorted).

    Original query head ``h`` uses KV head ``h // n_rep``; each KV head with ``c`` kept
    query heads gets ``c / g`` slots, ``g`` the gcd of the counts.
    """
    groups, counts = torch.unique(kept_heads // n_rep, return_counts=True)
    g = math.gcd(*counts.tolist())
    slots = torch.repeat_interleave(groups, counts // g)
    return slots, g


def prune_attention(adapter: LlamaLayoutAdapter, index: int, plan: SublayerPlan) -> None:
    """Remove query heads (and KV heads left without query heads) of layer ``index``."""
    attn = adapter.attention(index)
    hd = adapter.head_dim
    n_rep = attn.num_key_value_groups
    kept_heads = plan.kept_units
    slots, group = kv_layout(kept_heads, n_rep)
    attn.q_proj = _rows(attn.q_proj, head_rows(kept_heads, hd))
    attn.k_proj = _rows(attn.k_proj, head_rows(slots, hd))
    attn.v_proj = _rows(attn.v_proj, head_rows(slots, hd))
    attn.o_proj = _compensated(attn.o_proj, plan.compensation)
    attn.num_key_value_groups = group
    attn.rcpu_groups = torch.unique(kept_heads // n_rep, return_counts=True)[1].tolist()


def prune_mlp(adapter: LlamaLayoutAdapter, index: int, plan: SublayerPlan) -> None:
    """Remove intermediate channels of layer ``index`` (gate/up rows, down columns)."""
    mlp = adapter.mlp(index)
    mlp.gate_proj = _rows(mlp.gate_proj, plan.kept)
    mlp.up_proj = _rows(mlp.up_proj, plan.kept)
    mlp.down_proj = _compensated(mlp.down_proj, plan.compensation)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(plan.kept)


def apply_plan(adapter: LlamaLayoutAdapter, index: int, plan: SublayerPlan) -> None:
    (prune_attention if plan.sublayer == "o_proj" else prune_mlp)(adapter, index, plan)


def mask_plan(adapter: LlamaLayoutAdapter, index: int, plan: SublayerPlan) -> None:
    """The masked equivalent: full shapes, pruned columns zeroed, kept columns compensated."""
    linear = adapter.sublayer(index, plan.sublayer)
    full = torch.zeros(linear.weight.shape, dtype=torch.float64)
    full[:, plan.kept] = plan.compensation.weight
    masked = Compensation(weight=full, bias=plan.compensation.bias)
    new = _compensated(linear, masked)
    owner = adapter.attention(index) if plan.sublayer == "o_proj" else adapter.mlp(index)
    setattr(owner, plan.sublayer, new)


def kv_groups(attn: nn.Module) -> list[int]:
    """Kept query heads per distinct KV head, in order (uniform for an unpruned layer)."""
    groups = getattr(attn, "rcpu_groups", None)
    if groups is None:
        n_kv = attn.k_proj.out_features // (attn.q_proj.out_features // attn.num_key_value_groups)
        groups = [attn.num_key_value_groups] * n_kv
    return list(groups)


def slots_needed(groups: list[int], group_size: int) -> int:
    return sum(-(-c // group_size) for c in groups)


def relayout_attention(adapter: LlamaLayoutAdapter, index: int, group_size: int, n_slots: int) -> None:
    """Re-lay a layer's heads as ``n_slots`` KV heads serving ``group_size`` query heads each.

    Each distinct KV head gets ``ceil(c / group_size)`` slots for its ``c`` query heads;
    unfilled query positions and unused slots are zero heads (zero ``q``/``k``/``v``
    rows and zero ``o_proj`` columns), which add exactly nothing to the output.
    """
    attn = adapter.attention(index)
    hd = adapter.head_dim
    groups = kv_groups(attn)
    current = attn.num_key_value_groups
    queries: list[int | None] = []  # current query head for each new position (None: zero head)
    sources: list[int | None] = []  # current KV slot for each new slot (None: zero slot)
    q_offset, slot_offset = 0, 0
    for count in groups:
        for chunk in range(0, count, group_size):
            real = list(range(q_offset + chunk, q_offset + min(chunk + group_size, count)))
            queries += real + [None] * (group_size - len(real))
            sources.append(slot_offset)
        q_offset += count
        slot_offset += count // current
    if len(sources) > n_slots:
        raise ValueError(f"layer {index} needs {len(sources)} KV slots, only {n_slots} allowed")
    queries += [None] * (group_size * (n_slots - len(sources)))
    sources += [None] * (n_slots - len(sources))
    attn.q_proj = _gather_rows(attn.q_proj, queries, hd)
    attn.k_proj = _gather_rows(attn.k_proj, sources, hd)
    attn.v_proj = _gather_rows(attn.v_proj, sources, hd)
    attn.o_proj = _gather_columns(attn.o_proj, queries, hd)
    attn.num_key_value_groups = group_size
    attn.rcpu_groups = [group_size] * n_slots


def _gather_rows(linear: nn.Linear, heads: list[int | None], hd: int) -> nn.Linear:
    weight = torch.zeros(len(heads) * hd, linear.in_features, dtype=linear.weight.dtype)
    bias = None if linear.bias is None else torch.zeros(len(heads) * hd, dtype=linear.weight.dtype)
    for new, old in enumerate(heads):
        if old is not None:
            weight[new * hd : (new + 1) * hd] = linear.weight[old * hd : (old + 1) * hd]
            if bias is not None:
                bias[new * hd : (new + 1) * hd] = linear.bias[old * hd : (old + 1) * hd]
    return _linear(weight, bias, linear)


def _gather_columns(linear: nn.Linear, heads: list[int | None], hd: int) -> nn.Linear:
    weight = torch.zeros(linear.out_features, len(heads) * hd, dtype=linear.weight.dtype)
    for new, old in enumerate(heads):
        if old is not None:
            weight[:, new * hd : (new + 1) * hd] = linear.weight[:, old * hd : (old + 1) * hd]
    return _linear(weight, None if linear.bias is None else linear.bias.detach(), linear)


def add_zero_biases(adapter: LlamaLayoutAdapter, attention: bool, mlp: bool) -> None:
    """Give every projection of the kind a bias (zeros where there was none)."""
    names = (["self_attn." + n for n in ("q_proj", "k_proj", "v_proj", "o_proj")] if attention else []) + (
        ["mlp." + n for n in ("gate_proj", "up_proj", "down_proj")] if mlp else []
    )
    for layer in adapter.layers:
        for dotted in names:
            owner_name, attr = dotted.split(".")
            owner = getattr(layer, owner_name)
            linear = getattr(owner, attr)
            if linear.bias is None:
                zeros = torch.zeros(linear.out_features, dtype=linear.weight.dtype)
                setattr(owner, attr, _linear(linear.weight.detach(), zeros, linear))
