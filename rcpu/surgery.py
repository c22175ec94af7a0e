"""Physical removal of heads and channels, and the masked equivalent.

Everything here asks the adapter for a layer's linears and reshapes them in
place (a pruned model is always a copy: the source model is never modified).

A layer keeps exactly its kept query heads (in original order), the KV heads
that still serve one of them, and its kept MLP channels: no zero head is ever
added and the KV cache never grows. Where every KV head keeps the same number
of query heads, stock attention runs the layer as it is; where they keep
different numbers (GQA, e.g. 9 query heads in 3 groups, 2 pruned from different
groups), the layer gets an index of the KV head of each query head
(``rcpu.attention``).
"""

from __future__ import annotations

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


def reshape_linear(linear: nn.Linear, weight: Tensor, bias: Tensor | None) -> None:
    """Give ``linear`` new weights and bias (or none), in its own dtype and device, in place."""
    like = linear.weight
    linear.weight = nn.Parameter(weight.detach().to(like.device, like.dtype).clone(), requires_grad=False)
    linear.bias = None if bias is None else nn.Parameter(
        bias.detach().to(like.device, like.dtype).clone(), requires_grad=False
    )
    linear.out_features, linear.in_features = weight.shape


def _keep_rows(linear: nn.Linear, rows: Tensor) -> None:
    reshape_linear(linear, linear.weight[rows], None if linear.bias is None else linear.bias[rows])


def _compensate(linear: nn.Linear, comp: Compensation) -> None:
    """Replace ``linear``'s weight by ``W'_K`` and add the compensation's bias to its own."""
    bias = linear.bias.detach().to(torch.float64) if linear.bias is not None else None
    if comp.bias is not None:
        bias = comp.bias if bias is None else bias + comp.bias
    reshape_linear(linear, comp.weight, bias)


def head_rows(heads: Tensor, head_dim: int) -> Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)


def kv_head_of(query_heads: Tensor, queries_per_kv: int) -> Tensor:
    """The KV head that each query head reads (GQA groups are contiguous)."""
    return query_heads // queries_per_kv


def kv_layout(kept_heads: Tensor, queries_per_kv: int) -> tuple[Tensor, Tensor | None, int]:
    """(kept KV heads, KV index of each kept query head or None, query heads per KV head).

    The index is None when every kept KV head serves the same number ``g`` of kept
    query heads: stock attention's rule (query head ``h`` reads KV head ``h // g``).
    """
    serving = kv_head_of(kept_heads, queries_per_kv)
    kv_heads, counts = torch.unique(serving, return_counts=True)
    if bool((counts == counts[0]).all()):
        return kv_heads, None, int(counts[0])
    return kv_heads, torch.searchsorted(kv_heads, serving), 1


def prune_attention(adapter: DecoderAdapter, index: int, plan: SublayerPlan) -> None:
    """Remove query heads (and KV heads left without query heads) of layer ``index``."""
    hd = adapter.head_dim
    kept_heads = plan.kept_units
    kv_heads, kv_index, group = kv_layout(kept_heads, adapter.queries_per_kv(index))
    q, k, v = adapter.attention_inputs(index)
    _keep_rows(q, head_rows(kept_heads, hd))
    _keep_rows(k, head_rows(kv_heads, hd))
    _keep_rows(v, head_rows(kv_heads, hd))
    _compensate(adapter.attention_output(index), plan.compensation)
    if kv_index is None:
        adapter.set_query_groups(index, group)
    else:
        adapter.set_kv_index(index, kv_index)


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


def kv_groups(adapter: DecoderAdapter, index: int) -> list[int]:
    """Query heads served by each KV head of layer ``index``, in order."""
    kv_index = getattr(adapter.attention_module(index), "rcpu_kv_index", None)
    if kv_index is None:
        return [adapter.queries_per_kv(index)] * adapter.num_kv_heads(index)
    return torch.bincount(kv_index, minlength=adapter.num_kv_heads(index)).tolist()
