"""The disk cache: round trips, damage detection (discard, warn, recompute), no pickle."""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest

from rcpu import cache


@pytest.fixture
def arrays():
    rng = np.random.default_rng(0)
    return {
        "gram": rng.standard_normal((6, 6)),
        "total": rng.standard_normal(6).astype(np.float32),
        "count": np.array(123, dtype=np.int64),
        "sample": rng.standard_normal((6, 4)).astype(np.float32),
    }


PAYLOAD = {"a": [1, 2.5, "x"], "b": None, "nested": {"k": True}}


def same_arrays(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(
        a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a
    )


def leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp") or p.name.startswith(".")]


def test_cache_root_follows_env(tmp_cache):
    assert cache.cache_root() == tmp_cache


def test_arrays_round_trip(tmp_cache, arrays):
    path = tmp_cache / "stats" / "entry.npz"
    cache.save_arrays(path, arrays, meta={"layer": 3})
    out = cache.load_arrays(path)
    assert same_arrays(out, arrays)
    assert leftovers(path.parent) == []


def test_json_round_trip(tmp_cache):
    path = tmp_cache / "results" / "r.json"
    cache.save_json(path, PAYLOAD)
    assert cache.load_json(path) == PAYLOAD
    assert leftovers(path.parent) == []


def test_missing_entries_are_none(tmp_cache):
    assert cache.load_arrays(tmp_cache / "nope.npz") is None
    assert cache.load_json(tmp_cache / "nope.json") is None


def test_key_of_is_stable_and_order_free():
    a = cache.key_of({"model": "m", "layer": 2, "sampling": {"seq": 128, "seed": 0}})
    b = cache.key_of({"sampling": {"seed": 0, "seq": 128}, "layer": 2, "model": "m"})
    c = cache.key_of({"model": "m", "layer": 3, "sampling": {"seq": 128, "seed": 0}})
    assert a == b != c and len(a) == 24


def _expect_discarded(path, caplog, loader):
    with caplog.at_level(logging.WARNING, logger="rcpu"):
        assert loader(path) is None
    assert not path.exists()
    assert any(
        "discarded" in r.getMessage() and path.name in r.getMessage() for r in caplog.records
    )


@pytest.mark.parametrize("keep", [0, 10, 100, 0.5, 0.9, -1])
def test_truncated_arrays_discarded(tmp_cache, arrays, caplog, keep):
    path = tmp_cache / "t.npz"
    cache.save_arrays(path, arrays)
    data = path.read_bytes()
    n = (
        int(len(data) * keep)
        if isinstance(keep, float)
        else (len(data) + keep if keep < 0 else keep)
    )
    path.write_bytes(data[:n])
    _expect_discarded(path, caplog, cache.load_arrays)


def test_flipped_byte_in_array_data_discarded(tmp_cache, arrays, caplog):
    path = tmp_cache / "f.npz"
    cache.save_arrays(path, arrays)
    data = bytearray(path.read_bytes())
    at = bytes(data).find(arrays["gram"].tobytes()[:16])
    assert at > 0
    data[at + 5] ^= 0x10
    path.write_bytes(bytes(data))
    _expect_discarded(path, caplog, cache.load_arrays)


def test_content_not_matching_checksum_discarded(tmp_cache, arrays, caplog):
    """A valid zip whose arrays differ from what the header's SHA-256 describes."""
    path = tmp_cache / "c.npz"
    cache.save_arrays(path, arrays)
    with np.load(path, allow_pickle=False) as npz:
        header = str(npz["__header__"])
    changed = dict(arrays, gram=arrays["gram"] + 1e-12)
    buf = io.BytesIO()
    np.savez(buf, __header__=np.array(header), **changed)
    path.write_bytes(buf.getvalue())
    with caplog.at_level(logging.WARNING, logger="rcpu"):
        assert cache.load_arrays(path) is None
    assert not path.exists()
    assert any("checksum" in r.getMessage() for r in caplog.records)


def test_every_single_byte_flip_is_detected_or_harmless(tmp_cache, arrays, caplog):
    """Flip each byte of an entry: load either returns the original arrays or discards the file.

    It must never raise (zip flag bits, compression method and npy headers included).
    """
    path = tmp_cache / "e.npz"
    small = {"g": arrays["gram"][:2, :2], "c": arrays["count"]}
    cache.save_arrays(path, small)
    original = path.read_bytes()
    caplog.set_level(logging.ERROR, logger="rcpu")
    discarded = 0
    for i in range(len(original)):
        for bit in (0x01, 0x80):
            data = bytearray(original)
            data[i] ^= bit
            path.write_bytes(bytes(data))
            out = cache.load_arrays(path)
            if out is None:
                assert not path.exists()
                discarded += 1
            else:
                assert same_arrays(out, small), f"byte {i} bit {bit:#x} changed the data undetected"
    assert discarded > len(original)  # most flips matter


def test_old_format_arrays_discarded(tmp_cache, arrays, caplog, monkeypatch):
    path = tmp_cache / "old.npz"
    monkeypatch.setattr(cache, "FORMAT_VERSION", cache.FORMAT_VERSION - 1)
    cache.save_arrays(path, arrays)
    monkeypatch.undo()
    with caplog.at_level(logging.WARNING, logger="rcpu"):
        assert cache.load_arrays(path) is None
    assert not path.exists()
    assert any("format" in r.getMessage() for r in caplog.records)


def test_npz_without_header_discarded(tmp_cache, arrays, caplog):
    path = tmp_cache / "plain.npz"
    np.savez(path, **arrays)
    _expect_discarded(path, caplog, cache.load_arrays)


def test_pickled_object_array_is_never_unpickled(tmp_cache, caplog):
    """An entry holding an object array would need pickle; it is refused, not executed."""
    path = tmp_cache / "evil.npz"
    header = {"format": cache.FORMAT_VERSION, "sha256": "0" * 64, "meta": {}}
    buf = io.BytesIO()
    np.savez(buf, __header__=np.array(json.dumps(header)), obj=np.array([{"x": 1}], dtype=object))
    path.write_bytes(buf.getvalue())
    _expect_discarded(path, caplog, cache.load_arrays)


def test_load_uses_allow_pickle_false(tmp_cache, arrays, monkeypatch):
    path = tmp_cache / "p.npz"
    cache.save_arrays(path, arrays)
    calls = []
    real = np.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("allow_pickle"))
        return real(*args, **kwargs)

    monkeypatch.setattr(cache.np, "load", spy)
    assert cache.load_arrays(path) is not None
    assert calls == [False]


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b[: len(b) // 2],  # truncated
        lambda b: b"",  # empty
        lambda b: b.replace(b'"payload"', b'"paylaod"'),  # missing key
        lambda b: b.replace(b"2.5", b"2.6"),  # content changed, checksum stale
        lambda b: b"\xff\xfe" + b,  # not UTF-8
        lambda b: b"[1, 2, 3]",  # not an object
        lambda b: b'"just a string"',
    ],
)
def test_damaged_json_discarded(tmp_cache, caplog, damage):
    path = tmp_cache / "d.json"
    cache.save_json(path, PAYLOAD)
    path.write_bytes(damage(path.read_bytes()))
    _expect_discarded(path, caplog, cache.load_json)


