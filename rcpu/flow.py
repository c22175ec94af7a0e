"""Hidden states flowing through the decoder layer by layer.

The inputs of layer 0 (and the keyword arguments the model passes to every layer:
rotary position embeddings, mask) are captured once by stopping the forward
pass at layer 0. After that each layer runs on the cached states, so gathering
statistics for layer ``l`` costs layers ``0..l`` only (no later layers, no LM
head), and a sequential prune costs about one pass over the calibration tokens.

A prune runs each layer twice: dense for its statistics, then pruned for the next
layer's inputs. The second run reuses what pruning does not change: the kept heads'
attention output (the ``o_proj`` input recorded by the first run, ``keep_attention``)
feeds the pruned ``o_proj`` directly, so the pruned run costs ``o_proj`` and the MLP.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .adapters import SUBLAYERS, DecoderAdapter
from .stats import StatsAccumulator

log = logging.getLogger("rcpu")

Progress = Callable[[int, int, str], None]  # (done, total, what)


class _Stop(Exception):
    pass


class LayerFlow:
    """Per-batch hidden states at the input of the next layer to run."""

    def __init__(self, adapter: DecoderAdapter, windows: Tensor, batch_size: int = 8):
        self.adapter = adapter
        self.next_layer = 0
        self.batches: list[tuple[Tensor, list[dict]]] = []  # (hidden states, keyword arguments per layer)
        self.attention: list[Tensor] | None = None  # o_proj inputs of layer next_layer per batch (dense run)
        device = next(adapter.model.parameters()).device
        for start in range(0, len(windows), batch_size):
            ids = windows[start : start + batch_size].to(device)
            self.batches.append(self._capture(ids))

    def _capture(self, ids: Tensor) -> tuple[Tensor, list[dict]]:
        """Layer 0's input and the keyword arguments the model passes to each layer (its own mask:
        Qwen2 mixes sliding-window and full layers), without running any layer: each layer's
        forward is swapped for one that records and passes its input on, and the last one stops."""
        layers = self.adapter.layers
        hidden: dict = {}
        per_layer: list[dict] = []

        def recorder(index: int):
            def forward(*args, **kwargs):
                states = args[0] if args else kwargs.pop("hidden_states")
                hidden.setdefault("input", states)
                kwargs = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values", "past_key_value")}
                per_layer.append({**kwargs, "use_cache": False})
                if index == len(layers) - 1:
                    raise _Stop
                return states
            return forward

        own = [layer.__dict__.get("forward") for layer in layers]  # e.g. accelerate's hooks
        for index, layer in enumerate(layers):
            layer.forward = recorder(index)
        try:
            with torch.no_grad():
                self.adapter.model(input_ids=ids, use_cache=False)
        except _Stop:
            pass
        finally:
            for layer, forward in zip(layers, own, strict=True):
                if forward is None:
                    del layer.forward  # back to the class's forward
                else:
                    layer.forward = forward
        if len(per_layer) != len(layers):
            raise RuntimeError(f"the model called {len(per_layer)} of its {len(layers)} layers")
        return hidden["input"].detach(), per_layer

    def run_layer(self, index: int, update: bool = True) -> None:
        """Run layer ``index`` on every batch; with ``update`` its outputs become the states."""
        if index != self.next_layer:
            raise RuntimeError(f"flow is at layer {self.next_layer}, asked to run {index}")
        layer = self.adapter.layers[index]
        with torch.no_grad():
            for i, (hidden, kwargs) in enumerate(self.batches):
                try:
                    out = layer(hidden, **kwargs[index])
                except _Stop:  # a hook has seen all it needs of this batch
                    if update:
                        raise RuntimeError("a layer whose outputs are needed was stopped early") from None
                    continue
                out = out[0] if isinstance(out, tuple) else out
                if update:
                    self.batches[i] = (out, kwargs)
        if update:
            self.next_layer += 1
            self.attention = None

    def run_layer_reusing_attention(self, index: int, kept_columns: Tensor | None) -> None:
        """Run layer ``index`` (pruned) with its attention replaced by the recorded ``o_proj`` inputs of its
        dense run, restricted to the kept columns (the kept heads' outputs, unchanged by pruning): the
        pruned ``o_proj``, the residual and the MLP run; queries, keys, values and attention do not."""
        if index != self.next_layer or self.attention is None:
            raise RuntimeError(f"no recorded attention outputs of layer {index}")
        layer = self.adapter.layers[index]
        attention = self.adapter.attention_module(index)
        o_proj = self.adapter.attention_output(index)
        own = attention.__dict__.get("forward")
        try:
            with torch.no_grad():
                for i, (hidden, kwargs) in enumerate(self.batches):
                    inputs = self.attention[i] if kept_columns is None else self.attention[i][..., kept_columns]

                    def forward(*args, _inputs=inputs, **kw):
                        return o_proj(_inputs), None

                    attention.forward = forward
                    out = layer(hidden, **kwargs[index])
                    out = out[0] if isinstance(out, tuple) else out
                    self.batches[i] = (out, kwargs)
        finally:
            if own is None:
                del attention.forward
            else:
                attention.forward = own
        self.next_layer += 1
        self.attention = None

    def advance_to(self, index: int, progress: Progress | None = None) -> None:
        """Run layers until the states are the inputs of layer ``index``."""
        while self.next_layer < index:
            if progress:
                progress(self.next_layer, index, f"layer {self.next_layer}")
            self.run_layer(self.next_layer)


@contextmanager
def record_inputs(
    modules: dict[str, nn.Module], sample_size: int, seed: int, stop_after: str | None = None, folds: int = 0
) -> Iterator[dict]:
    """Accumulate input statistics of each named module while the context is open.

    With ``stop_after``, the forward pass is cut short once that module's input is
    recorded (its own matmul and everything after it are not needed). With ``folds``, each
    window goes to one of that many fold statistics (``LayerStats.folds``).
    """
    accumulators: dict[str, StatsAccumulator] = {}
    handles = []

    def make_hook(name: str, module: nn.Module):
        def hook(mod, args):
            x = args[0]
            if name not in accumulators:
                accumulators[name] = StatsAccumulator(x.shape[-1], sample_size=sample_size, seed=seed,
                                                      device=x.device, folds=folds)
            accumulators[name].add(x)
            if name == stop_after:
                raise _Stop

        return hook

    for name, module in modules.items():
        handles.append(module.register_forward_pre_hook(make_hook(name, module)))
    try:
        yield accumulators
    finally:
        for h in handles:
            h.remove()


def layer_input_stats(flow: LayerFlow, index: int, sample_size: int, seed: int, update: bool = False,
                      sublayers: tuple[str, ...] = SUBLAYERS, keep_attention: bool = False, folds: int = 0):
    """Statistics of the ``sublayers`` inputs (default ``o_proj`` and ``down_proj``) of layer ``index``.

    Without ``update`` the run stops once the last of them is recorded (nothing reads the rest).
    ``keep_attention`` keeps each batch's ``o_proj`` input in ``flow.attention`` for
    ``LayerFlow.run_layer_reusing_attention``. With ``folds``, one Gram per calibration fold too."""
    adapter = flow.adapter
    modules = {name: adapter.sublayer(index, name) for name in SUBLAYERS if name in sublayers}
    stop_after = None if update else ("down_proj" if "down_proj" in modules else "o_proj")
    if keep_attention and not update:
        kept: list[Tensor] = []
        flow.attention = kept
        handle = adapter.attention_output(index).register_forward_pre_hook(
            lambda mod, args: kept.append(args[0].detach()))
        if "down_proj" not in modules:  # the attention output is recorded: the MLP is not needed
            stop_after = "o_proj"
    else:
        handle = None
    try:
        with record_inputs(modules, sample_size, seed, stop_after, folds) as accumulators:
            flow.run_layer(index, update=update)
    finally:
        if handle is not None:
            handle.remove()
    for name, acc in accumulators.items():
        if acc.nonfinite_tokens:
            log.warning(
                "layer %d %s: %d tokens with inf/NaN inputs were left out of the statistics",
                index, name, acc.nonfinite_tokens,
            )
    return {name: acc.finish() for name, acc in accumulators.items()}
