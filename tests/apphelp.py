"""Helpers for the app tests: a tiny model folder, a live server, a headless Chromium.

Also a small command that makes the README / docs screenshots from a live app on
the real defaults (add ``--whole-model`` to also prune the embedded model, minutes):

    .venv/bin/python tests/apphelp.py screenshots docs/img [--whole-model]

and PNGs of the standalone figures ``rcpu reproduce`` writes (``docs/img/paper-EXPERIMENT.png``):

    .venv/bin/python tests/apphelp.py figures docs/img docs/paper/*.html
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SMALL_APP = {"RCPU_APP_CALIB_SAMPLES": "4", "RCPU_APP_SEQ_LEN": "128", "RCPU_APP_HELDOUT_SAMPLES": "2",
             "RCPU_APP_LAYER": "1", "RCPU_APP_EVAL_WINDOWS": "2"}
PAGES = {  # url path -> a title on the page
    "": "RCPU Explorer",
    "learn": "Learn: pruning and rotation in a picture",
    "layer_explorer": "Layer explorer",
    "whole_model": "Whole model",
    "perplexity": "Perplexity vs ratio",
}


def tiny_model_dir(folder: Path) -> Path:
    """A 2-layer random LLaMA with the embedded model's tokenizer: prunes in about a second."""
    from conftest import make_tiny_llama
    from transformers import AutoTokenizer

    from rcpu.models import resolve_model

    if (folder / "config.json").exists():
        return folder
    source, _, _ = resolve_model("embedded")
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = make_tiny_llama(vocab=len(tokenizer), layers=2, heads=4, kv_heads=2, hidden=32, intermediate=48)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def live_server(env: dict | None = None, timeout: float = 60.0) -> Iterator[str]:
    """``streamlit run app.py`` on a free localhost port; yields its URL."""
    port = free_port()
    cmd = [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless=true",
           f"--server.port={port}", "--server.address=127.0.0.1", "--browser.gatherUsageStats=false",
           "--server.fileWatcherType=none"]
    artifacts = REPO / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    with open(artifacts / "server.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **(env or {})}, stdout=log,
                                stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_healthy(proc, url, timeout)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_healthy(proc: subprocess.Popen, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with status {proc.returncode} before answering "
                               "(see test-artifacts/server.log)")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=1) as r:
                if r.read().decode().strip() == "ok":
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"streamlit did not answer on {url} within {timeout:.0f} s")
        time.sleep(0.1)


def launch_browser(playwright):
    if not CHROMIUM.exists():
        raise RuntimeError(
            f"{CHROMIUM} is missing: install Debian's Chromium with `apt-get update && apt-get install -y "
            "chromium` (./dev test does this as root); never `playwright install`"
        )
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)


def wait_idle(page, timeout_ms: int = 120_000) -> None:
    """Wait until the script run has finished and no spinner is left.

    The app root says whether a script run is going on (``data-test-script-state``);
    this Streamlit has no status-widget element to wait for.
    """
    page.wait_for_timeout(300)
    page.wait_for_function(
        """() => document.querySelector('[data-testid="stApp"]')?.getAttribute('data-test-script-state')
                 !== 'running' && !document.querySelector('[data-testid="stSpinner"]')""",
        timeout=timeout_ms,
    )


def wait_charts(page, count: int = 1, timeout_ms: int = 120_000) -> None:
    page.wait_for_function(
        f"() => document.querySelectorAll('[data-testid=\"stPlotlyChart\"] .main-svg').length >= {count}",
        timeout=timeout_ms,
    )


def full_screenshot(page, path: Path, width: int = 1400, max_height: int = 12000) -> None:
    """The whole page: the app scrolls inside stMain, so grow the viewport to its height first."""
    height = page.evaluate(
        "() => { const m = document.querySelector('[data-testid=\"stMain\"]'); return m ? m.scrollHeight : 1000; }"
    )
    page.set_viewport_size({"width": width, "height": max(800, min(int(height) + 40, max_height))})
    page.wait_for_timeout(800)
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path))


