"""Attention for query heads that share KV heads unevenly.

Stock attention repeats each KV head for the same number of query heads. After
pruning, the kept query heads of a GQA layer can be spread unevenly over the
KV heads (9 query heads in 3 groups, 2 pruned from different groups: 2, 2 and
3 per KV head). Such a layer keeps exactly its KV heads (rows of the key and
value projections; the KV cache never grows) and an index ``kv_index`` giving the KV head of
each query head; the attention functions registered here gather the keys and
values by that index, then run transformers' own attention (SDPA or eager).
Layers without an index run exactly as before.
"""

from __future__ import annotations

import sys

from torch import Tensor, nn

PREFIX = "rcpu_"


def _with_kv_index(base):
    def attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask, **kwargs):
        index = getattr(module, "rcpu_kv_index", None)
        if index is not None:  # (batch, kv heads, tokens, head_dim) -> one KV head per query head
            index = index.to(key.device)
            key, value = key.index_select(1, index), value.index_select(1, index)
        return base(module, query, key, value, attention_mask, **kwargs)

    return attention


def _register(name: str, attention: nn.Module) -> str:
    """The registered name of ``name`` with a KV index (``sdpa`` -> ``rcpu_sdpa``), registered once."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if name.startswith(PREFIX):
        return name
    wrapped = PREFIX + name
    if wrapped not in ALL_ATTENTION_FUNCTIONS:
        if name == "eager":  # each family's modeling file has its own eager function
            base = sys.modules[type(attention).__module__].eager_attention_forward
        else:
            base = ALL_ATTENTION_FUNCTIONS[name]
        AttentionInterface.register(wrapped, _with_kv_index(base))
        AttentionMaskInterface.register(wrapped, ALL_MASK_ATTENTION_FUNCTIONS[name])
    return wrapped


def set_kv_index(model: nn.Module, attention: nn.Module, kv_index: Tensor | None) -> None:
    """Make ``attention`` read KV head ``kv_index[h]`` for query head ``h`` (``None``: the stock rule).

    The caller (the adapter) tells the module that keys and values then arrive one per query head.
    """
    attention.rcpu_kv_index = None if kv_index is None else kv_index.clone()
    if kv_index is not None:
        implementation = model.config._attn_implementation or "sdpa"
        if not implementation.startswith(PREFIX):
            model.set_attn_implementation(_register(implementation, attention))


def uses_kv_index(model: nn.Module) -> bool:
    return str(model.config._attn_implementation or "").startswith(PREFIX)
