"""Reliability and safety (issue 6), library and CLI side; docs/reliability.md has the table.

1. Bad input: one line ``rcpu: error: ...``, exit status 2, no traceback, and nothing written
   (no --json / --csv file, no --out folder, no cache entry).
2. Numerical edge cases: float16 / bfloat16 models, inf activations.
3. Cache integrity under concurrency; old-format entries; ``rcpu cache``.
4. Interrupted work: a save or a sweep killed with SIGKILL.
5. Untrusted inputs: trust_remote_code, pickled weights, custom code in a model folder.

The app side (uploads, error boxes, two browser sessions, localhost) is in test_reliability_app.py.
Most tests use the tiny random LLaMA of conftest (``tiny_model_dir``), not the embedded model.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_llama
from conftest import random_tokens as _tokens
from conftest import tiny_lm as _lm

from rcpu import cache, cli
from rcpu import pipeline as pipeline_module
from rcpu.adapters import SUPPORTED_TYPES, adapter_for
from rcpu.analysis import analyze_sublayer
from rcpu.calibration import layer_stats, stats_path
from rcpu.compensate import METHODS
from rcpu.config import DataConfig, PruneConfig
from rcpu.errors import RcpuError
from rcpu.evaluate import perplexity
from rcpu.export import save_pruned
from rcpu.flow import LayerFlow, layer_input_stats
from rcpu.models import embedded_gguf, load_model
from rcpu.prune import prune_model
from rcpu.scores import SCORES
from rcpu.text import Sampling

REPO = Path(__file__).resolve().parent.parent
FAST = ["--calib-samples", "2", "--seq-len", "64", "--heldout-samples", "1"]
EVAL = ["--eval-windows", "1"]
VOCAB = 128


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def plain_cache(tmp_path, monkeypatch):
    """An empty private RCPU_CACHE (no link to the shared converted models): every file in it is new."""
    root = tmp_path / "cache"
    root.mkdir()
    monkeypatch.setenv("RCPU_CACHE", str(root))
    return root


def all_files(root: Path) -> set[str]:
    """Every file under ``root``, symlinked folders not followed."""
    found = set()
    for folder, _, files in os.walk(root):
        found.update(str(Path(folder, f).relative_to(root)) for f in files)
    return found


def sub_env(cache_root: Path, **extra) -> dict:
    return {**os.environ, "RCPU_CACHE": str(cache_root), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false", **extra}


def one_error_line(stderr: str, *words: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("rcpu: error: "), lines[0]
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


# 1. Bad input: one line, exit 2, nothing written ---------------------------------------------


OUTPUTS = {"layer": ("json",), "prune": ("json", "out"), "sweep": ("json", "csv"), "eval": ("json",)}


def refuse(capsys, tmp_path: Path, cache_root: Path, argv: list[str], *words: str) -> str:
    """Run the CLI in-process and check: exit 2, one error line with ``words``, nothing written."""
    outputs = {kind: tmp_path / f"result-{kind}" for kind in OUTPUTS[argv[0]]}
    extra = [arg for kind, path in outputs.items() if f"--{kind}" not in argv for arg in (f"--{kind}", str(path))]
    before = all_files(cache_root)
    rc = cli.main([*argv, *extra])
    captured = capsys.readouterr()
    assert rc == 2, captured.err
    line = one_error_line(captured.err, *words)
    assert captured.out == ""
    for kind, path in outputs.items():
        if f"--{kind}" not in argv:
            assert not path.exists(), f"--{kind} was written"
    assert all_files(cache_root) == before, "a cache entry was written"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".result")], "temporary output left"
    return line


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "empty.txt").write_text("")
    (d / "blank.txt").write_text(" \n\t\n")
    (d / "binary.txt").write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 40)
    (d / "latin1.txt").write_bytes("Gr\u00fc\u00dfe aus K\u00f6ln, caf\u00e9 cr\u00e8me. ".encode("latin-1") * 50)
    (d / "short.txt").write_text("A few words of text, far too few for one calibration sample. " * 5)
    (d / "not-a-model").mkdir()
    (d / "not-a-model" / "weights.txt").write_text("hello")
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64).save_pretrained(d / "gpt2")
    with open(embedded_gguf(), "rb") as fh:
        (d / "truncated.gguf").write_bytes(fh.read(1 << 20))
    (d / "fake.gguf").write_bytes(b"PK\x03\x04 not a gguf file at all" * 100)
    return d


COMMANDS = ["layer", "prune", "sweep", "eval"]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize(
    "model, words",
    [
        ("embeded", ["unknown model 'embeded'", "embedded", *SUPPORTED_TYPES]),  # misspelt
        ("gpt-2", ["unknown model", "owner/name"]),
        ("not-a-model", ["not a model directory", "config.json"]),
        ("gpt2", ["unsupported architecture 'gpt2'", *SUPPORTED_TYPES]),
        ("truncated.gguf", ["could not read GGUF file", "truncated.gguf"]),
        ("fake.gguf", ["not a GGUF file"]),
        ("missing.gguf", ["not found"]),
    ],
)
def test_bad_models(capsys, tmp_path, plain_cache, bad_files, command, model, words):
    name = str(bad_files / model) if (bad_files / model).exists() or model.endswith(".gguf") else model
    refuse(capsys, tmp_path, plain_cache, [command, "--model", name, *(FAST if command != "eval" else [])], *words)


@pytest.mark.parametrize("command", COMMANDS)
def test_hub_id_while_offline_says_how_to_pass_a_local_path(capsys, tmp_path, plain_cache, monkeypatch, command):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # and the id is in no local hub cache
    refuse(capsys, tmp_path, plain_cache, [command, "--model", "SomeOrg/some-model-7B"],
           "'SomeOrg/some-model-7B'", "unreachable", "local directory", "--model /path/to/model")


@pytest.mark.parametrize(
    "argv, words",
    [
        (["layer", "--ratio=-0.1"], ["ratio must be in [0, 1)", "-0.1"]),
        (["layer", "--ratio", "1"], ["ratio must be in [0, 1)"]),
        (["layer", "--ratio", "nan"], ["ratio must be in [0, 1)"]),
        (["prune", "--ratio=-0.5"], ["ratio must be in [0, 1)"]),
        (["prune", "--ratio", "1.5"], ["ratio must be in [0, 1)"]),
        (["sweep", "--ratios", "0.1,1.0"], ["ratio must be in [0, 1)"]),
        (["sweep", "--ratios", "-0.2"], ["ratio must be in [0, 1)"]),
        (["sweep", "--ratios", ","], ["no ratios given"]),
        (["layer", "--alpha", "nan", "--method", "ridge"], ["alpha must be a finite number >= 0"]),
        (["prune", "--alpha=-1"], ["alpha must be a finite number >= 0"]),
        (["sweep", "--alpha", "inf"], ["alpha must be a finite number >= 0"]),
    ],
)
def test_bad_ratios_and_alpha_before_model_load(capsys, tmp_path, plain_cache, monkeypatch, argv, words):
    monkeypatch.setattr(cli.args, "load", lambda data: pytest.fail("the model must not load for a bad argument"))
    refuse(capsys, tmp_path, plain_cache, [*argv, *FAST], *words)


@pytest.mark.parametrize(
    "argv, what",
    [
        (["layer", "--layer", "0", "--sublayer", "o_proj", "--ratio", "0.95"], "6 heads"),
        (["layer", "--layer", "1", "--sublayer", "down_proj", "--ratio", "0.995"], "64 channels"),
        (["prune", "--ratio", "0.95", *EVAL], "6 heads"),
        (["prune", "--ratio", "0.995", "--targets", "mlp", *EVAL], "64 channels"),
        (["sweep", "--ratios", "0.2,0.95", "--configs", "rcpu:rotation", *EVAL], "6 heads"),
    ],
)
def test_ratio_that_leaves_a_layer_nothing(capsys, tmp_path, plain_cache, tiny_model_dir, argv, what):
    """Refused after the model loads (the unit count is the model's) but before any work or cache write."""
    line = refuse(capsys, tmp_path, plain_cache, [*argv, "--model", str(tiny_model_dir), *FAST], "remove all", what)
    assert "smaller ratio" in line


@pytest.mark.parametrize("layer", ["2", "99", "-1"])
def test_layer_out_of_range(capsys, tmp_path, plain_cache, tiny_model_dir, layer):
    refuse(capsys, tmp_path, plain_cache, ["layer", "--model", str(tiny_model_dir), "--layer", layer, *FAST],
           f"layer {layer} is out of range", "0..1")


@pytest.mark.parametrize("command", ["layer", "prune", "sweep"])
@pytest.mark.parametrize("kind", ["score", "method"])
def test_unknown_score_or_method_lists_the_valid_ones(capsys, tmp_path, plain_cache, command, kind):
    valid = SCORES if kind == "score" else METHODS
    argv = ([command, f"--{kind}", "rcpuu"] if command != "sweep"
            else [command, "--configs", "rcpu:rotation,rcpuu:none" if kind == "score" else "rcpu:rotatoin"])
    line = refuse(capsys, tmp_path, plain_cache, [*argv, *FAST], f"unknown {kind}")
    assert all(name in line for name in valid), line


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize(
    "text, words",
    [
        ("empty.txt", ["is empty"]),
        ("blank.txt", ["is empty"]),
        ("binary.txt", ["looks binary, not text"]),
        ("latin1.txt", ["is not UTF-8 text", "byte 2"]),
        ("nowhere.txt", ["not found", "'embedded'"]),
    ],
)
def test_unusable_text(capsys, tmp_path, plain_cache, bad_files, command, text, words):
    refuse(capsys, tmp_path, plain_cache, [command, "--data", str(bad_files / text)], *words)


@pytest.mark.parametrize("command", ["prune", "sweep"])
def test_unusable_evaluation_text(capsys, tmp_path, plain_cache, bad_files, command):
    refuse(capsys, tmp_path, plain_cache, [command, "--eval-data", str(bad_files / "binary.txt"), *FAST], "binary")


@pytest.mark.parametrize("command", ["layer", "prune", "sweep"])
def test_too_short_text_says_how_many_tokens_are_needed(capsys, tmp_path, plain_cache, tiny_model_dir,
                                                        bad_files, command):
    argv = [command, "--model", str(tiny_model_dir), "--data", str(bad_files / "short.txt"), *FAST]
    if command == "layer":
        argv += ["--layer", "0"]
    line = refuse(capsys, tmp_path, plain_cache, argv, "tokens", "at least 320 are needed", "--seq-len")
    assert "short.txt" in line


def test_evaluation_text_shorter_than_one_window(capsys, tmp_path, plain_cache, tiny_model_dir, bad_files):
    """Too short for one 512-token window: refused before the dense perplexity is computed and cached."""
    argv = ["prune", "--model", str(tiny_model_dir), "--calib-samples", "2", "--heldout-samples", "1",
            "--seq-len", "512", "--eval-data", str(bad_files / "short.txt")]
    refuse(capsys, tmp_path, plain_cache, argv, "fewer than one 512-token window")


SAMPLING = [
    ("--calib-samples", "0", ["calibration samples must be between 1 and 100000", "got 0"]),
    ("--calib-samples", "1000000000", ["calibration samples must be between 1 and 100000"]),
    ("--seq-len", "0", ["sequence length must be between 1 and 32768", "got 0"]),
    ("--seq-len", "10000000", ["sequence length must be between 1 and 32768"]),
    ("--heldout-samples", "-1", ["held-out samples"]),
    ("--eval-windows", "0", ["--eval-windows must be at least 1"]),
    ("--eval-windows", "-3", ["--eval-windows must be at least 1"]),
]


def _options(command: str) -> set[str]:
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command").choices[command]
    return {option for action in sub._actions for option in action.option_strings}


@pytest.mark.parametrize(
    "command, option, value, words",
    [(c, *case) for c in COMMANDS for case in SAMPLING if case[0] in _options(c)],
)
def test_absurd_sampling(capsys, tmp_path, plain_cache, tiny_model_dir, command, option, value, words):
    argv = [command, "--model", str(tiny_model_dir), option, value]
    if option == "--eval-windows":
        argv += ["--seq-len", "64"] + (["--calib-samples", "2", "--heldout-samples", "1"] if command != "eval" else [])
    refuse(capsys, tmp_path, plain_cache, argv, *words)


def test_sweep_calibration_sizes_checked_one_by_one(capsys, tmp_path, plain_cache):
    refuse(capsys, tmp_path, plain_cache, ["sweep", "--calib-samples", "4,0", "--seq-len", "64"],
           "calibration samples", "got 0")


def test_existing_output_folder_is_never_touched_without_overwrite(capsys, tmp_path, plain_cache, tiny_model_dir):
    out = tmp_path / "pruned"
    out.mkdir()
    (out / "mine.txt").write_text("precious")
    refuse(capsys, tmp_path, plain_cache, ["prune", "--model", str(tiny_model_dir), "--out", str(out), *FAST],
           "already exists", "--overwrite")
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and (out / "mine.txt").read_text() == "precious"


@pytest.mark.parametrize(
    "where, words",
    [
        ("file", ["exists and is not a directory"]),
        ("no/such/parent", ["does not exist"]),
    ],
)
def test_unusable_output_folder(capsys, tmp_path, plain_cache, where, words):
    target = tmp_path / where
    if where == "file":
        target.write_text("a file")
    refuse(capsys, tmp_path, plain_cache, ["prune", "--out", str(target), "--overwrite", *FAST], *words)
    if where == "file":
        assert target.read_text() == "a file"


@pytest.mark.parametrize("command", COMMANDS)
def test_json_into_a_folder_or_missing_folder(capsys, tmp_path, plain_cache, command):
    refuse(capsys, tmp_path, plain_cache, [command, "--json", str(tmp_path)], "is a directory")
    refuse(capsys, tmp_path, plain_cache, [command, "--json", str(tmp_path / "no" / "r.json")], "does not exist")


def test_unknown_cache_section(capsys, plain_cache):
    (plain_cache / "stats").mkdir()
    (plain_cache / "stats" / "keep.npz").write_bytes(b"x")
    assert cli.main(["cache", "clear", "--section", "../stats"]) == 2
    line = one_error_line(capsys.readouterr().err, "unknown cache section", "stats", "results")
    assert "models" in line
    assert (plain_cache / "stats" / "keep.npz").exists()


@pytest.mark.parametrize(
    "case",
    ["hub-offline", "unsupported", "truncated-gguf"],
)
def test_bad_model_in_a_real_process(tmp_path, bad_files, case):
    """The same errors from ``python -m rcpu``: status 2, exactly one stderr line, nothing in the cache."""
    root = tmp_path / "cache"
    model = {"hub-offline": "SomeOrg/some-model", "unsupported": str(bad_files / "gpt2"),
             "truncated-gguf": str(bad_files / "truncated.gguf")}[case]
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, "-m", "rcpu", "prune", "--model", model, *FAST, "--json", str(out), "--out",
         str(tmp_path / "pruned")],
        cwd=REPO, env=sub_env(root, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf")),
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 2, proc.stderr
    one_error_line(proc.stderr)
    assert proc.stdout == ""
    assert not out.exists() and not (tmp_path / "pruned").exists()
    assert all_files(root) == set()


# 2. Numerical edge cases ------------------------------------------------------------------------




TINY = {"layers": 2, "heads": 6, "kv_heads": 2, "hidden": 48, "intermediate": 64}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model_float64_statistics_finite_prune(dtype):
    model = make_tiny_llama(**TINY).to(dtype)
    lm = _lm(model)
    flow = LayerFlow(lm.adapter, _tokens().calibration)
    flow.advance_to(1)
    stats = layer_input_stats(flow, 1, 64, 0)
    for st in stats.values():
        assert st.gram.dtype == torch.float64 and st.total.dtype == torch.float64
        assert st.count == 8 * 32 and bool(torch.isfinite(st.gram).all())
    analysis = analyze_sublayer(model.model.layers[1].self_attn.o_proj.weight, stats["o_proj"], stats["o_proj"],
                                score="rcpu", ratio=0.34, methods=list(METHODS), unit_size=8)
    for result in analysis.methods.values():
        assert result.compensation.weight.dtype == torch.float64
        assert math.isfinite(result.error_calibration) and result.error_calibration >= 0

    result = prune_model(lm, DataConfig(seq_len=32, calib_samples=8), PruneConfig(0.34, "both", "rcpu", "rotation"),
                         tokens=_tokens())
    for plans in result.plans:
        for plan in plans.values():
            assert plan.compensation.weight.dtype == torch.float64
            assert bool(torch.isfinite(plan.compensation.weight).all())
    assert all(p.dtype == dtype and bool(torch.isfinite(p).all()) for p in result.model.parameters())
    for layer in result.layers:
        for sub in ("o_proj", "down_proj"):
            assert all(math.isfinite(v) for k, v in layer[sub].items() if k.startswith("error"))
    ppl = perplexity(result.model, _tokens(3).calibration)["ppl"]
    dense = perplexity(model, _tokens(3).calibration)["ppl"]
    assert math.isfinite(ppl) and math.isfinite(dense)
    assert result.params_after < result.params_before


def test_half_precision_model_folder_is_loaded_in_float32(tmp_path, tiny_model_dir):
    folder = tmp_path / "fp16"
    shutil.copytree(tiny_model_dir, folder)
    model = load_model(str(folder)).model
    model.to(torch.float16).save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text()).get("dtype", "float16") == "float16"
    loaded = load_model(str(folder))
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32}


