"""Architecture adapters: the few questions the algorithm asks of a model.

The algorithm never reaches into ``model.model.layers[i].self_attn`` itself; it
asks an adapter. LLaMA-layout decoders (LLaMA, Mistral, Qwen2) share one layout,
so one adapter serves them; another family is a new small subclass.
"""

from __future__ import annotations

from torch import nn

from .errors import RcpuError


class LlamaLayoutAdapter:
    """Pre-norm decoder with ``self_attn.{q,k,v,o}_proj`` and ``mlp.{gate,up,down}_proj``."""

    model_types = ("llama", "mistral", "qwen2")

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

    # Whole model -------------------------------------------------------------
    @property
    def layers(self) -> nn.ModuleList:
        return self.model.model.layers

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def head_dim(self) -> int:
        cfg = self.config
        return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    # One layer -----------------------------------------------------------------
    def attention(self, index: int) -> nn.Module:
        return self.layers[index].self_attn

    def mlp(self, index: int) -> nn.Module:
        return self.layers[index].mlp

    def sublayer(self, index: int, name: str) -> nn.Linear:
        """``o_proj`` or ``down_proj`` of a layer."""
        if name == "o_proj":
            return self.attention(index).o_proj
        if name == "down_proj":
            return self.mlp(index).down_proj
        raise RcpuError(f"unknown sublayer {name!r}; choose o_proj or down_proj")

    def num_heads(self, index: int) -> int:
        return self.attention(index).q_proj.out_features // self.head_dim

    def num_kv_heads(self, index: int) -> int:
        return self.attention(index).k_proj.out_features // self.head_dim

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


ADAPTERS = (LlamaLayoutAdapter,)
SUPPORTED_TYPES = tuple(t for a in ADAPTERS for t in a.model_types)


def adapter_for(model: nn.Module) -> LlamaLayoutAdapter:
    model_type = getattr(model.config, "model_type", None)
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            return cls(model)
    raise RcpuError(unsupported_message(model_type))


def unsupported_message(model_type: str | None) -> str:
    return (
        f"unsupported architecture {model_type!r}; supported: {', '.join(SUPPORTED_TYPES)} "
        "(LLaMA-layout decoders, MHA or GQA)"
    )
