"""Text sources and the calibration / held-out split."""

from __future__ import annotations

import re

import pytest
import torch

from rcpu.errors import RcpuError
from rcpu.text import (
    HELDOUT_FRACTION,
    Sampling,
    calibration_starts,
    calibration_windows,
    consecutive_windows,
    load_text,
    split_tokens,
    text_fingerprint,
)

# Sources ------------------------------------------------------------------------------


def test_embedded_text_is_large_and_stable():
    text = load_text("embedded")
    assert isinstance(text, str) and len(text) > 400_000
    assert text.strip()
    assert text_fingerprint("embedded") == text_fingerprint("embedded")


def test_txt_file(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("Grüße, world.\nSecond line ∑.\n", encoding="utf-8")
    assert load_text(str(path)) == "Grüße, world.\nSecond line ∑.\n"


def test_folder_of_txt_files_in_name_order(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "b.txt").write_text("second")
    (folder / "a.txt").write_text("first")
    (folder / "notes.md").write_text("ignored")
    (folder / "data.bin").write_bytes(b"\x00\x01")
    assert load_text(str(folder)) == "first\n\nsecond"


def test_tilde_path_expands(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "home.txt").write_text("from home")
    assert load_text("~/home.txt") == "from home"


def test_fingerprint_depends_on_content(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("alpha")
    b.write_text("beta")
    assert text_fingerprint(str(a)) != text_fingerprint(str(b))


def _error(source: str) -> str:
    with pytest.raises(RcpuError) as info:
        load_text(source)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_empty_file(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("")
    assert "empty" in _error(str(path))


def test_whitespace_only_file(tmp_path):
    path = tmp_path / "blank.txt"
    path.write_text("  \n\n\t \n")
    assert "empty" in _error(str(path))


def test_binary_file(tmp_path):
    path = tmp_path / "model.txt"
    path.write_bytes(b"GGUF\x00\x00\x01\x02" * 100)
    message = _error(str(path))
    assert "binary" in message and str(path) in message


def test_non_utf8_file(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))
    message = _error(str(path))
    assert "UTF-8" in message and "byte 3" in message


def test_missing_path(tmp_path):
    message = _error(str(tmp_path / "nowhere.txt"))
    assert "not found" in message and "nowhere.txt" in message


def test_folder_without_txt(tmp_path):
    folder = tmp_path / "nothing"
    folder.mkdir()
    (folder / "x.md").write_text("hello")
    assert "no .txt files" in _error(str(folder))


def test_unreadable_entry_is_a_clear_error(tmp_path):
    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / "a.txt").write_text("fine")
    (folder / "sub.txt").mkdir()  # a folder whose name ends in .txt
    message = _error(str(folder))
    assert "cannot read" in message and "sub.txt" in message


def test_folder_with_a_bad_file_names_it(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "good.txt").write_text("fine")
    (folder / "bad.txt").write_bytes(b"\xff\xfe\xfa")
    assert "bad.txt" in _error(str(folder))


# Split and windows -----------------------------------------------------------------


def test_split_is_prefix_and_last_fifth():
    ids = torch.arange(1000)
    calib, held = split_tokens(ids, 64)
    assert len(held) == int(1000 * HELDOUT_FRACTION) == 200
    assert torch.equal(torch.cat([calib, held]), ids)
    assert calib.max() < held.min()


@pytest.mark.parametrize("seq_len", [1, 7, 64, 128, 333, 512, 2048])
def test_split_error_says_how_many_tokens_are_needed(seq_len):
    with pytest.raises(RcpuError) as info:
        split_tokens(torch.arange(seq_len * 2), seq_len, source="tiny.txt")
    message = str(info.value)
    assert "tiny.txt" in message and f"{seq_len * 2} tokens" in message
    need = int(re.search(r"at least (\d+) are needed", message).group(1))
    # the number is sufficient and exact: with `need` tokens it works, with one fewer it does not
    calib, held = split_tokens(torch.arange(need), seq_len)
    assert len(calib) >= seq_len and len(held) >= seq_len
    with pytest.raises(RcpuError):
        split_tokens(torch.arange(need - 1), seq_len)


def test_windows_deterministic_per_seed():
    calib, _ = split_tokens(torch.arange(5000), 32)
    s = Sampling(calib_samples=16, seq_len=32, seed=3)
    a = calibration_windows(calib, s)
    b = calibration_windows(calib, s)
    c = calibration_windows(calib, Sampling(calib_samples=16, seq_len=32, seed=4))
    assert a.shape == (16, 32) and a.dtype == calib.dtype
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert calibration_starts(len(calib), s).tolist() == a[:, 0].tolist()  # calib is arange: a window's first id


def test_windows_come_only_from_the_calibration_part():
    ids = torch.arange(3000)
    calib, held = split_tokens(ids, 50)
    held_set = set(held.tolist())
    for seed in range(20):
        windows = calibration_windows(calib, Sampling(calib_samples=40, seq_len=50, seed=seed))
        for w in windows:
            assert torch.equal(w, torch.arange(int(w[0]), int(w[0]) + 50))  # contiguous slice
        assert int(windows.max()) < len(calib)
        assert held_set.isdisjoint(windows.reshape(-1).tolist())


def test_windows_reach_both_ends_of_short_calibration_part():
    calib = torch.arange(12)
    windows = calibration_windows(calib, Sampling(calib_samples=400, seq_len=10, seed=0))
    starts = set(windows[:, 0].tolist())
    assert starts == {0, 1, 2}  # every possible start, and no window past the end


def test_consecutive_windows():
    ids = torch.arange(105)
    w = consecutive_windows(ids, 10)
    assert w.shape == (10, 10)
    assert torch.equal(w.reshape(-1), ids[:100])
    assert torch.equal(consecutive_windows(ids, 10, limit=3), ids[:30].reshape(3, 10))
    assert consecutive_windows(ids, 10, limit=50).shape == (10, 10)
    assert consecutive_windows(ids, 200).shape == (0, 200)


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"seq_len": 0}, "sequence length"),
        ({"seq_len": 40000}, "sequence length"),
        ({"calib_samples": 0}, "calibration samples"),
        ({"heldout_samples": -1}, "held-out samples"),
    ],
)
def test_sampling_check(kwargs, word):
    with pytest.raises(RcpuError, match=word):
        Sampling(**kwargs).check()
    Sampling().check()


@pytest.mark.slow
def test_embedded_text_tokenizes_into_a_valid_split(embedded):
    from rcpu.text import tokenize

    ids = tokenize(embedded.tokenizer, load_text("embedded")[:50_000])
    assert ids.dtype == torch.long and len(ids) > 5000
    calib, _ = split_tokens(ids, 256)
    windows = calibration_windows(calib, Sampling(calib_samples=8, seq_len=256))
    assert windows.shape == (8, 256)
    assert int(windows.max()) < embedded.model.config.vocab_size
