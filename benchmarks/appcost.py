"""The app's whole-model prune against the CLI's, at the app's defaults, in one run.

The issue's goal: the whole-model page, at its defaults, costs no more than ``rcpu prune`` plus its
evaluation. Both call ``rcpu.pipeline.prune_and_evaluate`` with the same settings; the page also draws
a live chart of the errors per layer (at most every ``LIVE_CHART_EVERY_S``), its progress text, saves
the run as a sweep point and draws its results.

Timed, in turns (CLI first): ``rcpu prune --json`` in a fresh process by its own clock (``timing_s.total``:
the prune and its evaluation, after the model is loaded), and the page as a user runs it: served by
``streamlit run`` and driven by headless Chromium, from pressing its button to an idle page showing the
result, the browser drawing on the same cores (its CPU seconds are recorded); and, the page open and
idle, ``rcpu prune`` again beside it, the floor a browser on the same machine sets. Tiny mode, whose model is
only in a folder, runs the page under Streamlit's ``AppTest`` in a fresh process instead (``app_worker``).
Fresh processes matter (``common.run_fresh``): ``rcpu prune`` in this process would slow a page's thread
down; ``thread_check`` measures by how much. The dense perplexity is computed and cached before either.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

from .common import REPO, Settings, format_goal, goal, last_json_line, run_fresh, say, write_result

GOAL_RATIO = 1.0
APP_ENV = ("RCPU_APP_CALIB_SAMPLES", "RCPU_APP_SEQ_LEN", "RCPU_APP_HELDOUT_SAMPLES")


def app_worker(model: str) -> dict:
    """Runs in the subprocess: open the whole-model page, press its button; seconds of that run and of the
    prune and evaluation within it (the report's own clock)."""
    from streamlit.testing.v1 import AppTest

    from .page import _check

    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=3600).run()
    if model != "embedded":
        at.sidebar.text_input(key="model").set_value(model).run()
    at.switch_page("pages/whole_model.py").run()
    _check(at, "opening the whole-model page")
    start = time.perf_counter()
    at.button(key="run_prune").click().run()
    seconds = time.perf_counter() - start
    _check(at, "the prune")
    if "whole_model_run" not in at.session_state:
        raise RuntimeError("the whole-model page finished without a result")
    timing = at.session_state["whole_model_run"]["report"].to_json()["timing_s"]
    return {"app_s": seconds, "how": "AppTest", "app_pipeline_s": timing["total"], "app_timing_s": timing}


def svd_seconds(where: str, n: int = 576, repeats: int = 9) -> dict:
    """Runs in a subprocess: median seconds of a float64 SVD of n x n in a new thread, after the main thread
    ran the same SVDs (``"thread after main"``) or with the main thread idle (``"thread only"``)."""
    import statistics
    import threading

    import torch

    a = torch.randn(n, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def timed() -> float:
        torch.linalg.svd(a)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            torch.linalg.svd(a)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    out = {}
    if where == "thread after main":
        out["main_s"] = timed()
    thread = threading.Thread(target=lambda: out.__setitem__("thread_s", timed()))
    thread.start()
    thread.join()
    return out


def thread_check() -> dict:
    """The SVD of ``svd_seconds`` in a page's thread with and without torch work on the main thread first."""
    runs = {where: last_json_line(run_fresh(["benchmarks.appcost", "--svd", where]))
            for where in ("thread only", "thread after main")}
    return {"svd_n": 576, "thread_only_s": runs["thread only"]["thread_s"],
            "main_s": runs["thread after main"]["main_s"], "thread_after_main_s": runs["thread after main"]["thread_s"]}


def _cpu_seconds(command_part: str) -> float:
    """User + system CPU seconds of every process whose command line contains ``command_part`` (Linux)."""
    total = 0.0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if command_part not in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="ignore"):
                continue
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _browser_prune(env: dict, data, out: Path) -> dict:
    """The whole-model page served by ``streamlit run`` and driven by headless Chromium, as a user runs it:
    seconds from pressing its button to an idle page showing the result (the browser draws on the same
    cores). Before that, with the page open and idle, ``rcpu prune`` once more: the CLI on a machine that
    carries the browser and the server too, the floor the page's run is compared with."""
    from .page import browser_missing, served_page, wait_run

    missing = browser_missing()
    if missing:
        return {"skipped": missing}
    from apphelp import wait_idle

    with served_page(env, "whole_model") as page:
        wait_idle(page, 900_000)  # the model loads on the first visit
        button = page.get_by_role("button", name="Prune the model")
        before = _cpu_seconds("chromium")
        cli_beside = _cli_prune(data, out)["timing_s"]["total"]
        idle_cpu = _cpu_seconds("chromium") - before
        before = _cpu_seconds("chromium")
        start = time.perf_counter()
        button.click()
        wait_run(page, 3_600_000, polling_ms=50)
        seconds = time.perf_counter() - start
        browser_cpu = _cpu_seconds("chromium") - before
        shown = page.get_by_text("Perplexity after").count() > 0
        failed = page.locator('[data-testid="stException"]').count() + page.locator('[data-testid="stAlert"]').filter(
            has_text="Unexpected error").count()
    if failed or not shown:
        raise RuntimeError("the whole-model page did not show a result in the browser")
    return {"app_s": seconds, "how": "browser", "browser_cpu_s": browser_cpu, "cli_beside_browser_s": cli_beside,
            "browser_idle_cpu_s": idle_cpu}


