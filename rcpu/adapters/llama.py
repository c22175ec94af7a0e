"""LLaMA-layout decoders: ``self_attn.{q,k,v,o}_proj`` and ``mlp.{gate,up,down}_proj``.

LLaMA, Mistral and Qwen2 share this layout and their transformers classes read
the same config fields, so one adapter serves the three.
"""

from __future__ import annotations

from torch import nn

from .base import DecoderAdapter


class LlamaAdapter(DecoderAdapter):
    model_types = ("llama", "mistral", "qwen2")

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.model.layers

    @property
    def head_dim(self) -> int:
        cfg = self.config
        return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    def attention_inputs(self, index: int) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        attn = self.layers[index].self_attn
        return attn.q_proj, attn.k_proj, attn.v_proj

    def attention_output(self, index: int) -> nn.Linear:
        return self.layers[index].self_attn.o_proj

    def mlp_inputs(self, index: int) -> tuple[nn.Linear, nn.Linear]:
        mlp = self.layers[index].mlp
        return mlp.gate_proj, mlp.up_proj

    def mlp_output(self, index: int) -> nn.Linear:
        return self.layers[index].mlp.down_proj

    def set_query_groups(self, index: int, queries_per_kv: int) -> None:
        self.layers[index].self_attn.num_key_value_groups = queries_per_kv

    def write_config(self, *, heads: int, kv_heads: int, channels: int, attention_biased: bool,
                     mlp_biased: bool) -> None:
        if heads % kv_heads:
            raise ValueError(f"{heads} query heads do not split into {kv_heads} KV heads")
        cfg = self.config
        cfg.num_key_value_heads = kv_heads
        cfg.num_attention_heads = heads
        cfg.head_dim = self.head_dim
        cfg.intermediate_size = channels
        # attention_bias and mlp_bias give every attention / MLP projection a bias.
        cfg.attention_bias = bool(cfg.attention_bias or attention_biased)
        cfg.mlp_bias = bool(getattr(cfg, "mlp_bias", False) or mlp_biased)
