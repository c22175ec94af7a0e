"""Peak resident memory of a whole-model prune with a small and a large calibration set.

Each prune runs in a fresh subprocess (``python -m benchmarks memory-worker``) that
reports its peak RSS (``VmHWM``). Statistics are streamed, so the
growth from the small to the large set should be no more than the hidden-state buffer
the extra samples need: ``extra_samples * seq_len * hidden * 4 bytes * FLOW_BUFFERS``.

The workers run with glibc's mmap threshold fixed at 64 KiB (``ALLOCATOR_ENV``): every buffer
above it is its own mapping, returned to the system when freed, so the peak RSS is the peak of
memory in use. With glibc's default the threshold rises with each large buffer freed, freed
buffers stay in the heap, and the difference of two peaks measured how the allocator reused
~1.5 GB of transient buffers (4.41 and -2.14 times the expected growth in two runs), not what
the prune holds.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from .common import REPO, Settings, data_config, format_goal, goal, say, write_result

# LayerFlow keeps one hidden-state tensor per batch (outputs replace inputs) and, while a layer is pruned,
# its o_proj input (the kept heads' attention output, reused by the pruned run; hidden-sized in LLaMA).
FLOW_BUFFERS = 2
TOLERANCE = 1.10  # allocator slack on top of the expected buffer
MB = 2**20
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def _maxrss_bytes() -> int:
    """Peak RSS of this process's own address space (VmHWM).

    Not ``getrusage().ru_maxrss``: Linux carries that across fork and exec, so a worker
    started by a parent that once held gigabytes (the 7B explorer shapes) would report
    the parent's peak.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def worker(mode: str, samples: int) -> dict:
    """Runs in the subprocess: load, prepare tokens, prune; peak RSS at each step."""
    from rcpu.calibration import prepare_tokens
    from rcpu.config import PruneConfig
    from rcpu.prune import prune_model

    from .common import load_lm, settings_for

    settings = settings_for(mode)
    lm = load_lm(settings)
    data = data_config(settings, calib_samples=samples, heldout_samples=0)
    tokens = prepare_tokens(lm, data.data, data.sampling)
    before = {"maxrss": _maxrss_bytes(), "rss": _rss_bytes()}
    start = time.perf_counter()
    result = prune_model(lm, data, PruneConfig(0.2, "both", "rcpu", "rotation"), tokens=tokens)
    return {
        "samples": samples,
        "seq_len": settings.seq_len,
        "hidden": lm.adapter.hidden_size,
        "layers": lm.adapter.num_layers,
        "maxrss_before_prune": before["maxrss"],
        "rss_before_prune": before["rss"],
        "maxrss": _maxrss_bytes(),
        "prune_s": time.perf_counter() - start,
        "timing_s": result.timing_s,
    }


def _spawn(mode: str, samples: int) -> dict:
    cmd = [sys.executable, "-m", "benchmarks", "memory-worker", "--mode", mode, "--samples", str(samples)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, **ALLOCATOR_ENV},
                          check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory worker ({samples} samples) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(lm, settings: Settings, out_dir: Path, started: float, profile: bool = False) -> dict:
    small_n, large_n = settings.memory_samples
    runs = {}
    for n in (small_n, large_n):
        runs[n] = _spawn(settings.mode, n)
        say(f"memory: {n} x {settings.seq_len} tokens: peak RSS {runs[n]['maxrss'] / MB:.0f} MiB "
            f"(before prune {runs[n]['maxrss_before_prune'] / MB:.0f} MiB), prune {runs[n]['prune_s']:.1f} s")
    hidden = runs[large_n]["hidden"]
    buffer = (large_n - small_n) * settings.seq_len * hidden * 4
    expected = buffer * FLOW_BUFFERS
    measured = runs[large_n]["maxrss"] - runs[small_n]["maxrss"]
    growth_over_expected = measured / expected if expected else None
    g = goal("peak RSS growth / expected buffer", growth_over_expected, "<=", TOLERANCE)
    say(f"  growth {measured / MB:.1f} MiB, expected {expected / MB:.1f} MiB "
        f"({large_n - small_n} samples x {settings.seq_len} x {hidden} x 4 B x {FLOW_BUFFERS} buffer)")
    say("  " + format_goal(g))
    return write_result(out_dir, "memory", settings, {
        "samples": [small_n, large_n],
        "runs": {str(n): r for n, r in runs.items()},
        "flow_buffers": FLOW_BUFFERS,
        "expected_growth_bytes": expected,
        "measured_growth_bytes": measured,
        "goals": [g],
    }, started)
