"""Progress text for long runs: which step, which layer, and about how long is left.

No Streamlit here (the pages show the text; tests call it directly). ``StageText`` turns the
``(stage, done, total, what)`` calls of ``prune_and_evaluate`` (``StageProgress``) into a
fraction and one line such as ``"Pruning: layer 4 of 30 · about 2 min left"``; the estimate is
the time per step so far in this stage times the steps left.
"""

from __future__ import annotations

import time
from collections.abc import Callable


def duration_text(seconds: float) -> str:
    """``"45 s"``, ``"3 min"``, ``"1 h 05 min"``."""
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours} h {rest // 60:02d} min"


class StageText:
    """``(fraction, text)`` for each progress call, with an estimate of the time left in the stage."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self.starts: dict[str, tuple[float, int]] = {}

    def left(self, stage: str, done: int, total: int) -> float | None:
        """Seconds left in ``stage`` at the pace so far (``None`` before there is a pace)."""
        now = self.clock()
        start, first = self.starts.setdefault(stage, (now, done))
        steps = done - first
        if steps <= 0 or done >= total:
            return None
        return (now - start) / steps * (total - done)

    def __call__(self, stage: str, done: int, total: int, what: str = "") -> tuple[float, str]:
        if stage == "prune" and what.startswith("allocation"):
            # The greedy allocation's passes over the layers (its costs, then a trial prune per spread) come
            # before the prune itself: each is a step of its own, with its own estimate.
            step = what.rpartition(": ")[0] or what
            left = self.left(step, done, total)
            text = f"{step[0].upper()}{step[1:]}: layer {min(done + 1, total)} of {total}"
            if left is not None:
                text += f" · about {duration_text(left)} left"
            return min(done / max(total, 1), 1.0), text
        left = self.left(stage, done, total)
        if stage == "prune":
            text = (f"Pruning: layer {done + 1} of {total}" if done < total
                    else f"Pruning: all {total} layers done")
        elif stage == "dense":
            text = (f"Perplexity of the dense model (computed once, then cached for every run): "
                    f"{done} of {total} windows")
        else:
            text = f"Perplexity of the pruned model: {done} of {total} windows"
        if left is not None:
            text += f" · about {duration_text(left)} left"
        return min(done / max(total, 1), 1.0), text


class Every:
    """Says yes at most once per ``seconds`` (the first call, and any ``last`` one, always): paces the
    redraws of a live chart, so that drawing it in the browser does not slow down the run it shows."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.perf_counter):
        self.seconds = seconds
        self.clock = clock
        self.previous: float | None = None

    def __call__(self, last: bool = False) -> bool:
        now = self.clock()
        if last or self.previous is None or now - self.previous >= self.seconds:
            self.previous = now
            return True
        return False
