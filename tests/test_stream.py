"""Layer streaming: a model pruned one layer at a time from disk, in a process too small to hold it."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama, random_tokens, tiny_lm

from rcpu.config import DataConfig, PruneConfig
from rcpu.errors import RcpuError
from rcpu.export import load_pruned
from rcpu.prune import prune_model
from rcpu.stream import SafetensorsFolder, stream_prune

REPO = Path(__file__).resolve().parent.parent
# Wide attention, narrow MLP: each layer's weights (18 MiB float32) outweigh the statistics of one
# layer, so the budget below tells one layer from all of them. The capped run compensates with "bias"
# (LAPACK's SVD workspace at d_out = 1024 alone is tens of MiB); the other tests cover ls and rotation.
SHAPE = {"heads": 8, "kv_heads": 4, "hidden": 1024, "intermediate": 512, "vocab": 128}
LAYERS = 12
BUDGET_MB = 160  # data segment allowed beyond what the worker uses before it starts (the model is 217 MiB)


def _save_model(folder: Path, layers: int = LAYERS, **shape) -> torch.nn.Module:
    model = make_tiny_llama(layers=layers, **{**SHAPE, **shape})
    model.save_pretrained(folder, max_shard_size="60MB")  # several files, as real checkpoints are
    return model


def _worker(source: Path, out: Path, mode: str) -> subprocess.CompletedProcess:
    """Run a streamed (or in-memory) prune in a fresh process whose data segment is capped at
    its size after imports plus BUDGET_MB."""
    code = textwrap.dedent(f"""
        import json, resource, sys
        sys.path[:0] = [{str(REPO)!r}, {str(REPO / 'tests')!r}]
        import torch
        import accelerate, safetensors.torch
        import transformers.models.llama.modeling_llama  # lazy imports done before the cap
        from conftest import random_tokens, tiny_lm
        from transformers import AutoModelForCausalLM
        from rcpu.config import DataConfig, PruneConfig
        from rcpu.prune import prune_model
        from rcpu.stream import stream_prune

        def data_mb():
            for line in open("/proc/self/status"):
                if line.startswith("VmData:"):
                    return int(line.split()[1]) / 1024

        torch.ones(4, 4) @ torch.ones(4, 4)  # allocators and kernels set up before the cap
        base = data_mb()
        limit = int((base + {BUDGET_MB}) * 2**20)
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
        data = DataConfig(seq_len=32, calib_samples=8)
        cfg = PruneConfig(0.25, "both", "rcpu", "bias")
        try:
            if {mode!r} == "stream":
                stream_prune({str(source)!r}, {str(out)!r}, data, cfg, tokens=random_tokens())
            else:
                model = AutoModelForCausalLM.from_pretrained({str(source)!r})
                prune_model(tiny_lm(model), data, cfg, tokens=random_tokens())
        except (MemoryError, RuntimeError) as exc:  # torch's allocator raises RuntimeError
            if "allocate" not in str(exc) and not isinstance(exc, MemoryError):
                raise
            import traceback; traceback.print_exc()
            print(json.dumps({{"ok": False, "base_mb": base}}))
            sys.exit(0)
        print(json.dumps({{"ok": True, "base_mb": base,
                          "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
    """)
    # glibc returns every freed block over 128 KiB to the system (fixed thresholds), so the data segment
    # measures what is live rather than the heap's high-water mark.
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(out.parent), "MALLOC_ARENA_MAX": "1",
           "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    return subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env,
                          timeout=600)


def test_streamed_prune_fits_where_the_model_does_not_and_matches_in_memory(tmp_path):
    source = tmp_path / "source"
    model = _save_model(source)
    weights_mb = sum(p.numel() * 4 for p in model.parameters()) / 2**20
    assert weights_mb > 1.3 * BUDGET_MB  # the model itself cannot fit in the cap

    streamed = _worker(source, tmp_path / "streamed", "stream")
    assert streamed.returncode == 0, streamed.stderr[-2000:]
    report = json.loads(streamed.stdout.strip().splitlines()[-1])
    assert report["ok"], "the streamed prune ran out of memory under the cap"

    in_memory = _worker(source, tmp_path / "unused", "memory")  # the control: the same cap is too small
    assert in_memory.returncode == 0 or "MemoryError" in in_memory.stderr, in_memory.stderr[-2000:]
    assert in_memory.returncode != 0 or not json.loads(in_memory.stdout.strip().splitlines()[-1])["ok"]

    data = DataConfig(seq_len=32, calib_samples=8)
    cfg = PruneConfig(0.25, "both", "rcpu", "bias")
    reference = prune_model(tiny_lm(model), data, cfg, tokens=random_tokens()).model
    loaded = load_pruned(tmp_path / "streamed")
    ours, theirs = reference.state_dict(), loaded.state_dict()
    assert set(ours) == set(theirs)
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    ids = random_tokens().calibration[:2]
    with torch.no_grad():
        assert torch.equal(reference(ids).logits, loaded(ids).logits)


@pytest.mark.parametrize("targets, method", [("attn", "ls"), ("mlp", "ls"), ("both", "rotation")])
def test_streamed_equals_in_memory_per_target(tmp_path, targets, method):
    """Records and weights equal the in-memory path's (one target: the other sublayer stays dense)."""
    source = tmp_path / "source"
    model = _save_model(source, layers=2, heads=6, kv_heads=2, hidden=48, intermediate=64)
    data = DataConfig(seq_len=32, calib_samples=8)
    cfg = PruneConfig(0.3, targets, "rcpu", method)
    reference = prune_model(tiny_lm(model), data, cfg, tokens=random_tokens())
    result = stream_prune(source, tmp_path / "out", data, cfg, tokens=random_tokens())
    assert result.layers == reference.layers
    assert (result.params_before, result.params_after) == (reference.params_before, reference.params_after)
    loaded = load_pruned(tmp_path / "out")
    for name, value in reference.model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[name]), name
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(SafetensorsFolder(tmp_path / "out").where)


def test_stream_refuses_an_existing_output_and_a_folder_without_safetensors(tmp_path):
    source = tmp_path / "source"
    _save_model(source, layers=1, heads=6, kv_heads=2, hidden=48, intermediate=64)
    (tmp_path / "out").mkdir()
    data = DataConfig(seq_len=32, calib_samples=8)
    with pytest.raises(RcpuError, match="already exists"):
        stream_prune(source, tmp_path / "out", data, PruneConfig(0.2), tokens=random_tokens())
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((source / "config.json").read_text())
    with pytest.raises(RcpuError, match="no .safetensors"):
        stream_prune(empty, tmp_path / "out2", data, PruneConfig(0.2), tokens=random_tokens())


def test_cli_stream_with_device_cpu_saves_a_loadable_folder(tiny_model_dir, tmp_path, tmp_cache, capsys):
    from rcpu.cli import main

    out = tmp_path / "streamed"
    code = main(["prune", "--model", str(tiny_model_dir), "--stream", "--device", "cpu", "--out", str(out),
                 "--calib-samples", "4", "--seq-len", "32", "--heldout-samples", "0", "--ratio", "0.25",
                 "--json", str(tmp_path / "r.json")])
    assert code == 0, capsys.readouterr().err
    assert "saved to" in capsys.readouterr().out
    record = json.loads((tmp_path / "r.json").read_text())
    assert len(record["layers"]) == 2 and record["params_after"] < record["params_before"]
    model = load_pruned(out)
    assert sum(p.numel() for p in model.parameters()) == record["params_after"]


def test_cli_stream_needs_out(tiny_model_dir, tmp_cache, capsys):
    from rcpu.cli import main

    assert main(["prune", "--model", str(tiny_model_dir), "--stream", "--calib-samples", "4", "--seq-len", "32"]) == 2
    assert "--out" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where CUDA is absent")
@pytest.mark.parametrize("command", [["prune"], ["eval"], ["layer"]])
def test_device_cuda_without_cuda_fails_with_one_line(command, tmp_cache, capsys):
    from rcpu.cli import main

    assert main([*command, "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "CUDA is not available" in err and "--device cpu" in err


def test_device_names_checked():
    from rcpu.config import check_device

    check_device("cpu")
    with pytest.raises(RcpuError, match="unknown device"):
        check_device("gpu0")
    with pytest.raises(RcpuError, match="not supported"):
        check_device("meta")
