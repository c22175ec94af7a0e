"""The adapter protocol: the few questions the algorithm asks of a decoder family.

Statistics, surgery, export and the layer-by-layer flow never name a family's
modules (``self_attn.q_proj``, ``mlp.down_proj``, config fields); they ask an
adapter. A family implements the abstract methods below in one small file
(``llama.py`` is the example); everything else is derived here from shapes.

Two sublayers have prunable inputs (method page, section 1): ``o_proj``, whose
input columns are query heads, and ``down_proj``, whose input columns are MLP
channels. Those names are the algorithm's, whatever a family calls the modules.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import nn

from ..errors import RcpuError

SUBLAYERS = ("o_proj", "down_proj")


class DecoderAdapter(ABC):
    """A pre-norm decoder-only causal LM: attention (q, k, v -> o) then an MLP (inputs -> down)."""

    model_types: tuple[str, ...] = ()  # the ``config.model_type`` values this adapter serves

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

    # What a family answers --------------------------------------------------------
    @property
    @abstractmethod
    def layers(self) -> nn.ModuleList:
        """The decoder layers, in order; each is called as ``layer(hidden, **kwargs)``."""

    @property
    @abstractmethod
    def head_dim(self) -> int:
        """Columns of ``o_proj`` per query head."""

    @abstractmethod
    def attention_inputs(self, index: int) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        """Layer ``index``'s query, key and value projections (rows grouped by head)."""

    @abstractmethod
    def attention_output(self, index: int) -> nn.Linear:
        """Layer ``index``'s attention output projection (``o_proj``: columns grouped by query head)."""

    @abstractmethod
    def mlp_inputs(self, index: int) -> tuple[nn.Linear, ...]:
        """Layer ``index``'s MLP input projections (one row per channel), e.g. gate and up."""

    @abstractmethod
    def mlp_output(self, index: int) -> nn.Linear:
        """Layer ``index``'s MLP output projection (``down_proj``: one column per channel)."""

    @abstractmethod
    def attention_module(self, index: int) -> nn.Module:
        """Layer ``index``'s attention module (the one that calls transformers' attention function)."""

    @abstractmethod
    def set_query_groups(self, index: int, queries_per_kv: int) -> None:
        """Tell layer ``index``'s attention that each KV head now serves ``queries_per_kv`` query heads."""

    @abstractmethod
    def stock_candidates(self, *, heads: int, kv_heads: int, channels: int, attention_biased: bool,
                         mlp_biased: bool) -> list:
        """Makers of stock configs that may hold a model of these shapes, best first (``rcpu.export``
        keeps the first whose config validates and whose model takes every tensor and gives the same
        logits). ``*_biased``: ``o_proj`` / ``down_proj`` of some layer carry a bias."""

    def set_kv_index(self, index: int, kv_index) -> None:
        """Give layer ``index`` the KV head of each query head (uneven GQA groups)."""
        from ..attention import set_kv_index

        set_kv_index(self.model, self.attention_module(index), kv_index)
        if kv_index is not None:
            self.set_query_groups(index, 1)  # keys and values arrive one per query head

    # Derived from the answers ------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return self.attention_output(0).out_features

    def sublayer(self, index: int, name: str) -> nn.Linear:
        """``o_proj`` or ``down_proj`` of a layer."""
        if name == "o_proj":
            return self.attention_output(index)
        if name == "down_proj":
            return self.mlp_output(index)
        raise RcpuError(f"unknown sublayer {name!r}; choose one of: {', '.join(SUBLAYERS)}")

    def projections(self, index: int) -> list[nn.Linear]:
        """Every linear of layer ``index``: attention inputs and output, MLP inputs and output."""
        return [*self.attention_inputs(index), self.attention_output(index), *self.mlp_inputs(index),
                self.mlp_output(index)]

    def num_heads(self, index: int) -> int:
        return self.attention_inputs(index)[0].out_features // self.head_dim

    def num_kv_heads(self, index: int) -> int:
        return self.attention_inputs(index)[1].out_features // self.head_dim

    def queries_per_kv(self, index: int) -> int:
        """Query heads served by each KV head (1 for MHA); query head ``h`` uses KV head ``h // this``."""
        return self.num_heads(index) // self.num_kv_heads(index)

    def num_channels(self, index: int) -> int:
        return self.mlp_output(index).in_features

    def unit_size(self, name: str) -> int:
        """Columns per prunable unit: a head for ``o_proj``, one channel for ``down_proj``."""
        return self.head_dim if name == "o_proj" else 1

    def num_units(self, index: int, name: str) -> int:
        """Prunable units of a sublayer: query heads of ``o_proj``, channels of ``down_proj``."""
        return self.sublayer(index, name).in_features // self.unit_size(name)

    @staticmethod
    def unit_name(name: str) -> str:
        return "heads" if name == "o_proj" else "channels"

    def check_layer(self, index: int) -> None:
        if not 0 <= index < self.num_layers:
            raise RcpuError(f"layer {index} is out of range; this model has layers 0..{self.num_layers - 1}")