def _overflowing_llama():
    """Layer 0's MLP overflows float32 on every token: inf activations from layer 0's down_proj on."""
    model = make_tiny_llama(**TINY)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(1e30)
        model.model.layers[0].mlp.gate_proj.weight.mul_(1e30)
    return model


def test_inf_activations_everywhere_are_a_clear_error(caplog):
    model = _overflowing_llama()
    with caplog.at_level(logging.WARNING, logger="rcpu"), pytest.raises(RcpuError, match="inf/NaN"):
        prune_model(_lm(model), DataConfig(seq_len=32, calib_samples=8), PruneConfig(0.34), tokens=_tokens())
    assert any("inf/NaN inputs were left out" in r.getMessage() for r in caplog.records)
    with pytest.raises(RcpuError, match="inf/NaN logits"):
        perplexity(model, _tokens(3).calibration)  # never a NaN (or a false inf) perplexity
    flow = LayerFlow(adapter_for(model), _tokens().calibration)
    stats = layer_input_stats(flow, 0, 64, 0)
    assert stats["down_proj"].count == 0 and bool(torch.isfinite(stats["down_proj"].gram).all())
    with pytest.raises(RcpuError, match="no calibration tokens with finite inputs"):
        analyze_sublayer(model.model.layers[0].mlp.down_proj.weight, stats["down_proj"], stats["down_proj"],
                         score="rcpu", ratio=0.3, methods=["rotation"])


