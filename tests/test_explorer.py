"""The layer explorer's in-memory stores, the app's defaults and uploads, the whole-model report."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import pytest
import torch

from rcpu import explorer as explorer_module
from rcpu.analysis import analyze_sublayer
from rcpu.calibration import LayerData
from rcpu.config import DataConfig, LayerConfig
from rcpu.errors import RcpuError
from rcpu.explorer import LayerExplorer
from rcpu.memo import Memo
from rcpu.stats import LayerStats
from rcpu.text import save_upload
from ui.defaults import AppDefaults, app_defaults


def test_defaults_are_the_data_config_defaults_unless_overridden():
    d = app_defaults({})
    assert (d.calib_samples, d.seq_len, d.seed) == (DataConfig.calib_samples, DataConfig.seq_len, DataConfig.seed)
    assert d.layer == LayerConfig.layer
    small = app_defaults({"RCPU_APP_CALIB_SAMPLES": "4", "RCPU_APP_SEQ_LEN": "128", "RCPU_APP_LAYER": "1"})
    assert (small.calib_samples, small.seq_len, small.layer) == (4, 128, 1)
    with pytest.raises(RcpuError, match="RCPU_APP_SEQ_LEN"):
        app_defaults({"RCPU_APP_SEQ_LEN": "many"})
    assert isinstance(app_defaults({"RCPU_APP_SEQ_LEN": ""}), AppDefaults)


def test_upload_is_stored_by_content_hash(tmp_path):
    data = b"some calibration text\n" * 10
    path = save_upload(data, root=tmp_path)
    assert path == tmp_path / "uploads" / f"{hashlib.sha256(data).hexdigest()}.txt"
    assert path.read_bytes() == data
    assert save_upload(data, root=tmp_path) == path  # idempotent


@pytest.mark.parametrize(
    "data, message",
    [(b"", "empty"), (b"\x00\x01binary", "binary"), (b"caf\xe9 latin-1", "UTF-8"), (b"x" * 101, "limit")],
)
def test_bad_uploads_are_refused(tmp_path, data, message):
    with pytest.raises(RcpuError, match=message):
        save_upload(data, root=tmp_path, limit=100)
    assert not (tmp_path / "uploads").exists() or not any((tmp_path / "uploads").iterdir())


def test_memo_is_an_lru():
    memo = Memo(max_entries=2)
    memo.put("a", 1)
    memo.put("b", 2)
    assert memo.get("a") == 1  # a is now the most recent
    memo.put("c", 3)
    assert "b" not in memo and "a" in memo and "c" in memo
    calls = []
    assert memo.get_or_compute("d", lambda: calls.append(1) or 4) == 4
    assert memo.get_or_compute("d", lambda: calls.append(1) or 5) == 4
    assert calls == [1]


class _Adapter:
    num_layers = 2

    def __init__(self, weight):
        self.weight = weight

    def sublayer(self, index, name):
        return SimpleNamespace(weight=self.weight)

    def unit_size(self, name):
        return 4 if name == "o_proj" else 1

    def num_units(self, index, name):
        return self.weight.shape[1] // self.unit_size(name)

    @staticmethod
    def unit_name(name):
        return "heads" if name == "o_proj" else "channels"

    def check_layer(self, index):
        if not 0 <= index < self.num_layers:
            raise RcpuError("bad layer")


def test_explorer_computes_each_method_once_and_matches_a_direct_analysis(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 16, generator=gen, dtype=torch.float64)
    calib = LayerStats.from_inputs(torch.randn(16, 200, generator=gen, dtype=torch.float64), sample_size=50)
    held = LayerStats.from_inputs(torch.randn(16, 80, generator=gen, dtype=torch.float64), sample_size=40)
    stats = LayerData(0, {"o_proj": calib, "down_proj": calib}, {"o_proj": held, "down_proj": held})
    lm = SimpleNamespace(fingerprint="fake", adapter=_Adapter(weight))
    data = DataConfig()
    cfg = LayerConfig(layer=0, sublayer="o_proj", ratio=0.25, score="rcpu")

    calls = []
    real = explorer_module.analyze_sublayer

    def counting(*args, **kwargs):
        calls.append(list(kwargs["methods"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(explorer_module, "analyze_sublayer", counting)
    bases = []
    real_prepare = explorer_module.prepare_sublayer
    monkeypatch.setattr(explorer_module, "prepare_sublayer", lambda *a: bases.append(a) or real_prepare(*a))
    memo = LayerExplorer()
    first = memo.analysis(lm, data, stats, cfg, ["none", "rotation"])
    second = memo.analysis(lm, data, stats, cfg, ["ls", "rotation"])
    third = memo.analysis(lm, data, stats, cfg, ["rotation", "none", "ls"])
    assert calls == [["none", "rotation"], ["ls"]]
    assert list(first.methods) == ["none", "rotation"]
    assert list(second.methods) == ["ls", "rotation"]
    assert list(third.methods) == ["rotation", "none", "ls"]

    direct = analyze_sublayer(weight, calib, held, score="rcpu", ratio=0.25, methods=["ls", "rotation"],
                              unit_size=4, what="heads")
    for name in ("ls", "rotation"):
        assert third.methods[name].error_heldout == pytest.approx(direct.methods[name].error_heldout)
        torch.testing.assert_close(third.methods[name].compensation.weight, direct.methods[name].compensation.weight)
    assert third.selection.kept.tolist() == direct.selection.kept.tolist()

    memo.analysis(lm, data, stats, LayerConfig(layer=0, sublayer="o_proj", ratio=0.5, score="rcpu"), ["ls"])
    assert calls[-1] == ["ls"] and len(calls) == 3  # another ratio is another entry
    assert len(bases) == 1  # ... on the same selection-independent basis
    # explore checks every setting before any work (no statistics are asked for here)
    for bad, words in ((LayerConfig(layer=0, sublayer="q_proj"), "unknown sublayer"),
                       (LayerConfig(layer=5, sublayer="o_proj"), "bad layer"),
                       (LayerConfig(layer=0, sublayer="o_proj", ratio=0.9), "would remove all")):
        with pytest.raises(RcpuError, match=words):
            memo.explore(lm, data, bad, ["ls"])
    with pytest.raises(RcpuError, match="unknown method"):
        memo.explore(lm, data, cfg, ["ls", "bogus"])


@pytest.mark.slow  # reads the embedded model's tokenizer
def test_prune_report_and_zip_load_with_stock_transformers(tmp_path, tmp_cache):
    import io
    import json
    import zipfile

    from apphelp import tiny_model_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rcpu.adapters import adapter_for
    from rcpu.config import EvalConfig, PruneConfig
    from rcpu.export import zip_pruned
    from rcpu.models import LoadedModel, count_parameters
    from rcpu.pipeline import prune_and_evaluate

    folder = tiny_model_dir(tmp_path / "tiny")
    model = AutoModelForCausalLM.from_pretrained(folder).eval().requires_grad_(False)
    lm = LoadedModel(model, AutoTokenizer.from_pretrained(folder), adapter_for(model), str(folder), "tiny")
    data = DataConfig(model=str(folder), calib_samples=2, seq_len=64, heldout_samples=1)
    run = prune_and_evaluate(lm, data, PruneConfig(ratio=0.5, method="rotation_bias"), EvalConfig(None, 2))
    result, report = run.result, run.to_json()
    assert report["ppl"] == run.pruned["ppl"] and report["ppl_dense"] == run.dense["ppl"]
    assert report["eval_tokens"] == 2 * 63 and report["eval_windows"] == 2
    assert report["params_after"] < report["params_before"]
    assert len(report["layers"]) == 2 and report["method"] == "rotation_bias"
    assert report["timing_s"]["total"] >= report["timing_s"]["prune"] + report["timing_s"]["eval"]
    json.dumps(report)  # JSON-ready

    blob = zip_pruned(result.model, lm.tokenizer, run.settings(), report)
    with zipfile.ZipFile(io.BytesIO(blob)) as archive:
        names = archive.namelist()
        assert "pruned-model/config.json" in names and "pruned-model/rcpu_results.json" in names
        assert all(n.startswith("pruned-model/") for n in names)
        archive.extractall(tmp_path / "out")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "pruned-model").eval()
    saved = json.loads((tmp_path / "out" / "pruned-model" / "config.json").read_text())["rcpu"]
    assert count_parameters(loaded) == saved["params_saved"]  # a stock class may add zero biases
    ids = torch.randint(0, 1000, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, result.model(ids).logits, atol=1e-4, rtol=1e-4)