def test_every_json_byte_flip_is_detected_or_harmless(tmp_cache, caplog):
    path = tmp_cache / "e.json"
    cache.save_json(path, PAYLOAD)
    original = path.read_bytes()
    caplog.set_level(logging.ERROR, logger="rcpu")
    for i in range(len(original)):
        data = bytearray(original)
        data[i] ^= 0x01
        path.write_bytes(bytes(data))
        out = cache.load_json(path)
        assert out is None or out == PAYLOAD, i
        assert out is not None or not path.exists()


def test_old_format_json_discarded(tmp_cache, caplog):
    path = tmp_cache / "old.json"
    cache.save_json(path, PAYLOAD)
    entry = json.loads(path.read_text())
    entry["format"] = cache.FORMAT_VERSION - 1
    path.write_text(json.dumps(entry))
    _expect_discarded(path, caplog, cache.load_json)


def test_atomic_write_replaces_and_leaves_no_temp(tmp_cache):
    path = tmp_cache / "sub" / "deeper" / "f.bin"
    cache.atomic_write_bytes(path, b"first")
    cache.atomic_write_bytes(path, b"second")
    assert path.read_bytes() == b"second"
    assert [p.name for p in path.parent.iterdir()] == ["f.bin"]


def test_atomic_write_failure_keeps_old_file_and_no_temp(tmp_cache, monkeypatch):
    path = tmp_cache / "a.bin"
    cache.atomic_write_bytes(path, b"old")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(cache.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        cache.atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_cache.iterdir() if p.is_file()] == ["a.bin"]


def test_cache_size_and_clear_section(tmp_cache, arrays):
    cache.save_arrays(tmp_cache / "stats" / "a.npz", arrays)
    cache.save_arrays(tmp_cache / "stats" / "sub" / "b.npz", arrays)
    cache.save_json(tmp_cache / "results" / "r.json", PAYLOAD)
    (tmp_cache / "README.md").write_text("not counted")
    sizes = cache.cache_size()
    stats_bytes = sum(p.stat().st_size for p in (tmp_cache / "stats").rglob("*") if p.is_file())
    assert sizes["stats"] == stats_bytes > 0
    assert sizes["results"] == (tmp_cache / "results" / "r.json").stat().st_size
    assert "README.md" not in sizes
    freed = cache.clear_cache("stats")
    assert freed == stats_bytes
    assert not (tmp_cache / "stats").exists()
    assert (tmp_cache / "results" / "r.json").exists()
    assert cache.clear_cache("nothing-here") == 0


def test_clear_all_never_touches_linked_models(tmp_cache, arrays):
    """tmp_cache links models/ to the shared converted models: clearing must drop the link only."""
    linked = tmp_cache / "models"
    assert linked.is_symlink()
    real_models = linked.resolve()
    before = sorted(p.name for p in real_models.iterdir())
    cache.save_arrays(tmp_cache / "stats" / "a.npz", arrays)
    cache.save_json(tmp_cache / "results.json", PAYLOAD)
    cache.clear_cache()
    assert not (tmp_cache / "stats").exists()
    assert not (tmp_cache / "results.json").exists()
    assert not linked.exists() and not linked.is_symlink()
    assert sorted(p.name for p in real_models.iterdir()) == before


def test_clear_everything_in_a_plain_cache(tmp_path, monkeypatch, arrays):
    root = tmp_path / "plain"
    monkeypatch.setenv("RCPU_CACHE", str(root))
    cache.save_arrays(root / "stats" / "a.npz", arrays)
    cache.save_json(root / "results" / "r.json", PAYLOAD)
    (root / "loose.bin").write_bytes(b"12345")
    total = sum(cache.cache_size().values())
    assert cache.clear_cache() == total > 0
    assert cache.cache_size() == {}
