"""Shared fixtures: the embedded model (loaded once), a private cache, a tiny random LLaMA."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
REAL_CACHE = REPO / "cache"


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2-135M model (converted once into the repo's cache/models)."""
    from rcpu.models import load_model

    return load_model("embedded")


@pytest.fixture
def one_thread():
    """One intra-op torch thread: small matrices avoid thread hand-off, and on a busy 2-core
    machine two spin-waiting threads run several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    """A private RCPU_CACHE for one test; converted models are shared with the real cache."""
    root = tmp_path / "cache"
    root.mkdir()
    (REAL_CACHE / "models").mkdir(parents=True, exist_ok=True)
    os.symlink(REAL_CACHE / "models", root / "models")
    monkeypatch.setenv("RCPU_CACHE", str(root))
    return root


def make_tiny_llama(
    heads: int = 4, kv_heads: int = 2, layers: int = 2, hidden: int = 32, intermediate: int = 48,
    vocab: int = 128, seed: int = 0, **extra
):
    """A randomly initialised LLaMA with small shapes (MHA when heads == kv_heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=hidden // heads, max_position_embeddings=512, **extra,
    )
    model = LlamaForCausalLM(config).eval()
    model.requires_grad_(False)
    return model


def random_tokens(seed: int = 0, n: int = 8, length: int = 32, vocab: int = 128):
    """A TokenSet of random ids for tiny models: n calibration windows, 2 held-out windows."""
    from rcpu.calibration import TokenSet

    gen = torch.Generator().manual_seed(seed)
    return TokenSet(
        torch.randint(0, vocab, (n, length), generator=gen),
        torch.randint(0, vocab, (2, length), generator=gen),
        torch.randint(0, vocab, (4 * length,), generator=gen),
    )


def tiny_lm(model):
    """A LoadedModel around an in-memory model (no tokenizer: pass tokens explicitly)."""
    from rcpu.adapters import adapter_for
    from rcpu.models import LoadedModel

    return LoadedModel(model, None, adapter_for(model), "tiny", "tiny")


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, embedded):
    """A tiny random LLaMA (GQA, 6 query / 2 KV heads) saved with the embedded tokenizer.

    Small enough that whole-model commands (prune, eval, sweep) run in seconds.
    """
    out = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    model = make_tiny_llama(heads=6, kv_heads=2, layers=2, hidden=48, intermediate=64,
                            vocab=len(embedded.tokenizer))
    model.save_pretrained(out)
    embedded.tokenizer.save_pretrained(out)
    return out
