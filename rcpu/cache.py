"""Machine-local disk cache: atomic writes, checksums, a format version, no pickle.

Entries are NumPy ``.npz`` (arrays, loaded with ``allow_pickle=False``) or JSON.
Each carries ``format`` and a SHA-256 of its content; a truncated, corrupted or
old-format entry is discarded with a warning and the caller recomputes it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("rcpu")

FORMAT_VERSION = 1
# The version of the math behind cached statistics and results: part of every key, so that a
# changed formula never serves an entry computed by the old one. Bump it with such a change.
# 2: the authors' rcpu score, the canonical rotation, real pruned shapes, per-layer random seeds.
MATH_VERSION = 2


def cache_root() -> Path:
    """``$RCPU_CACHE`` or ``cache/`` beside the ``rcpu`` package."""
    env = os.environ.get("RCPU_CACHE")
    root = Path(env) if env else Path(__file__).resolve().parent.parent / "cache"
    root.mkdir(parents=True, exist_ok=True)
    return root


def key_of(fields: dict[str, Any]) -> str:
    """Stable short hash of a JSON-serialisable description."""
    text = json.dumps({**fields, "math": MATH_VERSION}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _digest_arrays(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(name.encode())
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save_arrays(path: Path, arrays: dict[str, np.ndarray], meta: dict | None = None) -> None:
    header = {"format": FORMAT_VERSION, "sha256": _digest_arrays(arrays), "meta": meta or {}}
    buf = io.BytesIO()
    np.savez(buf, __header__=np.array(json.dumps(header)), **arrays)
    atomic_write_bytes(path, buf.getvalue())


def _discard(path: Path, why: str) -> None:
    log.warning("cache entry %s discarded (%s); recomputing", path.name, why)
    path.unlink(missing_ok=True)


def load_arrays(path: Path) -> dict[str, np.ndarray] | None:
    """The arrays of a valid entry, or None (missing, or damaged and discarded)."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
        header = json.loads(str(arrays.pop("__header__")))
    except Exception as exc:
        _discard(path, f"unreadable: {type(exc).__name__}")
        return None
    if header.get("format") != FORMAT_VERSION:
        _discard(path, f"format {header.get('format')} != {FORMAT_VERSION}")
        return None
    if header.get("sha256") != _digest_arrays(arrays):
        _discard(path, "checksum mismatch")
        return None
    return arrays


def save_json(path: Path, payload: Any) -> None:
    body = json.dumps(payload, sort_keys=True)
    digest = hashlib.sha256(body.encode()).hexdigest()
    text = json.dumps({"format": FORMAT_VERSION, "sha256": digest, "payload": payload})
    atomic_write_bytes(path, text.encode())


def load_json(path: Path) -> Any | None:
    if not path.exists():
        return None
    try:
        entry = json.loads(path.read_text())
        payload = entry["payload"]
        if entry.get("format") != FORMAT_VERSION:
            _discard(path, "old format")
            return None
        if hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest() != entry["sha256"]:
            _discard(path, "checksum mismatch")
            return None
        return payload
    except (OSError, ValueError, KeyError, TypeError) as exc:
        _discard(path, f"unreadable: {type(exc).__name__}")
        return None


def cache_size() -> dict[str, int]:
    """Bytes used per top-level cache folder."""
    sizes: dict[str, int] = {}
    root = cache_root()
    for child in root.iterdir():
        if child.name == "README.md":
            continue
        files = [child] if child.is_file() else [p for p in child.rglob("*") if p.is_file()]
        sizes[child.name] = sum(p.stat().st_size for p in files)
    return sizes


def clear_cache(section: str | None = None) -> int:
    """Delete cache entries (one section or all); returns bytes freed."""
    freed = 0
    for name, size in cache_size().items():
        if section in (None, name):
            target = cache_root() / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:  # a file, or a symlinked folder: remove the link, never the linked data
                target.unlink()
            freed += size
    return freed
