"""Whole-model results equal those recorded before the code was reorganised.

``data/reference_tiny.json`` holds perplexities, parameter counts and per-layer errors of
30 prunes (three tiny seeded models: MHA, GQA and uneven GQA; five score:method pairs; two
ratios), computed by the code before the one-house refactor. A change of behaviour in
selection, compensation, surgery, statistics or perplexity moves them. The score those
runs called ``rcpu`` is today's ``rcpu_rms`` (``rcpu`` became the authors' score);
their parameter counts included zero heads and zero biases that pruned models no longer
carry.

Tolerance: the models run in float32, so a different CPU's summation order moves logits
and activations by a few float32 ulps (~1e-7 relative), amplified by two layers and a
softmax; 1e-4 relative is far above that and far below any change of method (the
pairs below differ from one another by 1e-3 or more). Counts compare exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_tiny_llama, random_tokens, tiny_lm

from rcpu.config import DataConfig, PruneConfig
from rcpu.evaluate import perplexity
from rcpu.prune import prune_model

REFERENCE = json.loads((Path(__file__).parent / "data" / "reference_tiny.json").read_text())["points"]
SHAPES = {(4, 4): 48, (6, 2): 48, (9, 3): 36}  # (heads, kv heads) -> hidden size
RTOL = 1e-4


@pytest.mark.parametrize("heads, kv_heads", list(SHAPES))
def test_prunes_match_the_recorded_results(heads, kv_heads):
    model = make_tiny_llama(heads=heads, kv_heads=kv_heads, hidden=SHAPES[heads, kv_heads], intermediate=40)
    lm = tiny_lm(model)
    tokens = random_tokens()
    points = {k: v for k, v in REFERENCE.items() if k.startswith(f"tiny/{heads}/{kv_heads}/")}
    assert len(points) == 10
    for key, expected in points.items():
        _, _, _, score, method, ratio = key.split("/")
        score = {"rcpu": "rcpu_rms"}.get(score, score)
        result = prune_model(lm, DataConfig(), PruneConfig(float(ratio), "both", score, method), tokens=tokens)
        # Parameters: the recorded runs padded heads to a stock layout and gave every projection a
        # bias once one had one; pruned models now keep their real shapes, never more.
        assert result.params_before == expected["params"][0], key
        assert result.params_after <= expected["params"][1], key
        assert perplexity(result.model, tokens.heldout)["ppl"] == pytest.approx(expected["ppl"], rel=RTOL), key
        for got, want in zip(result.layers, expected["layers"], strict=True):
            for sub in ("o_proj", "down_proj"):
                assert got[sub]["kept_units"] == want[sub]["kept_units"], key
                for name, value in want[sub].items():
                    assert got[sub][name] == pytest.approx(value, rel=RTOL, abs=1e-9), (key, sub, name)