def test_inf_activations_in_the_cli_are_one_clear_error(tmp_path, plain_cache, tiny_model_dir, capsys):
    folder = tmp_path / "overflow"
    shutil.copytree(tiny_model_dir, folder)
    model = load_model(str(folder)).model
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(1e30)
        model.model.layers[0].mlp.gate_proj.weight.mul_(1e30)
    model.save_pretrained(folder)
    for argv in (["layer", "--layer", "1"], ["prune", *EVAL], ["eval", "--seq-len", "64", "--eval-windows", "1"]):
        json_out = tmp_path / "r.json"
        rc = cli.main([*argv, "--model", str(folder), *(FAST if argv[0] != "eval" else []), "--json", str(json_out)])
        err = capsys.readouterr().err
        assert rc == 2 and "Traceback" not in err, err
        last = [line for line in err.splitlines() if line.strip()][-1]
        assert last.startswith("rcpu: error:") and "inf/NaN" in last, err
        assert not json_out.exists()
        assert "nan" not in last.lower().replace("inf/nan", "")


def test_inf_activations_on_some_tokens_give_a_finite_result_with_a_warning(caplog):
    """Tokens whose inputs are inf are left out of the statistics with a warning; the rest is finite."""
    model = make_tiny_llama(**TINY)

    def poison(module, args):
        x = args[0].clone()
        x[0, :5] = float("inf")  # 5 tokens of the first window of each batch
        return (x,)

    model.model.layers[1].mlp.down_proj.register_forward_pre_hook(poison)
    with caplog.at_level(logging.WARNING, logger="rcpu"):
        result = prune_model(_lm(model), DataConfig(seq_len=32, calib_samples=8),
                             PruneConfig(0.34, "both", "rcpu", "rotation"), tokens=_tokens())
    warnings = [r.getMessage() for r in caplog.records if "inf/NaN inputs were left out" in r.getMessage()]
    assert any(w.startswith("layer 1 down_proj: 5 tokens") for w in warnings), warnings
    for plans in result.plans:
        for plan in plans.values():
            assert bool(torch.isfinite(plan.compensation.weight).all())
    for layer in result.layers:
        for sub in ("o_proj", "down_proj"):
            assert all(math.isfinite(v) for k, v in layer[sub].items() if k.startswith("error"))


