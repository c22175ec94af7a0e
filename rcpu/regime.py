"""The calibration regime: tokens per input dimension, and what to expect of each method in it.

The paper's effect (a rotation generalising better than an unconstrained least-squares refit)
shows when calibration tokens are few per input dimension; with many, least squares' freedom pays
and it has the lowest held-out error. Pages say which regime a run is in (``regime_note``) and
offer ``LECTURE_PRESET``, a calibration set small enough for the effect to show on a real layer.
"""

from __future__ import annotations

# Few calibration windows: on the embedded model, layer 15 o_proj at 20 % (1024 tokens, 1.8 per
# input dimension), held-out error 0.405 uncompensated, 0.319 rotation, 0.486 least squares (it
# overfits); at the app's default 32 x 512 tokens least squares wins (0.210 against 0.292). From
# `python -m rcpu layer --layer 15 --ratio 0.2 --calib-samples 8 --seq-len 128 --method rotation`
# (and `--method ls`; drop the two sampling options for the default). Fewer windows (2 or 4) make
# least squares worse still but leave rotation barely ahead of no compensation.
LECTURE_PRESET = {"calib_samples": 8, "seq_len": 128}
FEW_TOKENS_PER_DIM = 4.0  # below this, expect least squares to overfit the calibration tokens


def tokens_per_dim(tokens: int, d_in: int) -> float:
    return tokens / max(d_in, 1)


def regime_note(tokens: int, d_in: int) -> str:
    """One sentence: the tokens-per-dimension regime of a calibration set and what to expect in it."""
    per_dim = tokens_per_dim(tokens, d_in)
    head = f"{tokens} calibration tokens for {d_in} input dimensions ({per_dim:.1f} per dimension): "
    if per_dim < 1:
        return head + ("fewer tokens than dimensions, so least squares can fit the calibration tokens "
                       "exactly and overfits; expect rotation to beat it on held-out tokens.")
    if per_dim < FEW_TOKENS_PER_DIM:
        return head + ("few tokens per dimension; expect least squares to overfit (a large held-out gap) "
                       "and rotation to keep most of its gain.")
    return head + ("many tokens per dimension; least squares' freedom pays and it usually has the best "
                   "held-out error. The paper's effect (rotation ahead) shows with few calibration tokens: "
                   "try the lecture preset in the sidebar.")
