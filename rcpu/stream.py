"""Prune a model larger than memory, one decoder layer at a time from its safetensors files.

The model is built with empty (meta) weights; only the tensors outside the decoder
layers (embeddings, final norm, LM head) are read up front. Each layer is read from
the source files when its turn comes, pruned exactly as ``rcpu.prune.prune_layer``
prunes it in memory (same statistics, selection, compensation and recompute), written
to its own safetensors file and dropped. Peak memory is one layer, the hidden-state
buffers of the calibration (and held-out) tokens and the embeddings, not the model.

Tensors are read with plain file reads (no memory map of a whole file), so the
process's address space holds what is in use. The folder written has the ``rcpu``
layout record and the source family's config, like ``rcpu.export.save_pruned`` for a
model no stock class holds: ``rcpu.load_pruned`` (or ``rcpu eval``) loads it.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import struct
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapters import adapter_for
from .allocate import FOLDS
from .calibration import TokenSet, prepare_tokens
from .config import DataConfig, PruneConfig
from .errors import RcpuError
from .export import _remove_stale_temporaries, check_output_dir, layout_record
from .flow import LayerFlow, Progress
from .models import LoadedModel, resolve_model
from .prune import LayerCallback, prune_layer

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class SafetensorsFolder:
    """Where each tensor of a folder's ``*.safetensors`` files is, and reading one with a file read."""

    def __init__(self, folder: Path):
        self.where: dict[str, tuple[Path, dict, int]] = {}  # name -> (file, header entry, data start)
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise RcpuError(f"{folder} has no .safetensors files to stream from")
        for path in files:
            with open(path, "rb") as handle:
                (size,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(size))
            for name, entry in header.items():
                if name != "__metadata__":
                    self.where[name] = (path, entry, 8 + size)

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        path, entry, start = self.where[name]
        begin, end = entry["data_offsets"]
        buffer = bytearray(end - begin)
        with open(path, "rb") as handle:
            handle.seek(start + begin)
            handle.readinto(buffer)
        tensor = torch.frombuffer(buffer, dtype=_DTYPES[entry["dtype"]]) if buffer else torch.empty(
            0, dtype=_DTYPES[entry["dtype"]])
        tensor = tensor.reshape(entry["shape"])
        return tensor if dtype is None or not tensor.is_floating_point() else tensor.to(dtype)


@dataclass
class StreamResult:
    folder: Path
    config: PruneConfig
    data: DataConfig
    layers: list[dict]  # per-layer records, as PruneResult.layers
    params_before: int
    params_after: int
    timing_s: dict = field(default_factory=dict)