# 3. Cache integrity ----------------------------------------------------------------------------


def test_two_processes_computing_the_same_statistics(tmp_path, tiny_model_dir):
    root = tmp_path / "cache"
    outs = [tmp_path / f"r{i}.json" for i in range(2)]
    argv = [sys.executable, "-m", "rcpu", "layer", "--model", str(tiny_model_dir), "--layer", "1",
            "--sublayer", "o_proj", "--method", "ls", *FAST]
    procs = [subprocess.Popen([*argv, "--json", str(out)], cwd=REPO, env=sub_env(root),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for out in outs]
    results = [p.communicate(timeout=300) for p in procs]
    for proc, (stdout, stderr) in zip(procs, results):
        assert proc.returncode == 0, stderr
        assert "Traceback" not in stderr and "discarded" not in stderr
    reports = [json.loads(out.read_text()) for out in outs]
    for key in ("kept", "error", "error_uncompensated", "gram_distortion"):
        assert reports[0][key] == reports[1][key], key
    entries = list((root / "stats").iterdir())
    assert len(entries) == 1 and entries[0].suffix == ".npz", entries  # no temporary file left behind
    assert cache.load_arrays(entries[0]) is not None  # valid checksum and format
    # a third run reads that entry
    proc = subprocess.run([*argv, "--json", str(tmp_path / "r3.json")], cwd=REPO, env=sub_env(root),
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0 and "(cache)" in proc.stdout, proc.stderr


WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import numpy as np
    from rcpu.cache import save_arrays
    path, seed = Path(sys.argv[1]), int(sys.argv[2])
    rng = np.random.default_rng(seed)
    for i in range(40):
        n = int(rng.integers(20, 150))
        save_arrays(path, {"gram": rng.standard_normal((n, n)), "seed": np.array(seed)})
    """
)


def test_concurrent_writers_never_expose_a_partial_entry(tmp_path, caplog):
    """Three processes rewrite one entry 40 times each while this one reads it: every read is whole."""
    path = tmp_path / "stats" / "shared.npz"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(seed)], cwd=REPO,
                              env=sub_env(tmp_path)) for seed in range(3)]
    reads = 0
    with caplog.at_level(logging.WARNING, logger="rcpu"):
        while any(p.poll() is None for p in procs) or reads == 0:
            arrays = cache.load_arrays(path)
            if arrays is not None:
                reads += 1
                assert int(arrays["seed"]) in (0, 1, 2) and arrays["gram"].ndim == 2
    assert all(p.wait(timeout=120) == 0 for p in procs)
    assert not [r for r in caplog.records if "discarded" in r.getMessage()]
    assert [p.name for p in path.parent.iterdir()] == ["shared.npz"]
    assert reads > 0


def test_old_format_statistics_entry_is_recomputed(plain_cache, tiny_model_dir, caplog, monkeypatch):
    lm = load_model(str(tiny_model_dir))
    sampling = Sampling(calib_samples=2, seq_len=64, heldout_samples=1)
    first = layer_stats(lm, "embedded", sampling, 1)
    assert not first.from_cache and layer_stats(lm, "embedded", sampling, 1).from_cache
    path = stats_path(lm, "embedded", sampling, 1)
    arrays = cache.load_arrays(path)
    with monkeypatch.context() as m:
        m.setattr(cache, "FORMAT_VERSION", cache.FORMAT_VERSION - 1)  # as an older rcpu wrote it
        cache.save_arrays(path, arrays)
    with caplog.at_level(logging.WARNING, logger="rcpu"):
        again = layer_stats(lm, "embedded", sampling, 1)
    assert not again.from_cache
    assert any("discarded" in r.getMessage() and "format" in r.getMessage() for r in caplog.records)
    assert torch.equal(again.calibration["down_proj"].gram, first.calibration["down_proj"].gram)
    with np.load(path, allow_pickle=False) as npz:
        assert json.loads(str(npz["__header__"]))["format"] == cache.FORMAT_VERSION
    assert layer_stats(lm, "embedded", sampling, 1).from_cache


def test_cache_report_and_clear_in_a_real_process(tmp_path, tiny_model_dir):
    root = tmp_path / "cache"
    proc = subprocess.run([sys.executable, "-m", "rcpu", "layer", "--model", str(tiny_model_dir), "--layer", "0",
                           *FAST], cwd=REPO, env=sub_env(root), capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr

    def rcpu(*args):
        return subprocess.run([sys.executable, "-m", "rcpu", "cache", *args], cwd=REPO, env=sub_env(root),
                              capture_output=True, text=True, timeout=120, check=False)

    info = rcpu()
    assert info.returncode == 0 and str(root) in info.stdout
    sizes = {line.split()[0]: float(line.split()[1]) for line in info.stdout.splitlines()[1:]}
    assert sizes["stats"] > 0 and sizes["total"] >= sizes["stats"]
    bad = rcpu("clear", "--section", "nope")
    assert bad.returncode == 2
    one_error_line(bad.stderr, "unknown cache section 'nope'")
    cleared = rcpu("clear")
    assert cleared.returncode == 0 and "freed" in cleared.stdout
    assert all_files(root) == set()
    after = rcpu()
    assert after.returncode == 0 and "total" in after.stdout and "0.0 MB" in after.stdout


# 4. Interrupted work ----------------------------------------------------------------------------


SLOW_SAVE = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import transformers
    from rcpu import cli
    real = transformers.PreTrainedModel.save_pretrained
    def slow(self, folder, *args, **kwargs):
        real(self, folder, *args, **kwargs)  # weights and config written; tokenizer not yet; not renamed
        Path(folder, "SAVING").write_text("killed here")
        time.sleep(300)
    transformers.PreTrainedModel.save_pretrained = slow
    sys.exit(cli.main(sys.argv[1:]))
    """
)


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 240.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        if proc.poll() is not None:
            raise AssertionError(f"process ended early: {proc.returncode} {proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("timed out")


def test_prune_killed_while_saving_leaves_no_output_and_a_rerun_succeeds(tmp_path, tiny_model_dir, capsys,
                                                                         monkeypatch):
    root, out = tmp_path / "cache", tmp_path / "pruned"
    monkeypatch.setenv("RCPU_CACHE", str(root))
    argv = ["prune", "--model", str(tiny_model_dir), "--ratio", "0.34", *FAST, *EVAL, "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, *argv], cwd=REPO, env=sub_env(root),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    marker = _wait_for(lambda: next(tmp_path.glob(".pruned.tmp-*/SAVING"), None), proc)
    assert (marker.parent / "model.safetensors").exists()  # caught midway: weights written, not renamed
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert not out.exists()  # absent, never half-written

    assert cli.main(argv) == 0  # a later run succeeds (and clears the dead run's temporary folder)
    capsys.readouterr()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "cache") == ["pruned"]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert not (out / "SAVING").exists()
    assert cli.main(["eval", "--model", str(out), "--seq-len", "64", "--eval-windows", "1"]) == 0


@pytest.mark.parametrize("existing", [False, True])
@pytest.mark.parametrize("fail_in", ["model", "tokenizer"])
def test_save_failing_midway_leaves_the_output_absent_or_untouched(tmp_path, tiny_model_dir, monkeypatch,
                                                                   existing, fail_in):
    lm = load_model(str(tiny_model_dir))
    out = tmp_path / "pruned"
    if existing:
        save_pruned(lm.model, lm.tokenizer, out)
        before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(self, folder, *args, **kwargs):
        Path(folder, "partial.bin").write_bytes(b"half")
        raise OSError("No space left on device")

    target = type(lm.model) if fail_in == "model" else type(lm.tokenizer)
    monkeypatch.setattr(target, "save_pretrained", broken)
    with pytest.raises(OSError, match="No space left"):
        save_pruned(lm.model, lm.tokenizer, out, overwrite=True)
    if existing:
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    else:
        assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == (["pruned"] if existing else [])


SLOW_SWEEP = textwrap.dedent(
    """
    import sys, time
    from rcpu import cli, pipeline
    real = pipeline.prune_model
    calls = []
    def slow(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            time.sleep(300)  # the second point never finishes: it is in flight when the kill comes
        return real(*args, **kwargs)
    pipeline.prune_model = slow
    sys.exit(cli.main(sys.argv[1:]))
    """
)


def test_sweep_killed_midway_resumes_and_computes_only_the_missing_points(tmp_path, tiny_model_dir, monkeypatch,
                                                                          capsys):
    root = tmp_path / "cache"
    monkeypatch.setenv("RCPU_CACHE", str(root))
    argv = ["sweep", "--model", str(tiny_model_dir), "--ratios", "0.2,0.34", "--configs",
            "rcpu:rotation,wanda_sp:none", *FAST, *EVAL]
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SWEEP, *argv], cwd=REPO, env=sub_env(root),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: list((root / "results").glob("point-*.json")) if (root / "results").exists() else None,
              proc)
    time.sleep(0.5)  # well inside the second point
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    done = sorted((root / "results").glob("point-*.json"))
    assert len(done) == 1
    assert all(cache.load_json(p) is not None for p in (root / "results").glob("*.json"))  # whole entries only

    computed = []
    real = pipeline_module.prune_model
    monkeypatch.setattr(pipeline_module, "prune_model", lambda *a, **k: computed.append(1) or real(*a, **k))
    out = tmp_path / "s.json"
    assert cli.main([*argv, "--json", str(out)]) == 0
    capsys.readouterr()
    points = json.loads(out.read_text())["points"]
    assert len(points) == 4 and len(computed) == 3
    assert [p["cached"] for p in points] == [True, False, False, False]
    assert all(math.isfinite(p["ppl"]) for p in points)


