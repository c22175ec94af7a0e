"""Physical removal of heads and channels, and the masked equivalent.

Everything here asks the adapter for a layer's linears and reshapes them in
place (a pruned model is always a copy: the source model is never modified).

A layer's attention keeps its query heads in original order, so the kept heads of
one KV group stay contiguous. When KV groups keep different numbers of query
heads (GQA, e.g. 9 query heads in 3 groups), each KV head is repeated so that
every group has the same size ``g`` (the gcd of the kept group sizes): the
result runs in stock transformers' attention with ``g`` query heads per KV head
and computes exactly what the unevenly grouped heads would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .adapters import DecoderAdapter
from .compensate import Compensation


@dataclass
class SublayerPlan:
    """What to do to one sublayer: which units stay and the compensated weights."""

    sublayer: str  # o_proj | down_proj
    kept_units: Tensor  # sorted original unit indices
    kept: Tensor  # kept columns
    compensation: Compensation


def _reshape(linear: nn.Linear, weight: Tensor, bias: Tensor | None) -> None:
    """Give ``linear`` new weights and bias (or none), in its own dtype and device, in place."""
    like = linear.weight
    linear.weight = nn.Parameter(weight.detach().to(like.device, like.dtype).clone(), requires_grad=False)
    linear.bias = None if bias is None else nn.Parameter(
        bias.detach().to(like.device, like.dtype).clone(), requires_grad=False
    )
    linear.out_features, linear.in_features = weight.shape


def _keep_rows(linear: nn.Linear, rows: Tensor) -> None:
    _reshape(linear, linear.weight[rows], None if linear.bias is None else linear.bias[rows])


def _compensate(linear: nn.Linear, comp: Compensation) -> None:
    """Replace ``linear``'s weight by ``W'_K`` and add the compensation's bias to its own."""
    bias = linear.bias.detach().to(torch.float64) if linear.bias is not None else None
    if comp.bias is not None:
        bias = comp.bias if bias is None else bias + comp.bias
    _reshape(linear, comp.weight, bias)


def head_rows(heads: Tensor, head_dim: int) -> Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)


def kv_head_of(query_heads: Tensor, queries_per_kv: int) -> Tensor:
    """The KV head that each query head reads (GQA groups are contiguous)."""
    return query_heads // queries_per_kv


