"""Architecture adapters: one small file per decoder family, chosen by ``config.model_type``.

Adding a family: subclass ``DecoderAdapter`` in a new module, list it in ``ADAPTERS``.
"""

from __future__ import annotations

from torch import nn

from ..errors import RcpuError
from .base import SUBLAYERS, DecoderAdapter
from .llama import LlamaAdapter

ADAPTERS: tuple[type[DecoderAdapter], ...] = (LlamaAdapter,)
SUPPORTED_TYPES = tuple(t for a in ADAPTERS for t in a.model_types)

__all__ = ["ADAPTERS", "SUBLAYERS", "SUPPORTED_TYPES", "DecoderAdapter", "adapter_for", "unsupported_message"]


def adapter_for(model: nn.Module) -> DecoderAdapter:
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
