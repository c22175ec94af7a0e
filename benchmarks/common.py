"""What every benchmark shares: settings per mode, the model, machine facts, goals, JSON."""

from __future__ import annotations

import cProfile
import datetime as _dt
import io
import json
import math
import os
import platform
import pstats
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "benchmarks" / "results"
DOCS_PATH = REPO / "docs" / "benchmarks.md"

MODES = ("full", "quick", "tiny")

FULL_CONFIGS = (
    "wanda_sp:none", "fluctuation:bias", "rcpu:none", "rcpu:rotation", "rcpu:rotation_scale",
    "rcpu:ls", "rcpu:ridge", "wanda_sp:rotation",
    "rcpu:rotation_so", "rcpu:rotation_bias", "rcpu:rotation_diag",
    "wanda_sp:rotation_so", "wanda_sp:rotation_bias", "wanda_sp:rotation_diag",
)
CURVE_CONFIGS = ("rcpu:rotation", "rcpu:ls", "rcpu:ridge", "fluctuation:bias")
LARGE_SHAPE = {"hidden": 4096, "heads": 32, "kv_heads": 32, "head_dim": 128, "intermediate": 11008,
               "layers": 2, "vocab": 1024}  # LLaMA-7B layers; few of them and a small vocabulary


@dataclass(frozen=True)
class Settings:
    """Sizes of every benchmark for one mode; recorded in each result file."""

    mode: str = "full"
    model: str = "embedded"  # or "tiny": a random LLaMA with the embedded tokenizer
    seq_len: int = 512
    # floor
    floor_samples: int = 32
    floor_repeats: int = 2  # best of
    # explorer
    explorer_layer: int = 15
    explorer_repeats: int = 9  # median of, embedded shapes (each run ~0.3 s: cheap against this host's noise)
    large_repeats: int = 3  # median of, LLaMA-7B shapes
    large_shapes: dict = field(
        default_factory=lambda: {"down_proj": (4096, 11008, 1), "o_proj": (4096, 4096, 128)}
    )  # name -> (d_out, d_in, unit_size)
    large_rank: int = 256  # columns of B in the synthetic Gram diag + B B^T
    large_tokens: int = 1024  # sample tokens kept for pictures
    gemm_size: int = 2048  # square float matmul that measures the machine's rate
    # memory
    memory_samples: tuple[int, int] = (32, 128)
    # eval
    eval_windows: int = 16
    eval_repeats: int = 2  # best of, alternating
    # quality
    ratios: tuple[float, ...] = (0.1, 0.2, 0.3)
    configs: tuple[str, ...] = FULL_CONFIGS
    quality_eval_windows: int | None = None  # None: every held-out window
    curve_configs: tuple[str, ...] = CURVE_CONFIGS
    curve_samples: tuple[int, ...] = (8, 32, 128)
    curve_ratio: float = 0.2
    calib_samples: int = 32
    # size
    size_ratios: tuple[float, ...] = (0.1, 0.2, 0.3)
    size_calib: tuple[int, int] = (8, 256)  # embedded: calibration windows x tokens (wanda_sp:none)
    size_forward: tuple[int, int] = (8, 256)  # embedded: windows x tokens of one timed forward pass
    size_large: dict = field(default_factory=lambda: dict(LARGE_SHAPE))  # random weights, LLaMA-7B layers
    size_large_calib: tuple[int, int] = (2, 64)
    size_large_forward: tuple[int, int] = (4, 128)
    size_prompt: int = 16  # tokens before generation
    size_new_tokens: int = 32  # generated greedily per timed run
    size_repeats: int = 3  # best of, dense and pruned taking turns
    # appcost (at the app's defaults)
    app_repeats: int = 3  # turns of CLI then app, best of each (one turn alone follows the host's speed)

    def describe(self) -> dict:
        d = asdict(self)
        d["large_shapes"] = {k: list(v) for k, v in self.large_shapes.items()}
        return d


def settings_for(mode: str) -> Settings:
    if mode == "full":
        return Settings()
    if mode == "quick":
        return Settings(
            mode="quick", floor_samples=16, floor_repeats=1, explorer_repeats=7, large_repeats=1,
            large_shapes={"down_proj": (4096, 11008, 1)}, memory_samples=(8, 32), eval_windows=8,
            eval_repeats=1, ratios=(0.2,), configs=("wanda_sp:none", "fluctuation:bias", "rcpu:rotation"),
            quality_eval_windows=4, curve_configs=("rcpu:rotation", "rcpu:ls"), curve_samples=(8, 32),
            size_calib=(4, 128), size_forward=(4, 128), size_large={**LARGE_SHAPE, "layers": 1},
            size_large_forward=(2, 128), size_repeats=2, app_repeats=1,
        )
    if mode == "tiny":
        return Settings(
            mode="tiny", model="tiny", seq_len=32, floor_samples=4, floor_repeats=1,
            explorer_layer=1, explorer_repeats=2, large_repeats=1,
            large_shapes={"down_proj": (64, 176, 1), "o_proj": (64, 64, 16)}, large_rank=16,
            large_tokens=64, gemm_size=128, memory_samples=(2, 4), eval_windows=2, eval_repeats=1,
            ratios=(0.2,), configs=("wanda_sp:none", "rcpu:rotation"), quality_eval_windows=2,
            curve_configs=("rcpu:rotation", "rcpu:ls"), curve_samples=(2, 4), calib_samples=4,
            size_calib=(2, 32), size_forward=(2, 16), size_large_calib=(2, 16), size_large_forward=(2, 16),
            size_large={"hidden": 64, "heads": 8, "kv_heads": 8, "head_dim": 8, "intermediate": 176, "layers": 1,
                        "vocab": 128},
            size_prompt=4, size_new_tokens=4, size_repeats=1, app_repeats=1,
        )
    raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")


