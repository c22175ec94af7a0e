"""Perplexity (method page, section 6): exp(mean NLL) over non-overlapping windows.

Batched; the LM head runs only on positions that have a next token to predict.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .calibration import prepare_tokens
from .config import DataConfig, EvalConfig
from .errors import RcpuError
from .flow import Progress
from .models import LoadedModel
from .text import consecutive_windows, load_text, tokenize


def perplexity(model: nn.Module, windows: Tensor, batch_size: int = 4, progress: Progress | None = None) -> dict:
    """{ppl, nll, eval_tokens, windows, seconds, tokens_per_s, window_nll} of a causal LM on windows (n, L).

    ``window_nll``: each window's mean NLL (their mean is ``nll``: every window has L - 1 predicted
    tokens), for paired comparisons of two models on the same windows."""
    if len(windows) == 0:
        raise RcpuError("no evaluation windows: the evaluation text is shorter than one window")
    device = next(model.parameters()).device
    base, head = model.get_decoder(), model.get_output_embeddings()
    total_nll, total_tokens = 0.0, 0
    window_nll: list[float] = []
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(windows), batch_size):
            ids = windows[i : i + batch_size].to(device)
            hidden = base(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
            logits = head(hidden).float()  # (b, L-1, vocab)
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
            per_window = nll.reshape(len(ids), -1).to(torch.float64).sum(dim=1)
            window_nll.extend((per_window / (ids.shape[1] - 1)).tolist())
            total_nll += float(per_window.sum())
            total_tokens += ids[:, 1:].numel()
            if progress:
                progress(min(i + batch_size, len(windows)), len(windows), "perplexity")
    seconds = time.perf_counter() - start
    mean = total_nll / total_tokens
    if not math.isfinite(mean):  # inf/NaN logits: a perplexity would be a silent NaN or a false inf
        raise RcpuError(
            "the model produced inf/NaN logits on the evaluation windows (activations overflow), so "
            "perplexity is undefined; load the model in float32 or check its weights"
        )
    return {
        "ppl": math.exp(mean) if mean < 700 else math.inf,
        "nll": mean,
        "eval_tokens": total_tokens,
        "windows": len(windows),
        "seconds": seconds,
        "tokens_per_s": windows.numel() / seconds if seconds > 0 else None,
        "window_nll": window_nll,
    }


def evaluation_windows(lm: LoadedModel, data: DataConfig, evaluation: EvalConfig | None = None) -> Tensor:
    """Windows of ``data.seq_len`` tokens to evaluate on.

    With ``evaluation.eval_data``, its text from the start (WikiText-2 protocol: the test
    split for hub datasets); without, the held-out part of the calibration text.
    """
    evaluation = (evaluation or EvalConfig()).against(data)
    evaluation.check()
    limit = evaluation.eval_windows
    if evaluation.eval_data:
        ids = tokenize(lm.tokenizer, load_text(evaluation.eval_data, split="test"))
        windows = consecutive_windows(ids, data.seq_len, limit)
        if len(windows) == 0:
            raise RcpuError(
                f"evaluation text {evaluation.eval_data!r} has {len(ids)} tokens, fewer than one "
                f"{data.seq_len}-token window"
            )
        return windows
    return consecutive_windows(prepare_tokens(lm, data.data, data.sampling).heldout_ids, data.seq_len, limit)