def kv_layout(kept_heads: Tensor, queries_per_kv: int) -> tuple[Tensor, int]:
    """(KV head for each new KV slot, new group size g) for kept query heads (sorted).

    Each KV head with ``c`` kept query heads gets ``c / g`` slots, ``g`` the gcd of the counts.
    """
    groups, counts = torch.unique(kv_head_of(kept_heads, queries_per_kv), return_counts=True)
    g = math.gcd(*counts.tolist())
    slots = torch.repeat_interleave(groups, counts // g)
    return slots, g


def prune_attention(adapter: DecoderAdapter, index: int, plan: SublayerPlan) -> None:
    """Remove query heads (and KV heads left without query heads) of layer ``index``."""
    hd = adapter.head_dim
    per_kv = adapter.queries_per_kv(index)
    kept_heads = plan.kept_units
    slots, group = kv_layout(kept_heads, per_kv)
    q, k, v = adapter.attention_inputs(index)
    _keep_rows(q, head_rows(kept_heads, hd))
    _keep_rows(k, head_rows(slots, hd))
    _keep_rows(v, head_rows(slots, hd))
    _compensate(adapter.attention_output(index), plan.compensation)
    adapter.set_query_groups(index, group)
    _set_kv_groups(adapter, index, torch.unique(kv_head_of(kept_heads, per_kv), return_counts=True)[1].tolist())


def prune_mlp(adapter: DecoderAdapter, index: int, plan: SublayerPlan) -> None:
    """Remove intermediate channels of layer ``index`` (input rows, output columns)."""
    for linear in adapter.mlp_inputs(index):
        _keep_rows(linear, plan.kept)
    _compensate(adapter.mlp_output(index), plan.compensation)


def apply_plan(adapter: DecoderAdapter, index: int, plan: SublayerPlan) -> None:
    (prune_attention if plan.sublayer == "o_proj" else prune_mlp)(adapter, index, plan)


def mask_plan(adapter: DecoderAdapter, index: int, plan: SublayerPlan) -> None:
    """The masked equivalent: full shapes, pruned columns zeroed, kept columns compensated."""
    linear = adapter.sublayer(index, plan.sublayer)
    full = torch.zeros(linear.weight.shape, dtype=torch.float64)
    full[:, plan.kept] = plan.compensation.weight
    _compensate(linear, Compensation(weight=full, bias=plan.compensation.bias))


def _set_kv_groups(adapter: DecoderAdapter, index: int, groups: list[int]) -> None:
    adapter.layers[index].rcpu_kv_groups = list(groups)


def kv_groups(adapter: DecoderAdapter, index: int) -> list[int]:
    """Kept query heads per distinct KV head of layer ``index``, in order (uniform if unpruned)."""
    groups = getattr(adapter.layers[index], "rcpu_kv_groups", None)
    if groups is None:
        groups = [adapter.queries_per_kv(index)] * adapter.num_kv_heads(index)
    return list(groups)


def slots_needed(groups: list[int], group_size: int) -> int:
    return sum(-(-c // group_size) for c in groups)


def relayout_attention(adapter: DecoderAdapter, index: int, group_size: int, n_slots: int) -> None:
    """Re-lay a layer's heads as ``n_slots`` KV heads serving ``group_size`` query heads each.

    Each distinct KV head gets ``ceil(c / group_size)`` slots for its ``c`` query heads;
    unfilled query positions and unused slots are zero heads (zero ``q``/``k``/``v``
    rows and zero ``o_proj`` columns), which add exactly nothing to the output.
    """
    hd = adapter.head_dim
    groups = kv_groups(adapter, index)
    current = adapter.queries_per_kv(index)
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
    q, k, v = adapter.attention_inputs(index)
    _gather_rows(q, queries, hd)
    _gather_rows(k, sources, hd)
    _gather_rows(v, sources, hd)
    _gather_columns(adapter.attention_output(index), queries, hd)
    adapter.set_query_groups(index, group_size)
    _set_kv_groups(adapter, index, [group_size] * n_slots)


def _gather_rows(linear: nn.Linear, heads: list[int | None], hd: int) -> None:
    weight = torch.zeros(len(heads) * hd, linear.in_features, dtype=linear.weight.dtype)
    bias = None if linear.bias is None else torch.zeros(len(heads) * hd, dtype=linear.weight.dtype)
    for new, old in enumerate(heads):
        if old is not None:
            weight[new * hd : (new + 1) * hd] = linear.weight[old * hd : (old + 1) * hd]
            if bias is not None:
                bias[new * hd : (new + 1) * hd] = linear.bias[old * hd : (old + 1) * hd]
    _reshape(linear, weight, bias)


def _gather_columns(linear: nn.Linear, heads: list[int | None], hd: int) -> None:
    weight = torch.zeros(linear.out_features, len(heads) * hd, dtype=linear.weight.dtype)
    for new, old in enumerate(heads):
        if old is not None:
            weight[:, new * hd : (new + 1) * hd] = linear.weight[:, old * hd : (old + 1) * hd]
    _reshape(linear, weight, linear.bias)


def add_zero_biases(adapter: DecoderAdapter, attention: bool, mlp: bool) -> None:
    """Give every attention and/or MLP projection a bias (zeros where there was none)."""
    for index in range(adapter.num_layers):
        linears = ([*adapter.attention_inputs(index), adapter.attention_output(index)] if attention else []) + (
            [*adapter.mlp_inputs(index), adapter.mlp_output(index)] if mlp else []
        )
        for linear in linears:
            if linear.bias is None:
                _reshape(linear, linear.weight, torch.zeros(linear.out_features))