# Model ---------------------------------------------------------------------------------

TINY_SHAPE = {"heads": 6, "kv_heads": 2, "layers": 2, "hidden": 48, "intermediate": 64}


def load_lm(settings: Settings):
    """The embedded model, or a seeded tiny random LLaMA with the embedded tokenizer."""
    from rcpu.models import load_model

    if settings.model == "embedded":
        return load_model("embedded")
    return tiny_lm()


def tiny_lm(seed: int = 0):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from rcpu.adapters import adapter_for
    from rcpu.models import LoadedModel, resolve_model

    folder, _, _ = resolve_model("embedded")  # the converted copy; only its tokenizer is read
    tokenizer = AutoTokenizer.from_pretrained(folder)
    s = TINY_SHAPE
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=s["hidden"], intermediate_size=s["intermediate"],
        num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
        head_dim=s["hidden"] // s["heads"], max_position_embeddings=512, tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).eval()
    model.requires_grad_(False)
    return LoadedModel(model, tokenizer, adapter_for(model), "tiny", f"tiny-{seed}-{len(tokenizer)}")


def data_config(settings: Settings, calib_samples: int | None = None, heldout_samples: int = 0):
    from rcpu.config import DataConfig

    return DataConfig(
        model=settings.model, calib_samples=calib_samples or settings.calib_samples,
        seq_len=settings.seq_len, heldout_samples=heldout_samples,
    )


# Machine -------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict:
    import transformers

    try:
        nproc = len(os.sched_getaffinity(0))
    except AttributeError:
        nproc = os.cpu_count() or 0
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gb = None
    return {
        "nproc": nproc,
        "cpu": cpu_model(),
        "memory_gb": round(mem_gb, 1) if mem_gb else None,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


# Goals and results -----------------------------------------------------------------------


def goal(name: str, value: float | None, op: str, target: float, unit: str = "") -> dict:
    """One goal check: ``value op target`` with op one of '<=', '<', '>=', '>', '=='."""
    checks: dict[str, Callable[[float, float], bool]] = {
        "<=": lambda a, b: a <= b, "<": lambda a, b: a < b, ">=": lambda a, b: a >= b, ">": lambda a, b: a > b,
        "==": lambda a, b: a == b,
    }
    met = None if value is None else bool(checks[op](value, target))
    return {"name": name, "value": value, "op": op, "target": target, "unit": unit, "met": met}


def format_goal(g: dict) -> str:
    verdict = {True: "MET", False: "MISSED", None: "not measured"}[g["met"]]
    value = "n/a" if g["value"] is None else f"{g['value']:.3g}{g['unit']}"
    return f"{g['name']}: {value} (goal {g['op']} {g['target']:g}{g['unit']}): {verdict}"


def write_result(out_dir: Path, name: str, settings: Settings, payload: dict, started: float) -> dict:
    result = {
        "benchmark": name,
        "mode": settings.mode,
        "date": now(),
        "wall_s": round(time.perf_counter() - started, 2),
        "machine": machine(),
        "settings": settings.describe(),
        **payload,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(_jsonable(result), indent=1, sort_keys=False) + "\n")
    return result


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return value


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def run_fresh(module_args: list[str], env: dict | None = None) -> str:
    """``python -m <module_args>`` in a fresh process from the repository root; its stdout.

    Streamlit runs a page in a thread of its own, and such a thread's LAPACK calls are slower in a process
    whose main thread has already run torch's OpenMP work (``benchmarks.appcost.thread_check`` measures
    it): a page is timed in a process of its own, as the app's server runs it.
    """
    import subprocess
    import sys

    cmd = [sys.executable, "-m", *module_args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, **(env or {})},
                          check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return proc.stdout


def last_json_line(stdout: str) -> Any:
    return json.loads(stdout.strip().splitlines()[-1])


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def say(message: str) -> None:
    print(message, flush=True)


class Profiler:
    """Optional cProfile around a benchmark's timed work; top functions by cumulative time."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.profile = cProfile.Profile() if enabled else None

    def __enter__(self):
        if self.profile:
            self.profile.enable()
        return self

    def __exit__(self, *exc):
        if self.profile:
            self.profile.disable()

    def top(self, limit: int = 25) -> list[dict] | None:
        if not self.profile:
            return None
        stats = pstats.Stats(self.profile, stream=io.StringIO())
        rows = []
        for (file, line, func), (_, ncalls, tottime, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]
            rows.append({"function": f"{Path(file).name}:{line}({func})", "calls": ncalls,
                         "tottime_s": round(tottime, 3), "cumtime_s": round(cumtime, 3)})
        rows.sort(key=lambda r: r["tottime_s"], reverse=True)
        return rows[:limit]
