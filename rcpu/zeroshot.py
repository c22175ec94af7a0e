"""Zero-shot accuracy (the paper's Table 2) through lm-evaluation-harness's Python API.

The model is handed to ``lm_eval``'s ``HFLM`` as an object in memory (a pruned copy, or a
folder loaded with ``rcpu.models.load_model``), so nothing is written or re-loaded. Offline
by default: the Hugging Face libraries' offline switches are set before ``lm_eval`` runs,
and a task given by name (which needs the hub's datasets) is refused with one line on how
to pass local task files instead. A local task is an lm-eval YAML file whose dataset is
JSON lines (``dataset_path: json`` and ``dataset_kwargs: {data_files: {test: FILE.jsonl}}``,
a relative ``FILE`` being next to the YAML).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import asdict
from pathlib import Path

from .errors import RcpuError

log = logging.getLogger("rcpu")

OFFLINE_SWITCHES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
LOCAL_TASK_HELP = (
    "pass local task files instead: --tasks path/to/task.yaml (an lm-eval YAML with dataset_path: json and "
    "dataset_kwargs: {data_files: {test: task.jsonl}}; see docs/paper.md)"
)
ACCURACY_METRICS = ("acc,none", "acc")


def go_offline() -> None:
    """Set the Hugging Face libraries' offline switches (environment and, if imported, their constants)."""
    for name in OFFLINE_SWITCHES:
        os.environ[name] = "1"
    try:
        import huggingface_hub.constants as hub

        hub.HF_HUB_OFFLINE = True
    except ImportError:
        pass
    try:
        import datasets.config as ds

        ds.HF_DATASETS_OFFLINE = True
        ds.HF_HUB_OFFLINE = True
    except (ImportError, AttributeError):
        pass


def _require_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise RcpuError("zero-shot accuracy needs lm-evaluation-harness: pip install lm_eval==0.4.13") from None


def task_spec(task: str, online: bool = False) -> str | dict:
    """A task name (online only) or a local YAML file as an lm-eval task config dict with absolute data files."""
    path = Path(task).expanduser()
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise RcpuError(f"task file {path} not found")
        import yaml

        try:
            config = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise RcpuError(f"task file {path} is not valid YAML: {exc}"[:300]) from None
        if not isinstance(config, dict) or "task" not in config:
            raise RcpuError(f"task file {path} must be an lm-eval task config with a 'task' name")
        files = (config.get("dataset_kwargs") or {}).get("data_files")
        if isinstance(files, dict):
            resolved = {}
            for split, name in files.items():
                data = Path(name) if Path(name).is_absolute() else path.parent / name
                if not data.is_file():
                    raise RcpuError(f"task {config['task']!r}: data file {data} not found")
                resolved[split] = str(data.resolve())
            config["dataset_kwargs"] = {**config["dataset_kwargs"], "data_files": resolved}
        return config
    if not online:
        raise RcpuError(f"task {task!r} is a name: its data comes from the Hugging Face hub, which rcpu does not "
                        f"reach offline (the default; --online allows it); {LOCAL_TASK_HELP}")
    return task


def tasks_fingerprint(tasks: list[str]) -> list[str]:
    """What a cached accuracy depends on: each task's name, or its YAML's and data files' contents."""
    out = []
    for task in tasks:
        path = Path(task).expanduser()
        if path.suffix in (".yaml", ".yml") and path.is_file():
            h = hashlib.sha256(path.read_bytes())
            spec = task_spec(task)
            for name in sorted(((spec.get("dataset_kwargs") or {}).get("data_files") or {}).values()):
                h.update(Path(name).read_bytes())
            out.append(f"{spec['task']}:{h.hexdigest()[:16]}")
        else:
            out.append(task)
    return out


def zeroshot_accuracy(model, tokenizer, tasks: list[str], *, limit: int | None = None, batch_size: int = 8,
                      online: bool = False) -> dict:
    """{tasks: {name: accuracy}, mean_accuracy, examples} of a causal LM in memory, through ``lm_eval.HFLM``."""
    _require_lm_eval()
    if not tasks:
        raise RcpuError("no tasks given; " + LOCAL_TASK_HELP)
    if not online:
        go_offline()
    specs = [task_spec(t, online) for t in tasks]
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    for name in ("lm-eval", "lm_eval"):
        logging.getLogger(name).setLevel(logging.WARNING)
    device = str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    try:
        out = simple_evaluate(model=lm, tasks=specs, limit=limit, log_samples=False, bootstrap_iters=0,
                              verbosity="WARNING")
    except RcpuError:
        raise
    except Exception as exc:
        text = f"{type(exc).__name__}: {exc}"
        if "offline" in text.lower() or "connect" in text.lower():
            raise RcpuError(f"lm-eval needed the network ({text[:200]}); {LOCAL_TASK_HELP}") from None
        raise RcpuError(f"lm-eval failed: {text}"[:400]) from None
    results = out["results"]
    accuracy = {}
    for name, metrics in results.items():
        value = next((metrics[m] for m in ACCURACY_METRICS if m in metrics), None)
        if value is not None:
            accuracy[name] = float(value)
    if not accuracy:
        raise RcpuError(f"no accuracy metric in lm-eval's results for {', '.join(results)} (tasks need metric acc)")
    examples = {name: int(n.get("effective", n.get("original", 0))) if isinstance(n, dict) else int(n)
                for name, n in (out.get("n-samples") or {}).items()}
    return {"tasks": accuracy, "mean_accuracy": sum(accuracy.values()) / len(accuracy), "examples": examples}


def zeroshot_point(lm, data, cfg, tasks: list[str], *, limit: int | None = None, online: bool = False,
                   compute: bool = True, progress=None) -> dict | None:
    """Mean zero-shot accuracy of ``lm`` pruned with ``cfg`` (``cfg=None``: the dense model), cached on disk."""
    from .cache import load_json, save_json
    from .pipeline import result_path

    fields = {"model": lm.fingerprint, "tasks": tasks_fingerprint(tasks), "limit": limit}
    if cfg is not None:
        from .text import text_fingerprint

        fields.update(data=text_fingerprint(data.data), sampling=asdict(data.sampling), prune=asdict(cfg))
    path = result_path("zeroshot", fields)
    cached = load_json(path)
    if cached is not None:
        return {**cached, "cached": True}
    if not compute:
        return None
    model = lm.model
    row = {"config": "dense", "calib_samples": None, "ratio": 0.0}
    if cfg is not None:
        from dataclasses import replace

        from .prune import prune_model

        model = prune_model(lm, replace(data, heldout_samples=0), cfg, progress=progress).model
        row = {"config": cfg.label, "score": cfg.score, "method": cfg.method, "ratio": cfg.ratio,
               "calib_samples": data.calib_samples, "seq_len": data.seq_len}
    row.update(zeroshot_accuracy(model, lm.tokenizer, tasks, limit=limit, online=online))
    save_json(path, row)
    return {**row, "cached": False}
