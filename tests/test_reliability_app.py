"""Reliability and safety of the app (issue 6); the library and CLI side is test_reliability.py.

- Uploads: text only, within the size limit, stored under the content's hash (never the
  uploaded name); a refused upload is an error box and writes nothing.
- Bad models and texts: an error box, never a traceback, nothing cached.
- The server listens on 127.0.0.1 unless configured otherwise.
- Two browser sessions exploring different layers at once each see their own layer.

AppTest runs the app in-process on the tiny random LLaMA (``tiny_model_dir``); the browser
test drives a live server on the embedded model with small calibration settings.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import shutil
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest
import streamlit as st
import torch
from streamlit.testing.v1 import AppTest

from rcpu.models import embedded_gguf
from rcpu.text import MAX_UPLOAD_BYTES

REPO = Path(__file__).resolve().parent.parent
APP = str(REPO / "app.py")
TIMEOUT = 180


@pytest.fixture(autouse=True)
def small_app(monkeypatch):
    for name, value in (("CALIB_SAMPLES", "2"), ("SEQ_LEN", "64"), ("HELDOUT_SAMPLES", "1"), ("LAYER", "1"),
                        ("EVAL_WINDOWS", "1")):
        monkeypatch.setenv(f"RCPU_APP_{name}", value)
    st.cache_data.clear()
    st.cache_resource.clear()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    st.cache_data.clear()
    st.cache_resource.clear()


@pytest.fixture
def plain_cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    root.mkdir()
    monkeypatch.setenv("RCPU_CACHE", str(root))
    return root


def all_files(root: Path) -> set[str]:
    found = set()
    for folder, _, files in os.walk(root):
        found.update(str(Path(folder, f).relative_to(root)) for f in files)
    return found


def home(**state) -> AppTest:
    """The Home page with sidebar values set before the first run (no embedded model is loaded)."""
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    for key, value in state.items():
        at.session_state[key] = value
    return at.run()


def errors(at: AppTest) -> list[str]:
    assert not at.exception, [e.value for e in at.exception]
    return [e.value for e in at.error]


# Uploads ------------------------------------------------------------------------------------


def upload(tiny_model_dir, name: str, data: bytes) -> AppTest:
    at = home(model=str(tiny_model_dir), text_source="upload a .txt file")
    uploader = at.sidebar.file_uploader(key="text_upload")
    assert uploader.allowed_type in ([".txt"], ["txt"])  # the picker offers text files only
    uploader.set_value((name, data, "text/plain"))
    return at.run()


UPLOAD_NAMES = {  # file names that a careless app would turn into a path outside its upload folder
    "traversal": "../../../../../../tmp/rcpu-evil-{tag}.txt",
    "absolute": "/tmp/rcpu-evil-{tag}.txt",
    "windows": "..\\..\\rcpu-evil-{tag}.txt",
    "unicode": "rcpu-ëvïl ✓ {tag}.txt",
}


@pytest.mark.parametrize("kind", list(UPLOAD_NAMES))
def test_upload_is_stored_under_its_hash_never_its_name(tmp_path, plain_cache, tiny_model_dir, kind):
    tag = f"{kind}-{os.getpid()}-{time.monotonic_ns()}"
    name = UPLOAD_NAMES[kind].format(tag=tag)
    data = f"Calibration text from a student's upload {tag}. ".encode() * 200
    at = upload(tiny_model_dir, name, data)
    assert errors(at) == []
    digest = hashlib.sha256(data).hexdigest()
    stored = plain_cache / "uploads" / f"{digest}.txt"
    assert all_files(plain_cache) == {f"uploads/{digest}.txt"} and stored.read_bytes() == data
    assert at.session_state["uploaded_text"] == str(stored)
    assert any(digest[:12] in c.value for c in at.sidebar.caption)
    for folder in (tmp_path, REPO, Path("/tmp"), Path.cwd()):
        leaked = [p for p in (folder.rglob("*") if folder == tmp_path else folder.iterdir()) if tag in p.name]
        assert not leaked, leaked


@pytest.mark.parametrize(
    "data, words",
    [
        (b"a" * (MAX_UPLOAD_BYTES + 1), ["uploaded file is 20.0 MB", "the limit is 20 MB"]),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 10, ["looks binary, not text"]),
        ("Gr\u00fc\u00dfe, caf\u00e9".encode("latin-1") * 100, ["not UTF-8 text", "byte 2"]),
        (b"", ["uploaded file is empty"]),
        (b" \n\t \n", ["uploaded file is empty"]),
    ],
    ids=["too-large", "binary", "latin-1", "empty", "blank"],
)
def test_refused_upload_is_an_error_box_and_writes_nothing(plain_cache, tiny_model_dir, data, words):
    at = upload(tiny_model_dir, "notes.txt", data)
    shown = errors(at)
    assert any(all(w in e for w in words) for e in shown), shown
    assert all_files(plain_cache) == set()
    assert "uploaded_text" not in at.session_state
    assert any("embedded text is used" in c.value for c in at.sidebar.caption)  # the page carries on


def test_configured_upload_limit_matches_the_library_check():
    config = tomllib.loads((REPO / ".streamlit" / "config.toml").read_text())
    assert config["server"]["maxUploadSize"] * 1_000_000 == MAX_UPLOAD_BYTES


# Bad models and texts: error boxes ------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory, tiny_model_dir):
    d = tmp_path_factory.mktemp("badmodels")
    (d / "not-a-model").mkdir()
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64).save_pretrained(d / "gpt2")
    with open(embedded_gguf(), "rb") as fh:
        (d / "truncated.gguf").write_bytes(fh.read(1 << 20))
    shutil.copytree(tiny_model_dir, d / "pickled")
    (d / "pickled" / "model.safetensors").unlink()
    (d / "pickled" / "pytorch_model.bin").write_bytes(pickle.dumps({"w": 1}))
    return d


@pytest.mark.parametrize(
    "model, words",
    [
        ("embeded", ["unknown model 'embeded'"]),
        ("SomeOrg/some-model", ["unreachable", "local directory"]),
        ("not-a-model", ["not a model directory"]),
        ("gpt2", ["unsupported architecture 'gpt2'", "llama"]),
        ("truncated.gguf", ["could not read GGUF file"]),
        ("pickled", ["safetensors only"]),
    ],
)
def test_bad_model_is_an_error_box(plain_cache, bad_models, monkeypatch, model, words):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name = str(bad_models / model) if (bad_models / model).exists() else model
    at = home(model=name)
    shown = errors(at)
    assert any(all(w in e for w in words) for e in shown), shown
    assert all_files(plain_cache) == set()


@pytest.mark.parametrize(
    "content, words",
    [(b"\x00\x01\x02 binary" * 50, ["looks binary"]), ("caf\u00e9".encode("latin-1") * 50, ["not UTF-8"]),
     (b"", ["is empty"])],
    ids=["binary", "latin-1", "empty"],
)
def test_bad_local_text_is_an_error_box(tmp_path, plain_cache, tiny_model_dir, content, words):
    path = tmp_path / "calibration.txt"
    path.write_bytes(content)
    at = home(model=str(tiny_model_dir), text_source="local path", text_path=str(path))
    shown = errors(at)
    assert any(all(w in e for w in words) for e in shown), shown
    assert all_files(plain_cache) == set()


def test_explorer_text_too_short_says_how_many_tokens_are_needed(tmp_path, plain_cache, tiny_model_dir):
    path = tmp_path / "short.txt"
    path.write_text("Only a few words. " * 10)
    at = home(model=str(tiny_model_dir), text_source="local path", text_path=str(path))
    at.switch_page("pages/layer_explorer.py").run()
    shown = errors(at)
    assert any("at least 320 are needed" in e for e in shown), shown  # 64-token windows: 5 * 64
    assert not at.get("plotly_chart")


# Network exposure ---------------------------------------------------------------------------------


def test_config_binds_localhost_and_sends_no_usage_statistics():
    config = tomllib.loads((REPO / ".streamlit" / "config.toml").read_text())
    assert config["server"]["address"] == "127.0.0.1"
    assert config["browser"]["gatherUsageStats"] is False


def _listening(port: int) -> set[str]:
    """Local addresses of sockets listening on ``port`` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, _, state = line.split()[1:4]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.add(address)
    return found