def _set(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    """Put ``value`` at parameter or buffer ``name`` (replacing a meta tensor)."""
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    if leaf in owner._parameters:
        owner._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[leaf] = value


def _empty_model(folder: Path, dtype: torch.dtype):
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    if (getattr(config, "rcpu", None) or {}).get("layout"):
        raise RcpuError(f"{folder} is already pruned with a rcpu layout; stream from a stock model folder")
    with init_empty_weights():  # parameters on the meta device; buffers (rotary frequencies) real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval().requires_grad_(False)


def stream_prune(
    model: str | Path,
    out: str | Path,
    data: DataConfig,
    cfg: PruneConfig,
    *,
    tokens: TokenSet | None = None,
    progress: Progress | None = None,
    on_layer: LayerCallback | None = None,
    batch_size: int = 8,
    overwrite: bool = False,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    record: dict | None = None,
) -> StreamResult:
    """Prune the model in folder ``model`` (or ``embedded``) layer by layer from disk into folder ``out``.

    The same results as ``prune_model`` followed by ``save_pruned`` (in the ``rcpu`` layout), with
    one decoder layer in memory at a time. ``tokens`` as for ``prune_model`` (default: prepared from
    ``data`` with the folder's tokenizer)."""
    start = time.perf_counter()
    source, fingerprint, _ = resolve_model(str(model))
    if not isinstance(source, Path):
        raise RcpuError("--stream reads a local model folder (or 'embedded'), not a hub id")
    out = Path(out)
    check_output_dir(out, overwrite)
    files = SafetensorsFolder(source)
    skeleton = _empty_model(source, dtype)
    adapter = adapter_for(skeleton)
    names = {id(m): n for n, m in skeleton.named_modules()}
    prefixes = [names[id(layer)] + "." for layer in adapter.layers]
    in_layers = {name for name in files.where if any(name.startswith(p) for p in prefixes)}
    outside = [name for name in files.where if name not in in_layers]
    for name in outside:
        _set(skeleton, name, files.read(name, dtype).to(device))
    for module in skeleton.modules():  # buffers made at construction (rotary frequencies)
        for key, buffer in module._buffers.items():
            if buffer is not None and not buffer.is_meta:
                module._buffers[key] = buffer.to(device)
    if getattr(skeleton.config, "tie_word_embeddings", False):
        skeleton.tie_weights()
    tokenizer = None
    if tokens is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source)
    lm = LoadedModel(skeleton, tokenizer, adapter, str(model), fingerprint)
    cfg.check(lm)
    if cfg.allocation != "uniform":  # an allocation scores every layer of the dense model first
        raise RcpuError(f"allocation {cfg.allocation!r} needs the whole model in memory; a streamed prune "
                        "uses the uniform ratio")
    tokens = tokens or prepare_tokens(lm, data.data, data.sampling)

    _remove_stale_temporaries(out)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-{os.getpid()}-"))
    try:
        flows = {"calibration": LayerFlow(adapter, tokens.calibration, batch_size)}
        if len(tokens.heldout):
            flows["heldout"] = LayerFlow(adapter, tokens.heldout, batch_size)
        timing = {"read": 0.0, "statistics": 0.0, "compensation": 0.0, "recompute": 0.0, "write": 0.0}
        records: list[dict] = []
        weight_map: dict[str, str] = {}
        params_before = params_after = 0
        n_layers = adapter.num_layers
        for index in range(n_layers):
            if progress:
                progress(index, n_layers, f"layer {index}")
            t0 = time.perf_counter()
            layer = adapter.layers[index]
            for name in sorted(n for n in in_layers if n.startswith(prefixes[index])):
                _set(skeleton, name, files.read(name, dtype).to(device))
            params_before += sum(p.numel() for p in layer.parameters())
            timing["read"] += time.perf_counter() - t0
            _, layer_record = prune_layer(adapter, index, flows, cfg, data.seed, timing,
                                          folds=FOLDS if cfg.method == "auto" else 0)
            t1 = time.perf_counter()
            state = {prefixes[index] + k: v.detach().to("cpu").contiguous() for k, v in layer.state_dict().items()}
            params_after += sum(p.numel() for p in layer.parameters())
            file = f"model-layer-{index:05d}.safetensors"
            _save(state, tmp / file)
            weight_map.update(dict.fromkeys(state, file))
            layer.to("meta")  # drop the layer's weights; the shapes stay for the config and layout
            del state
            timing["write"] += time.perf_counter() - t1
            records.append(layer_record)
            if on_layer:
                on_layer(layer_record)
        rest = {name: files.read(name) for name in outside}
        shared = sum(t.numel() for t in rest.values())
        _save(rest, tmp / "model-rest.safetensors")
        weight_map.update(dict.fromkeys(rest, "model-rest.safetensors"))
        del rest
        params_before += shared
        params_after += shared
        config = copy.deepcopy(skeleton.config)
        config.rcpu = {
            **(record or {}), "streamed": True, "stock_loadable": False,
            "why_not_stock": "streamed layer by layer: written in the rcpu layout (rcpu.load_pruned loads it)",
            "layout": layout_record(skeleton), "params_saved": params_after,
        }
        config.save_pretrained(tmp)
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_parameters": params_after}, "weight_map": dict(sorted(weight_map.items()))},
            indent=1))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if out.exists():  # --overwrite
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if progress:
        progress(n_layers, n_layers, "done")
    timing["total"] = time.perf_counter() - start
    return StreamResult(out, cfg, data, records, params_before, params_after, timing)


def _save(state: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(state, str(path), metadata={"format": "pt"})
