"""Text sources and calibration / held-out sampling.

Sources: ``embedded`` (the Python reference shipped with CPython), a ``.txt``
file or a folder of them, and Hugging Face datasets (``wikitext2`` or
``hf:NAME[:CONFIG]``) when online. Tokens are split once: the first part is for
calibration, the last ``heldout_fraction`` is held out, so the two never overlap.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

from .errors import RcpuError

HELDOUT_FRACTION = 0.2
MAX_TEXT_BYTES = 200_000_000
MAX_UPLOAD_BYTES = 20_000_000


def _embedded_text() -> str:
    from pydoc_data import topics

    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


def _read_txt(path: Path) -> str:
    try:
        if path.stat().st_size > MAX_TEXT_BYTES:
            raise RcpuError(f"text file {path} is larger than {MAX_TEXT_BYTES // 1_000_000} MB")
        raw = path.read_bytes()
    except OSError as exc:  # unreadable: permissions, a folder named *.txt, ...
        raise RcpuError(f"cannot read {path}: {exc.strerror or type(exc).__name__}") from None
    if b"\x00" in raw[:65536]:
        raise RcpuError(f"{path} looks binary, not text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RcpuError(f"{path} is not UTF-8 text (byte {exc.start})") from None


def _hub_text(name: str, config: str | None, split: str) -> str:
    try:
        import datasets
    except ImportError:
        raise RcpuError("the 'datasets' package is needed for hub datasets") from None
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # network, missing dataset
        raise RcpuError(
            f"could not load dataset {name!r} from the Hugging Face hub ({type(exc).__name__}); "
            "offline, pass a .txt file or a folder of them instead"
        ) from None
    column = "text" if "text" in ds.column_names else ds.column_names[0]
    return "\n\n".join(ds[column])


def _stamp(source: str) -> tuple:
    """Changes when a local text source changes, so cached text never goes stale."""
    path = Path(source).expanduser()
    try:
        files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
        return tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in files)
    except OSError:
        return ()


def load_text(source: str, split: str = "train") -> str:
    """The raw text of a source. ``split`` only matters for hub datasets."""
    return _load_text(source, split, _stamp(source))


@lru_cache(maxsize=8)
def _load_text(source: str, split: str, stamp: tuple) -> str:
    if source == "embedded":
        return _embedded_text()
    if source == "wikitext2":
        return _hub_text("wikitext", "wikitext-2-raw-v1", split)
    if source.startswith("hf:"):
        name, _, config = source[3:].partition(":")
        return _hub_text(name, config or None, split)
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise RcpuError(f"folder {path} holds no .txt files")
        text = "\n\n".join(_read_txt(f) for f in files)
    elif path.is_file():
        text = _read_txt(path)
    else:
        raise RcpuError(
            f"text source {source!r} not found; use 'embedded', a .txt file, a folder of .txt "
            "files, 'wikitext2' or 'hf:NAME[:CONFIG]'"
        )
    if not text.strip():
        raise RcpuError(f"text source {source!r} is empty")
    return text


def save_upload(data: bytes, root: Path | None = None, limit: int = MAX_UPLOAD_BYTES) -> Path:
    """Check an uploaded text and store it as ``<root>/uploads/<sha256>.txt`` (a text source).

    Only UTF-8 text is accepted; nothing uploaded is executed or unpickled, and
    the uploaded file's own name is never used in a path.
    """
    from .cache import atomic_write_bytes, cache_root

    if len(data) > limit:
        raise RcpuError(f"uploaded file is {len(data) / 1e6:.1f} MB; the limit is {limit / 1e6:.0f} MB")
    if not data.strip():
        raise RcpuError("uploaded file is empty")
    if b"\x00" in data[:65536]:
        raise RcpuError("uploaded file looks binary, not text")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RcpuError(f"uploaded file is not UTF-8 text (byte {exc.start})") from None
    digest = hashlib.sha256(data).hexdigest()
    path = (root or cache_root()) / "uploads" / f"{digest}.txt"
    if not path.exists():
        atomic_write_bytes(path, data)
    return path


def text_fingerprint(source: str) -> str:
    """Identity of a text source for cache keys (content hash)."""
    return hashlib.sha256(load_text(source).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Sampling:
    calib_samples: int = 32
    seq_len: int = 512
    seed: int = 0
    heldout_samples: int = 8

    def check(self) -> None:
        if not 1 <= self.seq_len <= 32768:
            raise RcpuError(f"sequence length must be between 1 and 32768, got {self.seq_len}")
        if not 1 <= self.calib_samples <= 100_000:
            raise RcpuError(f"calibration samples must be between 1 and 100000, got {self.calib_samples}")
        if not 0 <= self.heldout_samples <= 100_000:
            raise RcpuError(f"held-out samples must be between 0 and 100000, got {self.heldout_samples}")


def tokenize(tokenizer, text: str) -> Tensor:
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def split_tokens(ids: Tensor, seq_len: int, source: str = "text") -> tuple[Tensor, Tensor]:
    """(calibration part, held-out part): the held-out part is the last fifth."""
    n_heldout = int(len(ids) * HELDOUT_FRACTION)
    calib, heldout = ids[: len(ids) - n_heldout], ids[len(ids) - n_heldout :]
    if len(calib) < seq_len or len(heldout) < seq_len:
        need = math.ceil(seq_len / HELDOUT_FRACTION)  # smallest length that splits
        raise RcpuError(
            f"text {source!r} has {len(ids)} tokens; at least {need} are needed for one "
            f"{seq_len}-token calibration sample and one held-out window (or lower --seq-len)"
        )
    return calib, heldout


def calibration_starts(n_tokens: int, sampling: Sampling) -> Tensor:
    """Where each of the ``calib_samples`` seeded random windows starts in a text of ``n_tokens``."""
    gen = torch.Generator().manual_seed(sampling.seed)
    return torch.randint(0, n_tokens - sampling.seq_len + 1, (sampling.calib_samples,), generator=gen)


def calibration_windows(calib: Tensor, sampling: Sampling) -> Tensor:
    """``calib_samples`` seeded random windows of ``seq_len`` tokens, shape (n, seq_len)."""
    starts = calibration_starts(len(calib), sampling)
    return torch.stack([calib[s : s + sampling.seq_len] for s in starts.tolist()])


def consecutive_windows(ids: Tensor, seq_len: int, limit: int | None = None) -> Tensor:
    """Non-overlapping windows from the start of ``ids``, shape (n, seq_len)."""
    n = len(ids) // seq_len
    if limit is not None:
        n = min(n, limit)
    return ids[: n * seq_len].reshape(n, seq_len)
