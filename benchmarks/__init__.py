"""Benchmarks: speed, memory and quality goals, measured as ratios within one run.

``python -m benchmarks all --quick`` runs every benchmark, writes one JSON file per
benchmark to ``benchmarks/results/`` and regenerates ``docs/benchmarks.md`` (with
SVG plots in ``docs/img/``) from those files. Individual benchmarks:

- ``floor``: whole-model prune time against one plain forward pass (same tokens)
- ``explorer``: one sublayer's compensation + diagnostics, embedded and LLaMA-7B shapes
- ``memory``: peak RSS of whole-model prunes with a small and a large calibration set
- ``eval``: ``rcpu.evaluate.perplexity`` throughput against a plain transformers loop
- ``quality``: the perplexity table and calibration-size curve (cached sweep points)
- ``auto``: ``--method auto`` and ``--allocation greedy`` against every fixed compensation
- ``size``: parameters, size on disk, KV cache and tokens/s, dense against pruned (embedded and 7B layer shapes)
- ``appcost``: the app's whole-model prune at its defaults against ``rcpu prune`` on the same settings

Modes: full (default), ``--quick`` (under 10 minutes on 2 cores), and ``--tiny``
(a tiny random LLaMA and small shapes, only to keep this code from rotting).
"""

BENCHMARKS = ("floor", "explorer", "memory", "eval", "quality", "size", "auto", "appcost")
