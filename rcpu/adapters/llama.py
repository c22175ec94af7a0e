"""LLaMA-layout decoders: ``self_attn.{q,k,v,o}_proj`` and ``mlp.{gate,up,down}_proj``.

LLaMA, Mistral, Qwen2 (with q/k/v biases) and Qwen3 (with per-head q/k norms,
shared by every head) share this layout and their transformers classes read the
same config fields, so one adapter serves the four.
"""

from __future__ import annotations

from torch import nn

from .base import DecoderAdapter


def _position_independent(cfg) -> bool:
    """Whether attention is the same at every length: no sliding window, rope scaled the same everywhere."""
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    sliding = getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True)
    layer_types = set(getattr(cfg, "layer_types", None) or ["full_attention"])
    return rope_type in ("default", "linear", "llama3") and not sliding and layer_types == {"full_attention"}


class LlamaAdapter(DecoderAdapter):
    model_types = ("llama", "mistral", "qwen2", "qwen3")

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

    def attention_module(self, index: int) -> nn.Module:
        return self.layers[index].self_attn

    def set_query_groups(self, index: int, queries_per_kv: int) -> None:
        self.layers[index].self_attn.num_key_value_groups = queries_per_kv

    def stock_candidates(self, *, heads: int, kv_heads: int, channels: int, attention_biased: bool,
                         mlp_biased: bool) -> list:
        from transformers import AutoConfig, MistralConfig, SeedOssConfig

        cfg = self.config
        fields = {k: v for k, v in cfg.to_dict().items()
                  if not k.startswith("_") and k not in ("architectures", "model_type", "transformers_version",
                                                         "rcpu", "quantization_config", "dtype", "torch_dtype")}
        fields.update(num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=self.head_dim,
                      intermediate_size=channels)
        own = dict(fields)
        if hasattr(cfg, "attention_bias"):  # llama, qwen3: a bias on every attention projection
            own["attention_bias"] = bool(cfg.attention_bias or attention_biased)
        if hasattr(cfg, "mlp_bias"):  # llama: a bias on every MLP projection
            own["mlp_bias"] = bool(cfg.mlp_bias or mlp_biased)
        candidates = [lambda: AutoConfig.for_model(cfg.model_type, **own)]
        if not _position_independent(cfg):
            return candidates  # a short logits check could not tell another class's attention apart
        # Any head count (hidden size not a multiple of it): Mistral's class; with o_proj / down_proj
        # biases, Seed-OSS's. Both are tried only as they stand: export checks tensors and logits.
        plain = {k: v for k, v in fields.items() if k not in ("attention_bias", "mlp_bias", "sliding_window")}
        candidates.append(lambda: MistralConfig(**plain, sliding_window=None))
        candidates.append(lambda: SeedOssConfig(**plain, attention_bias=bool(getattr(cfg, "attention_bias", False)),
                                                attention_out_bias=attention_biased, mlp_bias=mlp_biased))
        return candidates
