"""Saving a pruned model so that stock transformers loads it.

Every layer of a uniformly pruned model has the same number of query heads and
MLP channels. KV heads are regrouped to one group size across layers (the gcd of
the per-layer group sizes, repeating KV heads where groups were uneven), and
added biases are given to every projection of their kind (zeros where a
projection had none), as the stock configs describe them. The folder is written
to a temporary sibling and renamed, so an interrupted save leaves nothing
half-written.
"""

from __future__ import annotations

import copy
import io
import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

from torch import nn

from .adapters import adapter_for
from .errors import RcpuError
from .surgery import add_zero_biases, kv_groups, relayout_attention, slots_needed


def check_output_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise RcpuError(f"output {out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise RcpuError(f"output {out} exists and is not a directory")
    if not out.parent.exists():
        raise RcpuError(f"folder {out.parent} does not exist")


def stock_head_layout(hidden: int, layer_groups: list[list[int]]) -> tuple[int, int]:
    """(query heads per KV head ``g``, KV heads ``n``) for one layout that every layer fits.

    Stock configs need the same ``g`` and ``n`` in every layer and ``hidden % (g * n) == 0``
    (transformers validates it). Layers whose kept heads do not fit exactly are padded
    with zero heads; the choice minimises the attention parameters ``~ g * n + n``.
    """
    kept = max(sum(groups) for groups in layer_groups)
    best = None
    for heads in range(kept, hidden + 1):
        if hidden % heads:
            continue
        for g in range(1, heads + 1):
            if heads % g:
                continue
            n = heads // g
            if all(slots_needed(groups, g) <= n for groups in layer_groups):
                cost = (heads + n, heads)
                best = min(best or (cost, g, n), (cost, g, n))
        if best is not None and best[0][0] <= heads:  # wider layouts only cost more
            break
    if best is None:
        raise RcpuError("no stock attention layout fits these pruned layers")
    return best[1], best[2]


def stock_layout(model: nn.Module, inplace: bool = False) -> nn.Module:
    """A pruned model (a copy unless ``inplace``) whose every layer has the same shapes
    that its updated config describes, so stock transformers loads it."""
    if not inplace:
        model = copy.deepcopy(model)
    adapter = adapter_for(model)
    layers = range(adapter.num_layers)
    channels = {adapter.num_channels(i) for i in layers}
    if len(channels) != 1:
        raise RcpuError("layers have different numbers of MLP channels; stock transformers cannot load that")
    group, n_kv = stock_head_layout(adapter.hidden_size, [kv_groups(adapter, i) for i in layers])
    for i in layers:
        relayout_attention(adapter, i, group, n_kv)
    attention_biased = any(adapter.attention_output(i).bias is not None for i in layers)
    mlp_biased = any(adapter.mlp_output(i).bias is not None for i in layers)
    add_zero_biases(adapter, attention=attention_biased, mlp=mlp_biased)
    adapter.write_config(heads=group * n_kv, kv_heads=n_kv, channels=channels.pop(),
                         attention_biased=attention_biased, mlp_biased=mlp_biased)
    return model


def save_pruned(
    model: nn.Module, tokenizer, out: str | Path, *, record: dict | None = None, overwrite: bool = False
) -> Path:
    """Write safetensors, config (with ``rcpu`` = what was done) and tokenizer to ``out``."""
    out = Path(out)
    check_output_dir(out, overwrite)
    stock = stock_layout(model)  # a no-op layout for a model that prune_model returned
    if record is not None:
        stock.config.rcpu = record
    _remove_stale_temporaries(out)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-{os.getpid()}-"))
    try:
        stock.save_pretrained(tmp, safe_serialization=True)
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
