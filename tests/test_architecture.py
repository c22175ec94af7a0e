"""The house rules that keep the code in one place (docs/architecture.md).

- defaults live in the config classes: the CLI's options read them;
- a decoder family's module and config names appear only in its adapter;
- imports inside ``rcpu`` point one way (no cycles), and the library never imports Streamlit.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from rcpu import cli
from rcpu.adapters import ADAPTERS, DecoderAdapter
from rcpu.config import DataConfig, EvalConfig, LayerConfig, PruneConfig, SweepConfig

PACKAGE = Path(__file__).resolve().parent.parent / "rcpu"


def _defaults(command: str) -> dict:
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command").choices[command]
    return {action.dest: action.default for action in sub._actions}


def test_cli_defaults_are_the_config_defaults():
    data = {"model": DataConfig.model, "data": DataConfig.data, "seq_len": DataConfig.seq_len,
            "seed": DataConfig.seed, "heldout_samples": DataConfig.heldout_samples}
    layer = _defaults("layer")
    assert layer.items() >= {**data, "calib_samples": DataConfig.calib_samples, "layer": LayerConfig.layer,
                             "sublayer": LayerConfig.sublayer, "ratio": LayerConfig.ratio,
                             "score": LayerConfig.score, "method": LayerConfig.method,
                             "alpha": LayerConfig.alpha}.items()
    prune = _defaults("prune")
    assert prune.items() >= {**data, "ratio": PruneConfig.ratio, "targets": PruneConfig.targets,
                             "score": PruneConfig.score, "method": PruneConfig.method,
                             "alpha": PruneConfig.alpha, "eval_data": EvalConfig.eval_data,
                             "eval_windows": EvalConfig.eval_windows}.items()
    sweep = _defaults("sweep")
    spec = SweepConfig()
    assert tuple(float(r) for r in sweep["ratios"].split(",")) == spec.ratios
    assert sweep["configs"] == spec.configs_text and sweep["alpha"] == spec.alpha
    assert sweep["targets"] == spec.targets


def _sources(skip: str | None = None):
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if skip is None or not rel.startswith(skip):
            yield rel, path.read_text()


# What only an adapter may name: a family's module paths and config fields.
FAMILY_NAMES = re.compile(
    r"\b(q_proj|k_proj|v_proj|gate_proj|up_proj|self_attn|num_key_value_groups|num_key_value_heads|"
    r"num_attention_heads|intermediate_size|attention_bias|mlp_bias)\b|\.mlp\b|model\.model\b"
)


def test_family_names_appear_only_in_adapters():
    found = [(rel, n + 1, line.strip()) for rel, text in _sources(skip="adapters/")
             for n, line in enumerate(text.splitlines()) if FAMILY_NAMES.search(line)]
    # the model card reports the size under the name transformers uses; nothing reads it back
    allowed = {("models.py", '"intermediate_size": a.num_channels(0),')}
    assert [(rel, line) for rel, _, line in found if (rel, line) not in allowed] == [], found


def _module_name(rel: str) -> str:
    parts = rel[:-3].split("/")
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["rcpu", *parts])


def _imports(rel: str, text: str) -> set[str]:
    """Every rcpu module ``rel`` imports, at the top or inside a function."""
    here = _module_name(rel).split(".")
    package = here if rel.endswith("__init__.py") else here[:-1]
    found = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + (node.module.split(".") if node.module else []))
            for alias in node.names:  # ``from . import cli`` names a module
                found.add(f"{module}.{alias.name}")
            found.add(module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m.startswith("rcpu")}


def test_library_imports_point_one_way():
    modules = {_module_name(rel): (rel, text) for rel, text in _sources()}
    graph = {name: {m for m in _imports(*src) if m in modules and m != name} for name, src in modules.items()}
    # a package imports its own submodules (rcpu.cli -> rcpu.cli.args); leave those edges out
    graph = {n: {m for m in deps if not m.startswith(n + ".")} for n, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_the_library_never_imports_streamlit():
    assert [rel for rel, text in _sources() if re.search(r"^\s*(import|from) streamlit", text, re.MULTILINE)] == []


def test_every_adapter_answers_the_whole_protocol():
    abstract = DecoderAdapter.__abstractmethods__
    assert {"layers", "head_dim", "attention_inputs", "attention_output", "mlp_inputs", "mlp_output",
            "attention_module", "set_query_groups", "stock_candidates"} == set(abstract)
    with pytest.raises(TypeError):
        DecoderAdapter(None)  # abstract
    types = [t for cls in ADAPTERS for t in cls.model_types]
    assert len(types) == len(set(types))  # one adapter per model type
    for cls in ADAPTERS:
        assert not cls.__abstractmethods__, cls
