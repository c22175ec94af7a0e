"""The app in a real headless Chromium against a live ``streamlit run`` server.

Needs Debian's Chromium at /usr/bin/chromium (``./dev test`` installs it as root);
without it these tests fail with a message saying so. Screenshots of every page
go to test-artifacts/browser/.
"""

from __future__ import annotations

import pytest
from apphelp import (
    PAGES,
    REPO,
    SMALL_APP,
    full_screenshot,
    launch_browser,
    live_server,
    tiny_model_dir,
    wait_charts,
    wait_idle,
)

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ARTIFACTS = REPO / "test-artifacts" / "browser"
CHARTS = {"": 0, "learn": 3, "layer_explorer": 4, "whole_model": 1, "perplexity": 1}


@pytest.fixture(scope="module")
def server():
    (REPO / "test-artifacts").mkdir(exist_ok=True)
    with live_server({**SMALL_APP, "OMP_NUM_THREADS": "1"}) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    playwright_api = pytest.importorskip("playwright.sync_api")
    with playwright_api.sync_playwright() as p:
        try:
            chromium = launch_browser(p)
        except RuntimeError as exc:
            pytest.fail(str(exc), pytrace=False)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    tab.errors = errors
    yield tab
    context.close()


def no_exceptions(page) -> None:
    boxes = page.locator('[data-testid="stException"]')
    assert boxes.count() == 0, boxes.first.inner_text()
    assert not page.errors, page.errors


@pytest.mark.parametrize("path", list(PAGES), ids=lambda p: p or "home")
def test_every_page_renders(server, page, path):
    page.goto(f"{server}/{path}")
    page.get_by_role("heading", name=PAGES[path]).first.wait_for(timeout=120_000)
    if CHARTS[path]:
        wait_charts(page, CHARTS[path])
    else:
        page.get_by_text("Loaded model").wait_for(timeout=120_000)
    wait_idle(page)
    no_exceptions(page)
    full_screenshot(page, ARTIFACTS / f"{path or 'home'}.png")


def test_sidebar_navigation_and_slider(server, page):
    page.goto(server)
    page.get_by_text("Loaded model").wait_for(timeout=120_000)
    page.get_by_test_id("stSidebarNavLink").filter(has_text="Layer explorer").click()
    wait_charts(page, 4)
    wait_idle(page)
    title = page.locator(".gtitle").filter(has_text="Score and variance per input dimension")
    assert "2 / 9 heads = 22% pruned" in title.first.text_content()
    metric = page.get_by_test_id("stMetric").filter(has_text="Pruned heads (effective ratio)")
    assert "2 / 9 = 22%" in metric.first.inner_text()
    slider = page.locator('[data-testid="stSlider"] input[type="range"]').first
    slider.focus()
    for _ in range(2):
        page.keyboard.press("ArrowRight")
    page.locator('[data-testid="stSliderThumbValue"]').filter(has_text="0.30").wait_for()
    page.locator(".gtitle").filter(has_text="3 / 9 heads = 33% pruned").first.wait_for(timeout=60_000)
    wait_idle(page)
    no_exceptions(page)


def test_whole_model_run_on_a_tiny_model(server, page, tmp_path_factory):
    folder = tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")
    page.goto(f"{server}/whole_model")
    wait_charts(page, 1)
    wait_idle(page)
    model = page.get_by_label("Model", exact=True)
    model.fill(str(folder))
    model.press("Enter")
    wait_idle(page)
    page.get_by_role("button", name="Prune the model").click()
    page.get_by_text("Perplexity after").wait_for(timeout=120_000)
    wait_idle(page)
    no_exceptions(page)
    # the rest of the page follows the metric; on a loaded machine it may take a moment to arrive
    page.get_by_role("button", name="Pruned model (zip,").wait_for(timeout=60_000)
    page.get_by_text("What was removed").wait_for(timeout=60_000)
    assert page.get_by_role("button", name="Pruned model (zip,").count() == 1
    assert page.get_by_text("What was removed").count() == 1
    full_screenshot(page, ARTIFACTS / "whole_model-run.png")
