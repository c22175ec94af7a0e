"""Layer streaming at LLaMA-7B layer shapes: a model whose float32 weights exceed the memory the run may use.

``python -m benchmarks.stream [--layers 4] [--budget-gb 2.4] [--targets attn] [--keep]``

Writes a random-weight LLaMA (hidden 4096, 32 heads, 32 KV heads, intermediate 11008, vocabulary
1024) with ``--layers`` layers to a temporary folder (one safetensors file per layer), then runs
``rcpu.stream.stream_prune`` in a fresh process whose data segment is capped at its size after
imports plus ``--budget-gb`` (below the model's weights), and records its peak RSS. The folders are
deleted afterwards (disk is limited) unless ``--keep``. Result: ``benchmarks/results/stream.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from .common import LARGE_SHAPE, REPO, RESULTS_DIR, machine, now, say


def write_model(folder: Path, layers: int) -> float:
    """A random LLaMA with 7B layer shapes, written layer by layer (never whole in memory); GiB on disk."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    s = LARGE_SHAPE
    config = LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                         num_hidden_layers=layers, num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                         head_dim=s["head_dim"], max_position_embeddings=512, tie_word_embeddings=False)
    with init_empty_weights():
        model = LlamaForCausalLM(config)
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    gen = torch.Generator().manual_seed(0)
    groups: dict[str, dict] = {}
    for name, param in model.named_parameters():
        key = name.split(".")[2] if name.startswith("model.layers.") else "rest"
        groups.setdefault(key, {})[name] = param
    total = 0
    for key, params in groups.items():
        tensors = {}
        for name, param in params.items():
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(param.shape)
            else:
                fan_in = param.shape[-1]
                tensors[name] = torch.randn(param.shape, generator=gen) / fan_in**0.5
        total += sum(t.numel() * 4 for t in tensors.values())
        save_file(tensors, str(folder / f"model-{key}.safetensors"), metadata={"format": "pt"})
        del tensors
    return total / 2**30


def worker_code(source: Path, out: Path, budget_gb: float, targets: str, samples: int, seq_len: int) -> str:
    return textwrap.dedent(f"""
        import json, resource, sys, time
        sys.path.insert(0, {str(REPO)!r})
        import torch, accelerate, safetensors.torch
        import transformers.models.llama.modeling_llama
        from rcpu.calibration import TokenSet
        from rcpu.config import DataConfig, PruneConfig
        from rcpu.stream import stream_prune

        def status(key):
            for line in open("/proc/self/status"):
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 2**20  # GiB
        torch.ones(4, 4) @ torch.ones(4, 4)
        base = status("VmData")
        limit = int((base + {budget_gb}) * 2**30)
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
        gen = torch.Generator().manual_seed(0)
        tokens = TokenSet(torch.randint(0, 1024, ({samples}, {seq_len}), generator=gen),
                          torch.zeros(0, {seq_len}, dtype=torch.long), torch.zeros(0, dtype=torch.long))
        start = time.perf_counter()
        layers = []
        result = stream_prune({str(source)!r}, {str(out)!r}, DataConfig(seq_len={seq_len}, calib_samples={samples}),
                              PruneConfig(0.2, {targets!r}, "rcpu", "rotation"), tokens=tokens,
                              on_layer=lambda r: layers.append(status("VmRSS")))
        print(json.dumps({{"base_data_gb": base, "limit_gb": limit / 2**30, "seconds": time.perf_counter() - start,
                          "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                          "rss_after_each_layer_gb": layers, "timing_s": result.timing_s,
                          "params_before": result.params_before, "params_after": result.params_after}}))
    """)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.stream", description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--budget-gb", type=float, default=2.4, help="data segment allowed beyond the worker's start")
    p.add_argument("--targets", default="attn", choices=("attn", "mlp", "both"))
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--dir", type=Path, default=None, help="where the temporary folders go (default: system temp)")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="rcpu-stream-bench-", dir=args.dir))
    try:
        source, out = tmp / "source", tmp / "pruned"
        weights_gb = write_model(source, args.layers)
        say(f"stream: wrote {args.layers} LLaMA-7B-shape layers, {weights_gb:.2f} GiB float32; "
            f"cap {args.budget_gb} GiB above the worker's start")
        env = {"OMP_NUM_THREADS": "2", "PATH": "/usr/bin:/bin", "MALLOC_ARENA_MAX": "1",
               "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072", "HOME": str(tmp)}
        code = worker_code(source, out, args.budget_gb, args.targets, args.samples, args.seq_len)
        run = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env)
        if run.returncode != 0:
            say(run.stderr[-3000:])
            return 1
        measured = json.loads(run.stdout.strip().splitlines()[-1])
        out_gb = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 2**30
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    result = {
        "benchmark": "stream", "mode": "full", "date": now(), "wall_s": round(time.perf_counter() - started, 1),
        "machine": machine(), "layers": args.layers, "shape": LARGE_SHAPE, "targets": args.targets,
        "calibration": [args.samples, args.seq_len], "weights_gb": weights_gb, "budget_gb": args.budget_gb,
        "pruned_on_disk_gb": out_gb, **measured,
        "goals": [{"name": "7B-shape model: float32 weights / data cap", "value": weights_gb / args.budget_gb,
                   "op": ">", "target": 1.0, "unit": "", "met": weights_gb > args.budget_gb},
                  {"name": "7B-shape model: peak RSS / float32 weights", "value": measured["peak_rss_gb"] / weights_gb,
                   "op": "<", "target": 1.0, "unit": "", "met": measured["peak_rss_gb"] < weights_gb}],
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / "stream.json").write_text(json.dumps(result, indent=1) + "\n")
    say(f"stream: {weights_gb:.2f} GiB of weights pruned under a {args.budget_gb} GiB cap; peak RSS "
        f"{measured['peak_rss_gb']:.2f} GiB; {measured['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