@pytest.mark.slow
@pytest.mark.parametrize("where", ["repo", "elsewhere"])
def test_server_listens_on_localhost_only_by_default(tmp_path, where):
    """``streamlit run app.py`` with no --server.address, started from the repository or from another
    folder (Streamlit also reads the .streamlit/config.toml beside the script): 127.0.0.1 only."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(REPO / "app.py"), "--server.headless=true",
         f"--server.port={port}", "--server.fileWatcherType=none"],
        cwd=REPO if where == "repo" else tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, "streamlit exited"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=1) as r:
                    if r.read().strip() == b"ok":
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "no answer within 60 s"
            time.sleep(0.1)
        addresses = _listening(port)
        assert addresses == {"0100007F"}, addresses  # 127.0.0.1 only: not 0.0.0.0, not ::
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# Two browser sessions at once -------------------------------------------------------------------


def _expected(embedded, layer: int) -> dict:
    """What the explorer shows for a layer on the app's small defaults (o_proj, ratio 0.2, rcpu)."""
    from rcpu import figures
    from rcpu.config import DataConfig, LayerConfig
    from rcpu.explorer import LayerExplorer

    data = DataConfig(calib_samples=4, seq_len=128, heldout_samples=2)
    report = LayerExplorer().explore(embedded, data, LayerConfig(layer, "o_proj", 0.2, "rcpu", "none"))
    overlap = figures.overlap_figure(report.analysis.selection, report.kept_set("wanda_sp"))
    return {"heldout": report.analysis.error_uncompensated["heldout"], "overlap_title": overlap.layout.title.text}


