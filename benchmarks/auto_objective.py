"""Does a sublayer's output error predict perplexity? ``python -m benchmarks.auto_objective``

``auto`` chooses each sublayer's compensation by its output error on calibration folds. At
5.3 calibration tokens per ``down_proj`` input (64 x 128) it chooses ``ls_ridge`` at
``a = 0.1`` in most sublayers, and its perplexity is above plain least squares' everywhere
(``docs/benchmarks.md`` section 7). This prints, for a few layers of the dense embedded model at
ratio 0.2, score ``rcpu``, the relative output error of ``ls`` and of ``ls_ridge`` at the
strengths ``auto`` refits with, on the calibration tokens and on held-out tokens of the text:
a diagnostic of the selection objective (nothing here feeds a choice).
"""

from __future__ import annotations

from rcpu.allocate import FOLDS
from rcpu.compensate import ridge_lambda
from rcpu.config import DataConfig, LayerConfig
from rcpu.explorer import LayerExplorer
from rcpu.models import load_model
from rcpu.problem import KeptProblem

LAYERS = (3, 15, 26)
STRENGTHS = tuple(a * (FOLDS - 1) / FOLDS for a in (1e-3, 1e-2, 1e-1))  # the refit's relative strength for these a


def main() -> int:
    lm = load_model("embedded")
    data = DataConfig(model="embedded", calib_samples=64, seq_len=128, heldout_samples=16)
    explorer = LayerExplorer()
    print("layer sublayer method: relative output error on calibration / held-out tokens")
    for layer in LAYERS:
        stats = explorer.layer_data(lm, data, layer)
        for sub in ("o_proj", "down_proj"):
            base = LayerConfig(layer=layer, sublayer=sub, ratio=0.2, score="rcpu", method="ls")
            ls = explorer.explore(lm, data, base, ["ls"]).analysis
            problem = KeptProblem(lm.adapter.sublayer(layer, sub).weight, stats.calibration[sub], ls.selection.kept)
            rows = [("ls", ls.methods["ls"])]
            for a in STRENGTHS:
                cfg = LayerConfig(layer=layer, sublayer=sub, ratio=0.2, score="rcpu", method="ls_ridge",
                                  lam=ridge_lambda(problem.gram_kk, a))
                ridge = explorer.explore(lm, data, cfg, ["ls_ridge"]).analysis.methods["ls_ridge"]
                rows.append((f"ls_ridge a={a:g}", ridge))
            for name, r in rows:
                print(f"{layer:5d} {sub:9s} {name:18s} {r.error_calibration:.4f} / {r.error_heldout:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