# 5. Untrusted inputs ----------------------------------------------------------------------------


@pytest.fixture
def loader_calls(monkeypatch):
    """Record the keyword arguments of every transformers from_pretrained that load_model makes."""
    import transformers

    calls: list[tuple[str, dict, str]] = []  # (class, kwargs, calling module)
    for name in ("AutoConfig", "AutoTokenizer", "AutoModelForCausalLM"):
        cls = getattr(transformers, name)
        real = cls.from_pretrained.__func__

        def spy(klass, *args, _real=real, _name=name, **kwargs):
            calls.append((_name, dict(kwargs), sys._getframe(1).f_globals.get("__name__", "")))
            return _real(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    return calls


def test_trust_remote_code_is_off_unless_the_flag_is_given(tiny_model_dir, loader_calls):
    load_model(str(tiny_model_dir))
    direct = [(name, kwargs) for name, kwargs, caller in loader_calls if caller == "rcpu.models"]
    assert {name for name, _ in direct} == {"AutoConfig", "AutoTokenizer", "AutoModelForCausalLM"}
    assert all(kwargs["trust_remote_code"] is False for _, kwargs in direct), direct
    # nor does transformers turn it on in any call it makes itself
    assert not any(kwargs.get("trust_remote_code") for _, kwargs, _ in loader_calls), loader_calls
    for command in ("layer", "prune", "sweep", "eval"):
        for flag, expected in (([], False), (["--trust-remote-code"], True)):
            loader_calls.clear()
            args = cli.build_parser().parse_args([command, "--model", str(tiny_model_dir), *flag])
            data = cli.data_config(args) if command != "eval" else DataConfig(
                model=args.model, trust_remote_code=args.trust_remote_code)
            cli.load(data)
            direct = [kwargs for _, kwargs, caller in loader_calls if caller == "rcpu.models"]
            assert len(direct) == 3 and all(kwargs["trust_remote_code"] is expected for kwargs in direct), (
                command, flag, loader_calls)
            if not expected:
                assert not any(kwargs.get("trust_remote_code") for _, kwargs, _ in loader_calls)


def test_weights_are_read_with_safetensors_only(tiny_model_dir, loader_calls):
    load_model(str(tiny_model_dir))
    (model_kwargs,) = [kwargs for name, kwargs, caller in loader_calls
                       if name == "AutoModelForCausalLM" and caller == "rcpu.models"]
    assert model_kwargs["use_safetensors"] is True


class _Payload:
    """A pickle that writes a file when unpickled (what a malicious .bin could do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('unpickled')",))


def test_model_folder_with_only_pickled_weights_is_refused_unread(tmp_path, tiny_model_dir, monkeypatch, capsys):
    folder, marker = tmp_path / "pickled", tmp_path / "UNPICKLED"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "model.safetensors").unlink()
    with open(folder / "pytorch_model.bin", "wb") as fh:
        pickle.dump({"weights": _Payload(marker)}, fh)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load must not be called"))
    with pytest.raises(RcpuError, match="only PyTorch .bin weights; rcpu reads safetensors only"):
        load_model(str(folder))
    assert cli.main(["prune", "--model", str(folder), *FAST]) == 2
    one_error_line(capsys.readouterr().err, ".bin", "safetensors")
    assert not marker.exists()


def test_safetensors_win_over_a_pickle_in_the_same_folder(tmp_path, tiny_model_dir, monkeypatch):
    folder, marker = tmp_path / "both", tmp_path / "UNPICKLED"
    shutil.copytree(tiny_model_dir, folder)
    with open(folder / "pytorch_model.bin", "wb") as fh:
        pickle.dump({"weights": _Payload(marker)}, fh)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load must not be called"))
    lm = load_model(str(folder))
    assert lm.adapter.num_layers == 2
    assert not marker.exists()


def test_custom_code_in_a_model_folder_never_runs(tmp_path, capsys):
    folder = tmp_path / "custom"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "evil", "architectures": ["EvilModel"],
        "auto_map": {"AutoConfig": "evil_code.EvilConfig", "AutoModelForCausalLM": "evil_code.EvilModel"},
    }))
    (folder / "evil_code.py").write_text(
        "from pathlib import Path\nPath(__file__).with_name('EXECUTED').write_text('ran')\n"
        "from transformers import PretrainedConfig\nclass EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n"
    )
    with pytest.raises(RcpuError, match="needs custom code .* unless you pass --trust-remote-code"):
        load_model(str(folder))
    assert cli.main(["layer", "--model", str(folder), *FAST]) == 2
    one_error_line(capsys.readouterr().err, "--trust-remote-code")
    assert not (folder / "EXECUTED").exists()
