"""Saving a pruned model, and loading it back exactly.

A pruned model keeps its real shapes: only the kept query heads, KV heads and MLP
channels, never a zero head. When a stock transformers class can hold it exactly
(every layer the same shapes, KV heads shared evenly, and the added biases
expressible), the folder is that stock class's: plain
``AutoModelForCausalLM.from_pretrained`` loads it. Which class is decided by
trying the family's own config and then the general ones (``stock_candidates``)
and keeping the first whose model takes every tensor (zeros for biases it adds)
and gives the same logits. Otherwise the folder keeps the source family's
config with a ``rcpu.layout`` record (per-layer KV index), and ``load_pruned``
loads it exactly: safetensors and JSON, no pickle, no remote code. A bias is
never dropped. Folders are written to a temporary sibling and renamed, so an
interrupted save leaves nothing half-written.
"""

from __future__ import annotations

import copy
import io
import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .adapters import adapter_for
from .errors import RcpuError
from .surgery import reshape_linear

LAYOUT_LOADER = "rcpu.load_pruned"


def check_output_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise RcpuError(f"output {out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise RcpuError(f"output {out} exists and is not a directory")
    if not out.parent.exists():
        raise RcpuError(f"folder {out.parent} does not exist")


@dataclass
class StockVerdict:
    """Whether a stock class holds the pruned model exactly: the stock model, or why not."""

    model: nn.Module | None
    reason: str  # the stock class used, or why none can hold the model

    @property
    def loadable(self) -> bool:
        return self.model is not None


def _uniform_reason(adapter) -> str | None:
    layers = range(adapter.num_layers)
    uneven = [i for i in layers if getattr(adapter.attention_module(i), "rcpu_kv_index", None) is not None]
    if uneven:
        return (f"layers {uneven[:6]}{'...' if len(uneven) > 6 else ''} share KV heads unevenly among their "
                "query heads; stock attention gives every KV head the same number")
    for what, count in (("query heads", adapter.num_heads), ("KV heads", adapter.num_kv_heads),
                        ("MLP channels", adapter.num_channels)):
        if len({count(i) for i in layers}) > 1:
            return f"layers have different numbers of {what}; a stock config has one number for all layers"
    return None


def _same_logits(a: nn.Module, b: nn.Module, vocab: int) -> bool:
    ids = torch.randint(0, vocab, (1, 12), generator=torch.Generator().manual_seed(0))
    device = next(a.parameters()).device
    with torch.no_grad():
        x, y = a(ids.to(device)).logits, b(ids.to(device)).logits
    return bool(torch.allclose(x, y, rtol=1e-4, atol=1e-4 * float(x.abs().max().clamp_min(1.0))))


def stock_verdict(model: nn.Module) -> StockVerdict:
    """The stock model that holds ``model`` exactly (its weights, zeros for added biases), or why none can."""
    from transformers import AutoModelForCausalLM

    adapter = adapter_for(model)
    reason = _uniform_reason(adapter)
    if reason is not None:
        return StockVerdict(None, reason)
    state = model.state_dict()
    dtype = next(model.parameters()).dtype
    tried = []
    for make_config in adapter.stock_candidates(
        heads=adapter.num_heads(0), kv_heads=adapter.num_kv_heads(0), channels=adapter.num_channels(0),
        attention_biased=any(adapter.attention_output(i).bias is not None for i in range(adapter.num_layers)),
        mlp_biased=any(adapter.mlp_output(i).bias is not None for i in range(adapter.num_layers)),
    ):
        try:
            config = make_config()
            stock = AutoModelForCausalLM.from_config(config, dtype=dtype)
        except Exception as exc:  # a config its own validation refuses
            tried.append(" ".join(str(exc).split())[:100])
            continue
        own = stock.state_dict()
        missing = set(own) - set(state)
        unexpected = set(state) - set(own)
        if unexpected or any(not k.endswith(".bias") for k in missing) or any(
            own[k].shape != state[k].shape for k in set(own) & set(state)
        ):
            tried.append(f"{type(config).__name__}: other tensors")
            continue
        filled = {**state, **{k: torch.zeros_like(own[k]) for k in missing}}
        stock.load_state_dict(filled, strict=True)
        stock.to(next(model.parameters()).device).eval().requires_grad_(False)
        if _same_logits(model, stock, config.vocab_size):
            return StockVerdict(stock, type(stock).__name__)
        tried.append(f"{type(config).__name__}: other logits")
    return StockVerdict(None, "no stock class holds these layers exactly (" + "; ".join(tried) + ")")


def layout_record(model: nn.Module) -> dict:
    """What ``load_pruned`` needs besides the tensors: each layer's KV head per query head."""
    adapter = adapter_for(model)
    index = {}
    for i in range(adapter.num_layers):
        kv_index = getattr(adapter.attention_module(i), "rcpu_kv_index", None)
        if kv_index is not None:
            index[str(i)] = kv_index.tolist()
    return {"loader": LAYOUT_LOADER, "kv_index": index}


def save_pruned(
    model: nn.Module, tokenizer, out: str | Path, *, record: dict | None = None, overwrite: bool = False
) -> Path:
    """Write safetensors, config (with ``rcpu`` = what was done) and tokenizer to ``out``.

    ``record["stock_loadable"]`` says whether plain ``from_pretrained`` loads the folder; when it
    does not, ``record["why_not_stock"]`` says why and ``load_pruned`` (or ``rcpu eval``) loads it.
    """
    out = Path(out)
    check_output_dir(out, overwrite)
    verdict = stock_verdict(model)
    record = dict(record or {})
    record["stock_loadable"] = verdict.loadable
    if verdict.loadable:
        to_save = verdict.model
        record["stock_class"] = verdict.reason
    else:
        to_save = copy.copy(model)  # the same modules; only the saved config differs
        to_save.config = copy.deepcopy(model.config)
        record["why_not_stock"] = verdict.reason
        record["layout"] = layout_record(model)
    record["params_saved"] = sum(t.numel() for t in {id(p): p for p in to_save.parameters()}.values())
    to_save.config.rcpu = record
    _remove_stale_temporaries(out)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-{os.getpid()}-"))
    try:
        to_save.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if out.exists():  # --overwrite: swap in the new folder, then drop the old one
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-{os.getpid()}-"))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _tensor_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    shapes = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (a safetensors handle is not a dict)
                shapes[name] = tuple(handle.get_slice(name).get_shape())
    return shapes


def load_pruned(folder: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load a folder saved with a ``rcpu.layout`` record exactly: the family's class with each
    layer's linears at their saved shapes, the KV index of unevenly grouped layers, then the
    safetensors weights (strictly: every tensor must find its place)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder)
    layout = (getattr(config, "rcpu", None) or {}).get("layout") or {}
    if layout.get("loader") != LAYOUT_LOADER:
        raise RcpuError(f"{folder} was not saved with a rcpu layout; load it with from_pretrained")
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    adapter = adapter_for(model)
    shapes = _tensor_shapes(folder)
    names = {id(m): n for n, m in model.named_modules()}
    for i in range(adapter.num_layers):
        for linear in adapter.projections(i):
            name = names[id(linear)]
            weight = torch.zeros(shapes[f"{name}.weight"], dtype=dtype)
            bias = torch.zeros(shapes[f"{name}.bias"], dtype=dtype) if f"{name}.bias" in shapes else None
            reshape_linear(linear, weight, bias)
        kv_index = layout.get("kv_index", {}).get(str(i))
        if kv_index is not None:
            adapter.set_kv_index(i, torch.tensor(kv_index))
        else:
            adapter.set_query_groups(i, adapter.queries_per_kv(i))
    state = {}
    for path in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(path)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if unexpected or any(k not in tied and not k.endswith("lm_head.weight") for k in missing):
        raise RcpuError(f"{folder} does not match its layout (missing {sorted(missing)[:3]}, "
                        f"unexpected {sorted(unexpected)[:3]})")
    model.tie_weights()
    return model.eval().requires_grad_(False)


def zip_pruned(model: nn.Module, tokenizer, record: dict | None = None, report: dict | None = None) -> bytes:
    """The pruned model as a zip of its stock-loadable folder (safetensors, config, tokenizer),
    with ``report`` as ``rcpu_results.json`` beside it."""
    with tempfile.TemporaryDirectory(prefix="rcpu-zip-") as tmp:
        folder = save_pruned(model, tokenizer, Path(tmp) / "pruned", record=record)
        if report is not None:
            (folder / "rcpu_results.json").write_text(json.dumps(report, indent=2))
        buffer = io.BytesIO()
        # Weights barely compress: store them, deflate the small text files.
        with zipfile.ZipFile(buffer, "w") as archive:
            for path in sorted(folder.rglob("*")):
                if path.is_file():
                    kind = zipfile.ZIP_STORED if path.suffix == ".safetensors" else zipfile.ZIP_DEFLATED
                    archive.write(path, f"pruned-model/{path.relative_to(folder)}", compress_type=kind)
        return buffer.getvalue()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, but another user's
        return True
    return True


def _remove_stale_temporaries(out: Path) -> None:
    """Delete the hidden temporary folders of earlier saves to ``out`` whose process died (killed
    mid-save). A ``.tmp-`` folder never became ``out``; an ``.old-`` one is the replaced folder of a
    finished swap (kept while ``out`` is missing: it is then the only copy of the previous model)."""
    for stale in out.parent.iterdir():
        for kind in ("tmp", "old"):
            prefix = f".{out.name}.{kind}-"
            if not stale.name.startswith(prefix) or not stale.is_dir():
                continue
            pid, sep, _ = stale.name[len(prefix):].partition("-")
            if not (pid.isdigit() and sep) or _pid_alive(int(pid)) or (kind == "old" and not out.exists()):
                continue
            shutil.rmtree(stale, ignore_errors=True)