@pytest.mark.browser
@pytest.mark.slow
def test_two_browser_sessions_explore_different_layers_at_once(tmp_path, embedded, monkeypatch):
    playwright_api = pytest.importorskip("playwright.sync_api")
    from apphelp import SMALL_APP, launch_browser, live_server, wait_charts, wait_idle

    roots = []
    for name in ("server-cache", "test-cache"):  # the server computes its own statistics
        root = tmp_path / name
        root.mkdir()
        (REPO / "cache" / "models").mkdir(parents=True, exist_ok=True)
        os.symlink(REPO / "cache" / "models", root / "models")
        roots.append(root)
    layers = (3, 5)
    with monkeypatch.context() as m:
        m.setenv("RCPU_CACHE", str(roots[1]))
        expected = {layer: _expected(embedded, layer) for layer in layers}
    assert expected[3]["heldout"] != expected[5]["heldout"]

    def layer_input(page):
        return page.get_by_label("Layer", exact=True)

    def check(page, layer: int) -> None:
        page.get_by_text(re.compile(rf"^Layer {layer} o_proj: W is 576 × 576")).wait_for(timeout=180_000)
        wait_charts(page, 4)
        wait_idle(page)
        assert page.locator('[data-testid="stException"]').count() == 0
        assert not page.errors, page.errors
        metric = page.locator('[data-testid="stMetric"]').filter(has_text="Held-out error, pruned")
        shown = float(metric.locator('[data-testid="stMetricValue"]').inner_text())
        assert shown == pytest.approx(expected[layer]["heldout"], abs=1.5e-3), (layer, shown)
        titles = [t.text_content() for t in page.locator(".gtitle").all()]
        assert expected[layer]["overlap_title"] in titles, (layer, titles)
        assert int(layer_input(page).input_value()) == layer

    env = {**SMALL_APP, "OMP_NUM_THREADS": "1", "RCPU_CACHE": str(roots[0])}
    with live_server(env, timeout=120) as url, playwright_api.sync_playwright() as p:
        browser = launch_browser(p)
        try:
            pages = []
            for _ in range(2):  # two contexts: two independent browser sessions
                page = browser.new_context(viewport={"width": 1400, "height": 900}).new_page()
                page.errors = []
                page.on("pageerror", lambda exc, errors=page.errors: errors.append(str(exc)))
                pages.append(page)
            for page in pages:
                page.goto(f"{url}/layer_explorer")
            for page in pages:
                page.get_by_text(re.compile(r"^Layer 1 o_proj: W is")).wait_for(timeout=300_000)
                wait_idle(page, 300_000)
            for order in (layers, layers[::-1]):  # then swap: memoised results must not leak across
                for page, layer in zip(pages, order):  # both reruns start before either is awaited
                    box = layer_input(page)
                    box.fill(str(layer))
                    box.press("Enter")
                for page, layer in zip(pages, order):
                    check(page, layer)
        finally:
            browser.close()