def optimise_png(path: Path) -> None:
    """Palette PNG (256 colours, octree keeps small distinct colours, no dithering): ~3x smaller."""
    from PIL import Image

    with Image.open(path) as im:
        small = im.convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    small.save(path, optimize=True)


def _screenshots(out: Path, whole_model: bool = False) -> None:
    """Docs screenshots on the real defaults (the explorer's default layer statistics should be cached).

    With ``whole_model`` it also prunes the embedded model on the default settings (minutes).
    """
    from playwright.sync_api import sync_playwright

    width = 1200
    with live_server(timeout=120) as url, sync_playwright() as p:
        browser = launch_browser(p)
        page = browser.new_page(viewport={"width": width, "height": 900}, device_scale_factor=1)

        def shot(name: str, max_height: int = 1700) -> None:
            wait_idle(page, 900_000)
            full_screenshot(page, out / f"{name}.png", width=width, max_height=max_height)
            optimise_png(out / f"{name}.png")
            print("wrote", out / f"{name}.png")
            page.set_viewport_size({"width": width, "height": 900})

        page.goto(url)
        page.get_by_text("Loaded model").wait_for(timeout=600_000)
        shot("home", 1000)
        page.goto(f"{url}/learn")
        wait_charts(page, 3, timeout_ms=600_000)
        shot("learn", 1350)
        page.goto(f"{url}/layer_explorer")
        wait_charts(page, 4, timeout_ms=900_000)
        shot("layer-explorer", 1500)
        page.get_by_text("📉 Error").click()
        page.locator(".gtitle").filter(has_text="Relative output error").first.wait_for(timeout=600_000)
        shot("layer-explorer-error", 1300)
        page.get_by_text("🧭 Principal directions").click()
        page.locator(".gtitle").filter(has_text="Alignment with Y's top").first.wait_for(timeout=600_000)
        shot("layer-explorer-directions", 1500)
        page.get_by_text("📐 Geometry").click()
        page.locator(".gtitle").filter(has_text="Per-token geometry").first.wait_for(timeout=600_000)
        shot("layer-explorer-geometry", 1300)
        page.goto(f"{url}/perplexity")
        wait_charts(page, 1, timeout_ms=600_000)
        shot("perplexity", 1100)
        if whole_model:
            page.goto(f"{url}/whole_model")
            wait_charts(page, 1, timeout_ms=600_000)
            wait_idle(page)
            page.get_by_role("button", name="Prune the model").click()
            page.get_by_text("Perplexity after").wait_for(timeout=3_600_000)
            shot("whole-model", 1300)
        browser.close()


def figure_pictures(htmls: list[Path], out: Path, width: int = 1300) -> None:
    """PNGs of standalone Plotly HTML figures (``rcpu reproduce`` writes them), drawn by headless Chromium:
    the docs' pictures of the paper's experiments where no static Plotly renderer is installed."""
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = launch_browser(p)
        page = browser.new_page(viewport={"width": width, "height": 600})
        for html in htmls:
            page.goto(html.resolve().as_uri())
            page.wait_for_selector(".main-svg", timeout=60_000)
            page.wait_for_timeout(500)
            target = out / f"paper-{html.stem}.png"
            page.locator(".plotly-graph-div").first.screenshot(path=str(target))
            optimise_png(target)
            print(target)
        browser.close()


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "screenshots":
        sys.path.insert(0, str(REPO))
        _screenshots(Path(sys.argv[2]), whole_model="--whole-model" in sys.argv[3:])
    elif len(sys.argv) >= 4 and sys.argv[1] == "figures":  # figures OUT_DIR A.html [B.html ...]
        figure_pictures([Path(a) for a in sys.argv[3:]], Path(sys.argv[2]))
    else:
        print(__doc__)
        sys.exit(2)