def _cli_prune(data, out: Path) -> dict:
    """``rcpu prune`` on ``data``'s calibration settings in a fresh process; its JSON report."""
    out.unlink(missing_ok=True)
    run_fresh(["rcpu", "prune", "--model", data.model, "--calib-samples", str(data.calib_samples), "--seq-len",
               str(data.seq_len), "--heldout-samples", str(data.heldout_samples), "--json", str(out)])
    return json.loads(out.read_text())


def _app_env(data) -> dict:
    """The app's environment overrides that make its defaults ``data``'s calibration sizes."""
    return dict(zip(APP_ENV, (str(data.calib_samples), str(data.seq_len), str(data.heldout_samples)), strict=True))


def _app_prune(env: dict, data) -> dict:
    return last_json_line(run_fresh(["benchmarks.appcost", data.model], env))  # app_worker


def run(lm, settings: Settings, out_dir: Path, started: float, profile: bool = False) -> dict:
    from dataclasses import replace

    from rcpu.config import DataConfig, EvalConfig, PruneConfig
    from rcpu.models import load_model
    from rcpu.pipeline import dense_perplexity

    # The app's defaults are the library's (``ui.defaults``); tiny mode shrinks them as the app's tests do
    data = DataConfig() if lm.name == "embedded" else DataConfig(
        calib_samples=settings.calib_samples, seq_len=settings.seq_len, heldout_samples=2)
    cfg = PruneConfig()
    env = _app_env(data)
    runs = []
    with tempfile.TemporaryDirectory(prefix="rcpu-appcost-") as tmp:
        if lm.name != "embedded":  # a model only in memory (tiny mode): both load it from a folder
            folder = Path(tmp) / "model"
            lm.model.save_pretrained(folder)
            lm.tokenizer.save_pretrained(folder)
            data = replace(data, model=str(folder))
            lm = load_model(data.model)
        say(f"app cost: calibration {data.calib_samples} x {data.seq_len}, held-out {data.heldout_samples}, "
            f"{cfg.label} at ratio {cfg.ratio:g}, {settings.app_repeats} turn(s)")
        dense_perplexity(lm, data, EvalConfig().against(data))  # cached: neither run pays it
        for turn in range(settings.app_repeats):
            report = _cli_prune(data, Path(tmp) / "prune.json")
            # The app as a user runs it: served, in a browser (the embedded model; a tiny one is only in a folder
            # the sidebar would have to name, so tiny mode runs the page under AppTest instead)
            app = _browser_prune(env, data, Path(tmp) / "beside.json") if lm.name == "embedded" else {
                "skipped": "tiny model"}
            if "skipped" in app:
                app = {**_app_prune(env, data), "browser_skipped": app["skipped"]}
            runs.append({"cli_s": report["timing_s"]["total"], "cli_timing_s": report["timing_s"], **app})
            beside = (f"; with the page open and idle in the browser: CLI {app['cli_beside_browser_s']:.1f} s, the "
                      f"browser {app['browser_idle_cpu_s']:.1f} CPU s; the page's run: the browser "
                      f"{app['browser_cpu_s']:.1f} CPU s" if "browser_cpu_s" in app else "")
            say(f"  turn {turn + 1}: CLI prune + evaluation {runs[-1]['cli_s']:.1f} s; app ({app['how']}) "
                f"{app['app_s']:.1f} s{beside}")
    threads = thread_check()
    say(f"  SVD {threads['svd_n']}x{threads['svd_n']} float64 in a new thread: {threads['thread_only_s']:.3f} s with "
        f"the main thread idle, {threads['thread_after_main_s']:.3f} s after the main thread ran it "
        f"({threads['main_s']:.3f} s there)")
    cli_best, app_best = min(r["cli_s"] for r in runs), min(r["app_s"] for r in runs)
    how = "served, in headless Chromium" if runs[0]["how"] == "browser" else runs[0]["how"]
    goals = [goal(f"app whole-model prune at its defaults ({how}) / CLI prune + evaluation", app_best / cli_best,
                  "<=", GOAL_RATIO)]
    if how.startswith("served"):
        # A page needs a browser, and on a 2-core machine its drawing (and the server) share the cores with
        # the run: the floor is the CLI's run beside the same open, idle page.
        beside = min(r["cli_beside_browser_s"] for r in runs)
        goals.append(goal("app in the browser / CLI prune + evaluation beside the same page, open and idle "
                          "(the floor a browser on this machine sets)", app_best / beside, "<=", GOAL_RATIO))
    for g in goals:
        say("  " + format_goal(g))
    return write_result(out_dir, "appcost", settings, {
        "calibration": [data.calib_samples, data.seq_len], "heldout_samples": data.heldout_samples,
        "config": cfg.label, "ratio": cfg.ratio, "eval_tokens": report.get("eval_tokens"),
        "runs": runs, "thread_check": threads, "cli_best_s": cli_best, "app_best_s": app_best,
        "goals": goals,
    }, started)


if __name__ == "__main__":  # the app's side, or the thread check, in a fresh process (see the docstring)
    print(json.dumps(svd_seconds(sys.argv[2]) if sys.argv[1] == "--svd" else app_worker(sys.argv[1])))
