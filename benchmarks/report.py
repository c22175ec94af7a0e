"""``docs/benchmarks.md`` and its SVG plots, written from the JSON result files only."""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

from . import BENCHMARKS
from .common import format_goal
from .svg import line_chart

MB = 2**20


# The sections in the order of their numbers; stream has its own command, python -m benchmarks.stream
DOC_ORDER = ("floor", "explorer", "memory", "eval", "quality", "size", "auto", "stream", "appcost")
assert set(BENCHMARKS) <= set(DOC_ORDER), "every benchmark has a section"


def load_results(results_dir: Path) -> dict[str, dict]:
    results = {}
    for name in DOC_ORDER:
        path = results_dir / f"{name}.json"
        if path.exists():
            results[name] = json.loads(path.read_text())
    return results


def _num(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _verdict(met) -> str:
    return {True: "met", False: "**missed**", None: "n/a"}[met]


def _provenance(r: dict, wall_note: str = "") -> str:
    m = r["machine"]
    return (f"_{r.get('mode', 'full')} mode, {r['date']}, {r['wall_s']:.0f} s{wall_note}; {m['nproc']} CPUs "
            f"({m['cpu']}), "
            f"torch {m['torch']} with {m['torch_threads']} threads, load average at the end "
            f"{', '.join(str(x) for x in m['load_average'])}._")


def _goal_rows(goals: list[dict]) -> list[str]:
    rows = ["| goal | measured | target | verdict |", "|---|---|---|---|"]
    for g in goals:
        rows.append(f"| {g['name']} | {_num(g['value'])}{g['unit']} | {g['op']} {g['target']:g}{g['unit']} "
                    f"| {_verdict(g['met'])} |")
    return rows


def _floor(r: dict) -> list[str]:
    cal = r["calibration"]
    split = r["prune_split_s"]
    lines = [
        "## 1. Pruning cost against the forward-pass floor", "", _provenance(r), "",
        (f"Same calibration tokens for both: {cal['samples']} samples x {cal['seq_len']} tokens "
        f"({cal['tokens']:,} tokens). Forward = `LayerFlow` capture + every decoder layer once "
        "(no LM head). Prune = `prune_model` with rcpu:rotation, both targets, ratio 0.2, no held-out "
        f"windows. Best of {len(r['forward_runs_s'])} run(s) each."), "",
        "| | seconds | / forward |", "|---|---|---|",
        f"| forward pass | {r['forward_s']:.2f} | 1.00 |",
        f"| whole-model prune | {r['prune_s']:.2f} | {r['ratio']:.2f} |",
    ]
    for key, value in (r.get("prune_detail_s") or split).items():
        lines.append(f"| &nbsp;&nbsp;{key} | {value:.2f} | {value / r['forward_s']:.2f} |")
    lines += ["", ("`prune_model`'s own split is statistics (each dense layer run with the Gram hooks), "
                   "compensation and recompute (the pruned layer run again); the inner steps are timed by "
                   "wrapping `rcpu.stats.StatsAccumulator.add` (Gram), `rcpu.compensate.procrustes` (SVD), "
                   "`rcpu.prune._errors` and `rcpu.prune.apply_plan` (surgery). `other` is the model copy, "
                   "the layer-0 capture and the final layout."), ""]
    floor = r.get("flop_floor")
    if floor:
        lines += [(f"**Floor.** The work a prune cannot avoid, counted in FLOPs and converted at this run's own "
                   f"forward rate ({floor['forward_gflops']:.1f} GFLOP/s): the dense run up to `down_proj`'s input "
                   "(statistics need the dense layer's inputs), both Gram products (float32, blocks on and above "
                   "the diagonal) and the pruned `o_proj` and MLP on the kept units (the kept heads' attention is "
                   f"reused), is {floor['floor_ratio']:.2f} forwards ({floor['floor_s']:.1f} s), before any "
                   "compensation. "
                   + ("So prune / forward <= 1.3 is below this floor; " if floor["floor_ratio"] > 1.3 else "")
                   + f"prune / floor is {floor['prune_over_floor']:.2f}."), ""]
    precision = r.get("gram_precision")
    if precision:
        lines += [("**Float32 Gram products** (each batch's product in float32, summed into float64, exact "
                  "diagonal) against all-float64 products on the same inputs:"), "",
                  ("| layer | sublayer | tokens | Gram rel. Frobenius | max abs(dG) / sqrt(G_ii G_jj) | "
                  "rotation W' rel. diff | rotation error diff | ls W' rel. diff | ls error diff |"),
                  "|---|---|---|---|---|---|---|---|---|"]
        for p in precision:
            lines.append(f"| {p['layer']} | {p['sublayer']} | {p['tokens']:,} | {p['gram_rel_frobenius']:.1e} | "
                         f"{p['gram_max_scaled']:.1e} | {p['rotation_weight_rel']:.1e} | "
                         f"{p['rotation_error_diff']:.1e} | {p['ls_weight_rel']:.1e} | {p['ls_error_diff']:.1e} |")
        lines.append("")
    return lines + _goal_rows(r["goals"]) + [""]


def _explorer(r: dict) -> list[str]:
    e = r["embedded"]
    rates = r["matmul_flop_per_s"]
    lines = [
        "## 2. Explorer latency (one sublayer, statistics in memory)", "", _provenance(r), "",
        (f"`analyze_sublayer` with score {r['score']}, method {r['method']}, ratio {r['ratio']}: compensation "
        "and every diagnostic. Embedded: layer "
        f"{e['layer']} with real statistics ({e['calibration_tokens']:,} calibration tokens). Large shapes: random "
        f"weights, Gram = n (diag(d) + B B^T + mu mu^T) with B of {r['large']['rank']} columns, "
        f"{r['large']['sample_tokens']} sample tokens."
        + (" The embedded runs follow one untimed run in the same process (the app's server is warm; the "
           "floor below is timed after a warm-up too)." if e.get("untimed_first_runs") else "")), "",
        "| sublayer | d_out x d_in | kept k | runs | median total s | median compensate s | compensate GFLOP/s |",
        "|---|---|---|---|---|---|---|",
    ]
    split = []
    for sub in ("down_proj", "o_proj"):
        s = e[sub]
        lines.append(f"| {e['model']} {sub} | {s['d_out']} x {s['d_in']} | {s['k']} | {len(s['runs'])} | "
                     f"{s['median_total_s']:.3f} | {s['median_compensate_s']:.3f} | |")
        if "median_change_s" in s:
            f = s["floor"]
            split.append(f"| {e['model']} {sub} | {s['median_open_sublayer_s']:.3f} | {f['open_sublayer_s']:.3f} | "
                         f"{s['median_change_s']:.3f} | {f['change_s']:.3f} |")
    for sub, s in r["large"].items():
        if not isinstance(s, dict):
            continue
        label = r["large"].get("label", "7B")
        if "median_change_s" in s:
            f = s["floor"]
            split.append(f"| {label}-shape {sub} | {s['median_open_sublayer_s']:.2f} | {f['open_sublayer_s']:.2f} | "
                         f"{s['median_change_s']:.2f} | {f['change_s']:.2f} |")
        lines.append(f"| {label}-shape {sub} | {s['d_out']} x {s['d_in']} | {s['k']} | {len(s['runs'])} | "
                     f"{s['median_total_s']:.2f} | {s['median_compensate_s']:.2f} | "
                     f"{s['compensation_flop_per_s'] / 1e9:.1f} |")
    lines += [
        "",
        (f"Machine matmul rate in the same run ({rates['size']}^3): float64 {rates['float64'] / 1e9:.1f} GFLOP/s, "
        f"float32 {rates['float32'] / 1e9:.1f} GFLOP/s. Compensation FLOPs are counted as W G[:,K] "
        f"2 d_out d_in k + M 2 d_out^2 k + SVD {r['large']['svd_flops_constant']} d_out^3 + U V^T 2 d_out^3 + "
        "Q W_K 2 d_out^2 k; the library computes them in float64, so the goal compares with the float64 rate."),
        "",
    ]
    if split:
        lines += [
            ("The embedded total splits into opening the sublayer (`prepare_sublayer`: `W G` for both token sets, "
             "`Y`'s principal directions and sample outputs, which the layer explorer keeps per sublayer) and "
             "the change itself (selection, compensation, every diagnostic), which is what each later ratio, score "
             "or method costs. The floor is the float64 work neither can skip, timed in the same run on random "
             "matrices of the same shapes: opening, two `W G` products and one `eigh`; a change, the SVD of `M`, "
             "`eigh` of `Z`'s covariance and `eigvalsh` of `Q`'s symmetric part (LAPACK's solvers use one core "
             "at these sizes). Where open floor + change floor exceeds a goal, the goal cannot be met in float64 "
             "on this machine."), "",
            "| sublayer | open s | open floor s | change s | change floor s |", "|---|---|---|---|---|", *split, "",
        ]
    page = r.get("page_update")
    if page:
        lines += _page_lines(page)
    sv = r.get("svd_threads")
    if sv:
        counts = [k for k in sv if k.startswith("threads_")]
        lines += [f"SVD of a {sv['n']} x {sv['n']} float64 matrix: "
                  + ", ".join(f"{sv[k]:.3f} s with {k.split('_')[1]} thread(s)" for k in counts) + ".", ""]
    return lines + _goal_rows(r["goals"]) + [""]


def _page_lines(page: dict) -> list[str]:
    lines = [
        (f"**Layer explorer page** (layer {page['layer']}, methods {', '.join(page['methods'])}): the page's "
         "whole script rerun under Streamlit's `AppTest` after one widget change to settings not seen before "
         f"{'in a process of its own, as the app server runs it (section 9 says why), ' if page.get('fresh') else ''}"
         "(statistics in memory; the browser's drawing of the charts is not included). Seconds per rerun:"),
        "",
        "| sublayer | view | view switch | changes (ratio, ratio, score per pass) | median |",
        "|---|---|---|---|---|",
    ]
    for sub, s in page["sublayers"].items():
        for view, v in s["views"].items():
            switches = ", ".join(f"{x:.2f}" for x in v["view_switch_s"])
            cells = ", ".join(f"{c['s']:.2f}" for c in v["changes"])
            lines.append(f"| {sub} | {view} | {switches} | {cells} | {v['median_s']:.2f} |")
    lines += ["", f"Over every change: median {page['median_s']:.2f} s, slowest {page['max_s']:.2f} s.", ""]
    browser = page.get("browser")
    if browser and "skipped" in browser:
        lines += [f"In a real browser: skipped ({browser['skipped']}).", ""]
    elif browser:
        lines += [
            ("**In a real browser**: the same page served by `streamlit run` and driven by headless Chromium "
             "(software rendering) on the same machine, so the server and the browser share its cores. Seconds "
             "from an arrow key on the ratio slider until the run has finished and two frames are drawn; "
             "\"browser busy\" is the browser's main-thread time in tasks over 50 ms (drawing, layout) meanwhile. "
             "Medians of two new ratios per view:"),
            "",
            "| sublayer | view | key press to idle page | browser busy |",
            "|---|---|---|---|",
        ]
        for sub, s in browser["sublayers"].items():
            for view, v in s["views"].items():
                lines.append(f"| {sub} | {view} | {v['median_s']:.2f} | {v['median_browser_busy_s']:.2f} |")
        lines += ["", (f"Over every change: median {browser['median_s']:.2f} s, of which the browser was busy "
                       f"{browser['median_browser_busy_s']:.2f} s."), ""]
    return lines


def _memory(r: dict) -> list[str]:
    small, large = r["samples"]
    runs = r["runs"]
    seq = r["settings"]["seq_len"]
    lines = [
        "## 3. Peak memory of a whole-model prune", "", _provenance(r), "",
        ("Each prune (rcpu:rotation, both targets, ratio 0.2) runs in a fresh subprocess; peak RSS is its "
        "`VmHWM`. The subprocesses run with glibc's mmap threshold fixed at 64 KiB, so that a freed large "
        "buffer leaves the process and the peak is the peak of memory in use, not of the allocator's "
        "reuse of freed buffers (`benchmarks/memory.py`)."), "",
        "| calibration | peak RSS before prune MiB | peak RSS MiB | prune s |", "|---|---|---|---|",
    ]
    for n in (small, large):
        run = runs[str(n)]
        lines.append(f"| {n} x {seq} | {run['maxrss_before_prune'] / MB:.0f} | {run['maxrss'] / MB:.0f} | "
                     f"{run['prune_s']:.1f} |")
    lines += [
        "",
        (f"Growth {r['measured_growth_bytes'] / MB:.1f} MiB; expected {r['expected_growth_bytes'] / MB:.1f} MiB = "
        f"{large - small} extra samples x {seq} tokens x hidden {runs[str(large)]['hidden']} x 4 bytes x "
        f"{r['flow_buffers']} hidden-state buffer(s) kept by `LayerFlow`."), "",
    ]
    return lines + _goal_rows(r["goals"]) + [""]


def _eval(r: dict) -> list[str]:
    lines = [
        "## 4. Evaluation throughput", "", _provenance(r), "",
        (f"{r['windows']} windows of {r['seq_len']} tokens from the held-out text, best of "
        f"{len(r['rcpu']['runs_tokens_per_s'])} alternating run(s) each."), "",
        "| | batch | tokens/s | perplexity |", "|---|---|---|---|",
        (f"| `rcpu.evaluate.perplexity` | {r['rcpu']['batch_size']} | {r['rcpu']['tokens_per_s']:.0f} | "
        f"{r['rcpu']['ppl']:.4f} |"),
        (f"| plain `model(input_ids, labels=...)` loop | {r['plain']['batch_size']} | "
        f"{r['plain']['tokens_per_s']:.0f} | {r['plain']['ppl']:.4f} |"), "",
    ]
    return lines + _goal_rows(r["goals"]) + [""]


def _quality(r: dict, img_dir: Path, docs_dir: Path) -> list[str]:
    cal = r["calibration"]
    lines = [
        "## 5. Quality", "", _provenance(r), "",
        (f"Calibration: {cal['samples']} x {cal['seq_len']} tokens of `{cal['data']}` (seed {cal['seed']}); "
        f"targets both; evaluation windows: {r['eval_windows'] or 'all'} of {r['settings']['seq_len']} tokens. "
        "Points come from `rcpu.sweep.run_sweep` and its cache."), "",
    ]
    for i, (label, table) in enumerate(r["tables"].items()):
        rows = table["rows"]
        ratios = sorted({row["ratio"] for row in rows})
        configs = list(dict.fromkeys(row["config"] for row in rows))
        by = {(row["config"], row["ratio"]): row["ppl"] for row in rows}
        dense = table["dense"]["ppl"] if table.get("dense") else None
        lines += [f"### Perplexity on {label} (dense {_num(dense, 4)})", "",
                  "| config | " + " | ".join(f"ratio {x:g}" for x in ratios) + " |",
                  "|---|" + "---|" * len(ratios)]
        for c in configs:
            lines.append(f"| {c} | " + " | ".join(_num(by.get((c, x)), 4) for x in ratios) + " |")
        name = f"bench-quality-ratio-{i}.svg"
        svg = line_chart({c: [(x, by.get((c, x))) for x in ratios] for c in configs},
                         title=f"Perplexity vs ratio ({label})", xlabel="pruning ratio", ylabel="perplexity",
                         hline=(dense, "dense") if dense else None)
        (img_dir / name).write_text(svg)
        lines += ["", f"![perplexity vs ratio]({os.path.relpath(img_dir / name, docs_dir)})", ""]
    curve = r["curve"]
    rows = curve["rows"]
    sizes = sorted({row["calib_samples"] for row in rows})
    configs = list(dict.fromkeys(row["config"] for row in rows))
    by = {(row["config"], row["calib_samples"]): row["ppl"] for row in rows}
    lines += [f"### Calibration-size curve (ratio {curve['ratio']:g})", "",
              "| config | " + " | ".join(f"{n} samples" for n in sizes) + " |", "|---|" + "---|" * len(sizes)]
    for c in configs:
        lines.append(f"| {c} | " + " | ".join(_num(by.get((c, n)), 4) for n in sizes) + " |")
    dense = curve["dense"]["ppl"] if curve.get("dense") else None
    svg = line_chart({c: [(n, by.get((c, n))) for n in sizes] for c in configs},
                     title=f"Perplexity vs calibration samples (ratio {curve['ratio']:g})",
                     xlabel=f"calibration samples (x {r['settings']['seq_len']} tokens, log scale)",
                     ylabel="perplexity", log_x=True, hline=(dense, "dense") if dense else None)
    (img_dir / "bench-quality-calibration.svg").write_text(svg)
    lines += ["", (f"![perplexity vs calibration size]"
              f"({os.path.relpath(img_dir / 'bench-quality-calibration.svg', docs_dir)})"), ""]
    if r["goals"]:
        lines += ["Expected ordering on small models (method page, section 7):", ""] + _goal_rows(r["goals"])
    return lines + [""]


def _per_layer(values: list[int]) -> str:
    if len(set(values)) == 1:
        return f"{values[0]}"
    return f"{min(values)}-{max(values)} (sum {sum(values)})"


def _size(r: dict) -> list[str]:
    models = r["models"]
    small, large = models["small"], models["large"]
    shape = r["large_shape"]
    lines = [
        "## 6. What pruning buys: size, KV cache and speed", "", _provenance(r), "",
        (f"Measured by `python -m benchmarks size{'' if r['mode'] == 'full' else ' --' + r['mode']}`. The app's "
        "whole-model page shows this table and, for the model it has just pruned, the same measures "
        "(`rcpu.footprint`)."), "",
        (f"Dense against pruned at ratios {', '.join(f'{x:g}' for x in r['ratios'])}, both targets, score "
         f"`{r['score']}`, method `{r['method']}` (compensation changes the kept weights' values, not which rows "
         "and columns are kept, so shapes, sizes and speed are the same for every method). Models: "
         f"`{small['label']}`, and `{large['label']}` with random weights and LLaMA-7B layer shapes (hidden "
         f"{shape['hidden']}, {shape['heads']} heads, {shape['kv_heads']} KV heads, head_dim {shape['head_dim']}, "
         f"intermediate {shape['intermediate']}) but {shape['layers']} layer(s) and a vocabulary of "
         f"{shape['vocab']}. Parameters count tied embeddings once; on disk is the folder "
         "`rcpu.export.save_pruned` writes (safetensors and config, no tokenizer); KV cache = 2 x KV heads x "
         "head_dim x dtype bytes, summed over layers; heads and channels are per layer (one number when every "
         "layer has the same). Forward: one batch of random-id windows, logits at every position. Generate: "
         "`generate` with greedy decoding and `use_cache=True`, batch 1. Tokens/s are the best of "
         f"{r['settings']['size_repeats']} repeat(s), the dense and pruned models taking turns within each "
         "repeat; \"x dense\" is pruned / dense from the same run. On a machine shared with other work "
         "(see the load average) absolute tokens/s are noisy; the ratios less so."), "",
    ]
    reasons: dict[str, int] = {}
    for m in (small, large):
        cal, fwd, gen = m["calibration"], m["forward"], m["generate"]
        lines += [
            (f"**{m['label']}**: calibration {cal['windows']} x {cal['seq_len']} tokens ({cal['text']}); forward "
             f"{fwd['windows']} x {fwd['seq_len']} tokens; generate {gen['new_tokens']} new tokens after a "
             f"{gen['prompt']}-token prompt."), "",
            ("| ratio | parameters | x dense | attention parameters | on disk MiB | KV cache B/token | query heads "
             "| KV heads | MLP channels | stock-loadable | forward tok/s | x dense | generate tok/s | x dense |"),
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for key, row in m["rows"].items():
            if row["stock_loadable"]:
                stock = f"yes ({row['stock_class']})"
            else:
                note = reasons.setdefault(row["why_not_stock"], len(reasons) + 1)
                stock = f"no [{note}]"
            lines.append(
                f"| {key} | {row['params']:,} | {row['params_vs_dense']:.3f} | {row['attention_params']:,} | "
                f"{row['disk_bytes'] / MB:.1f} | {row['kv_bytes_per_token']:,} | {_per_layer(row['heads'])} | "
                f"{_per_layer(row['kv_heads'])} | {_per_layer(row['channels'])} | {stock} | "
                f"{row['forward_tokens_per_s']:,.0f} | {row['forward_vs_dense']:.2f} | "
                f"{row['generate_tokens_per_s']:,.1f} | {row['generate_vs_dense']:.2f} |")
        lines.append("")
    if reasons:
        lines += [f"[{n}] not stock-loadable (`rcpu.load_pruned` reads the folder): {why}"
                  for why, n in reasons.items()] + [""]
    return lines + _goal_rows(r["goals"]) + [""]


def _size_note(q: dict) -> str:
    return (f"embedded calibration {q['size_calib'][0]} x {q['size_calib'][1]} tokens, forward "
            f"{q['size_forward'][0]} x {q['size_forward'][1]}; 7B-shaped model with {q['size_large']['layers']} "
            f"layer(s) (instead of 2), forward {q['size_large_forward'][0]} x {q['size_large_forward'][1]}; "
            f"{q['size_new_tokens']} generated tokens; best of {q['size_repeats']} repeat(s)")


def _auto(r: dict) -> list[str]:
    """Section 7: auto and the greedy allocation against every fixed compensation."""
    folds = r.get("folds", 4)  # results written before the count was recorded used four folds
    this_run = [row for table in r["tables"].values() if table.get("date") == r["date"] for row in table["rows"]]
    wall_note = (" (every point it tabulated was in the cache, computed earlier: a table's own seconds per point "
                 "say what its points cost)" if this_run and all(row.get("cached") for row in this_run) else "")
    lines = [
        "## 7. Auto compensation and greedy allocation", "", _provenance(r, wall_note), "",
        (f"Measured by `python -m benchmarks auto{'' if r['mode'] == 'full' else ' --' + r['mode']}`; "
         "`--regime NAME` measures one table alone and keeps the others, so each table says when it was "
         "measured."), "",
        ("Every row is score `rcpu` (the same units removed), both targets; only the compensation differs. "
         "`auto` fits each candidate (rotation, rotation_scale, rotation_bias, bias, ls, ls_ridge at "
         f"lambda = a * trace(G[K,K]) / k of the fit, for a in 1e-4..1) on {folds - 1} of {folds} folds of the "
         "calibration windows, measures it on the last (each fold in turn), and refits the winner on all of "
         "them (a ridge winner with the absolute lambda its fits used). `greedy` removes exactly the "
         "uniform ratio's number of heads and of channels, placed where that fold error (relative to the "
         "residual stream's energy) rises least on the dense model, no sublayer going further above its "
         "uniform count than the spread (1x, which is uniform, to 2.5x) whose trial prune had the lowest loss "
         "on every 4th calibration window, held back; rows marked \"fixed 2.5x cap\" were measured before "
         "the spread was chosen. Perplexity is on the held-out part of the "
         "embedded text, read only after the pruned model exists. A greedy model's layers differ in shape, so "
         "no stock config holds it (`rcpu.export.stock_verdict`); `rcpu.load_pruned` loads it. With the "
         "embedded model's GQA (9 query heads on 3 KV heads) uniform pruning is stock-loadable only with "
         "`--gqa-balanced`; greedy never is. The totals are equal in heads and channels, not always in "
         "parameters: with GQA a KV head goes with the last query head of its group, so a greedy model that "
         "empties a KV group removes more parameters than uniform (compare the parameters after, below); "
         "the compensation may also add an output bias (d_out parameters) where bias or rotation_bias wins."), "",
        ("How far to trust a ratio: on 16 evaluation windows of 128 tokens, one standard error of the paired "
         "perplexity ratio of two pruned models was 2 to 9% in the runs of `python -m benchmarks.auto_noise` "
         "([auto.md](auto.md)), so a 2% goal is decided by the point estimate, not resolved by the windows."), "",
    ]
    for name, table in r["tables"].items():
        rows = table["rows"]
        ratios = sorted({*r.get("ratios", []), *(row["ratio"] for row in rows)})
        dense = table["dense"]["ppl"] if table.get("dense") else None
        lines += [
            (f"**{name}**: {table['calib_samples']} x {table['seq_len']} calibration tokens "
             f"({table['tokens_per_down_proj_input']:.2f} per `down_proj` input), {table['eval_windows']} "
             f"evaluation windows; dense perplexity {_num(dense)}"
             f"{'; measured ' + table['date'] if table.get('date') else ''}."), "",
            "| config | " + " | ".join(f"ppl at {x:g}" for x in ratios) + " |",
            "|---|" + "---|" * len(ratios),
        ]
        configs = list(dict.fromkeys(row["config"] for row in rows))
        by = {(row["config"], row["ratio"]): row for row in rows}
        for config in configs:
            cells = []
            for x in ratios:
                row = by.get((config, x))
                cells.append(_num(row["ppl"]) if row else "")
            lines.append(f"| {config} | " + " | ".join(cells) + " |")
        auto_s = [row["seconds"] for row in rows if row["config"] == "rcpu:auto" and row.get("seconds")]
        fixed_s = [row["seconds"] for row in rows if row.get("method") != "auto" and row.get("seconds")]
        greedy_s = [row["seconds"] for row in rows if row.get("allocation") == "greedy" and row.get("seconds")]
        if auto_s and fixed_s:
            greedy_text = f", `auto [greedy]` median {statistics.median(greedy_s):.0f}" if greedy_s else ""
            lines += ["", (f"Seconds per point (prune and evaluation, when computed): `auto` median "
                           f"{statistics.median(auto_s):.0f}{greedy_text}, fixed methods median "
                           f"{statistics.median(fixed_s):.0f} "
                           f"({statistics.median(auto_s) / statistics.median(fixed_s):.1f}x).")]
        if table.get("missing_points"):
            lines.append(f"{table['missing_points']} point(s) of this table were not measured in this run "
                         "(`--cached-only` tabulates the points already computed; empty cells).")
        lines.append("")
        for x in ratios:
            auto_row = by.get(("rcpu:auto", x))
            greedy = next((row for row in rows if row["ratio"] == x and row.get("allocation") == "greedy"), None)
            parts = []
            if auto_row and auto_row.get("auto_wins"):
                wins = "; ".join(f"`{sub}`: " + ", ".join(f"{c} {n}" for c, n in sorted(w.items(), key=lambda i: -i[1]))
                                 for sub, w in auto_row["auto_wins"].items())
                parts.append(f"auto's choices (layers won) {wins}")
            if auto_row and greedy:
                alloc = greedy.get("allocated") or {}
                totals = ", ".join(f"`{sub}` {a['total_removed']} units (uniform {a['uniform_total_removed']}), "
                                   f"per layer {min(a['removed'])}-{max(a['removed'])}"
                                   for sub, a in alloc.items() if isinstance(a, dict) and "removed" in a)
                spread = alloc.get("spread")
                chosen = ""
                if spread:
                    losses = ", ".join(f"{f}x {nll:.3f}" for f, nll in spread["heldback_nll"].items())
                    chosen = (f" (spread {spread['chosen']:g}x, chosen on {spread['heldback_windows']} held-back "
                              f"calibration windows, mean NLL of the trials: {losses})")
                parts.append(f"greedy removed {totals}{chosen}; parameters after: greedy "
                             f"{_num(greedy['params_after'])}, uniform {_num(auto_row['params_after'])}")
            if parts:
                lines.append(f"- ratio {x:g}: " + "; ".join(parts) + ".")
        lines.append("")
    return lines + _goal_rows(r["goals"]) + [""]


def _stream(r: dict) -> list[str]:
    shape = r["shape"]
    after = ", ".join(f"{x:.2f}" for x in r.get("rss_after_each_layer_gb", []))
    t = r.get("timing_s", {})
    split = ", ".join(f"{k} {v:.0f} s" for k, v in t.items() if k != "total")
    return [
        "## 8. Layer streaming: a model larger than the memory the run may use", "", _provenance(r), "",
        (f"Measured by `python -m benchmarks.stream --layers {r['layers']} --budget-gb {r['budget_gb']:g} "
         f"--targets {r['targets']}`. A random-weight LLaMA with LLaMA-7B layer shapes (hidden {shape['hidden']}, "
         f"{shape['heads']} heads, intermediate {shape['intermediate']}, vocabulary {shape['vocab']}) and "
         f"{r['layers']} layers, one safetensors file per layer, is pruned by `rcpu.stream.stream_prune` (rcpu "
         f"score, rotation, ratio 0.2, calibration {r['calibration'][0]} x {r['calibration'][1]} random tokens) "
         "in a fresh process whose data segment is capped (`RLIMIT_DATA`) at its size after imports plus the "
         "budget, below the model's float32 weights: one layer is read, its statistics gathered, compensated, "
         "written and dropped before the next."), "",
        ("| layers | float32 weights GiB | cap above start GiB | peak RSS GiB | pruned on disk GiB | parameters "
         "before | after | seconds |"), "|---|---|---|---|---|---|---|---|",
        (f"| {r['layers']} | {r['weights_gb']:.2f} | {r['budget_gb']:g} | {r['peak_rss_gb']:.2f} | "
         f"{r['pruned_on_disk_gb']:.2f} | {_num(r['params_before'])} | {_num(r['params_after'])} | "
         f"{r['seconds']:.0f} |"), "",
        f"Resident memory after each layer (GiB): {after}. Time: {split}.", "",
    ] + _stream_peak(r) + _goal_rows(r["goals"]) + [""]


def _appcost(r: dict) -> list[str]:
    calib, seq = r["calibration"]
    browser = r["runs"][0]["how"] == "browser"
    rows = [f"| {i + 1} | {x['cli_s']:.1f} | "
            + (f"{x['cli_beside_browser_s']:.1f} | {x['browser_idle_cpu_s']:.1f} | " if browser else "")
            + f"{x['app_s']:.1f} | " + (f"{x['browser_cpu_s']:.1f} | " if browser else "")
            + f"{x['app_s'] / x['cli_s']:.3f} |" for i, x in enumerate(r["runs"])]
    app_text = ("the whole-model page served by `streamlit run` and driven by headless Chromium, timed from "
                "pressing its button to an idle page showing the result (the same prune and evaluation, plus the "
                "live chart of the errors, the progress text, the sweep point it saves and the result view; the "
                "browser draws on the same two cores, and its processes' CPU seconds meanwhile are in the table). "
                "Before the page's run, with the page open and idle in the browser, `rcpu prune` ran once more: "
                "a browser uses CPU even on an idle page here (headless Chromium draws in software), so this is "
                "the floor for any page on this machine"
                if browser else "the whole-model page under Streamlit's `AppTest` in a fresh process, from its "
                "button to the end of its script run")
    return [
        "## 9. The app's whole-model prune against the CLI's", "", _provenance(r), "",
        (f"Measured by `python -m benchmarks appcost{'' if r['mode'] == 'full' else ' --' + r['mode']}`, at the "
         f"app's defaults ({r['config']} at ratio {r['ratio']:g}, both targets, {calib} x {seq} calibration "
         f"tokens, {r['heldout_samples']} held-out windows, perplexity on the whole held-out part: "
         f"{_num(r['eval_tokens'])} tokens). In turns, CLI first: `rcpu prune` on the same settings in a fresh "
         "process, timed by its own clock (`timing_s.total`: the prune and its evaluation, the model already "
         f"loaded), then {app_text}. The dense perplexity was cached before both."), "",
        ("| turn | CLI prune + evaluation s | "
         + ("CLI beside the idle page s | browser CPU s meanwhile | " if browser else "") + "app s | "
         + ("browser CPU s meanwhile | " if browser else "") + "app / CLI |"),
        "|---|---|---|---|" + ("---|---|---|" if browser else ""), *rows, "",
    ] + _thread_check(r.get("thread_check")) + _goal_rows(r["goals"]) + [""]


def _thread_check(t: dict | None) -> list[str]:
    if not t:
        return []
    return [("Why the benchmarks run a page in a fresh process (`benchmarks.common.run_fresh`): a float64 SVD of "
             f"{t['svd_n']} x {t['svd_n']} (median of 9) "
             f"took {t['thread_only_s']:.3f} s in a new thread while the main thread was idle, and "
             f"{t['thread_after_main_s']:.3f} s in a new thread after the main thread had run the same SVDs "
             f"({t['main_s']:.3f} s there), in fresh processes of the same run."), ""]


def _stream_peak(r: dict) -> list[str]:
    """What the peak holds beyond the memory between layers: one layer's weights and float64 work."""
    after = r.get("rss_after_each_layer_gb")
    if not after:
        return []
    from rcpu.config import TARGETS

    shape = r["shape"]
    h, attention = shape["hidden"], (2 * shape["heads"] + 2 * shape["kv_heads"]) * shape["head_dim"]
    layer = (h * attention + 3 * h * shape["intermediate"]) * 4 / 2**30  # q, k, v, o and the MLP in float32
    d_in = max(shape["intermediate"] if t == "down_proj" else h for t in TARGETS[r["targets"]])
    return [(f"Between layers the process holds {max(after):.2f} GiB (embeddings, LM head, hidden states), the "
             f"same after every layer. The peak, {r['peak_rss_gb'] - max(after):.2f} GiB above that, is reached "
             f"while one layer is pruned: its float32 weights ({layer:.2f} GiB) and the float64 statistics and "
             f"products of its compensation (the Gram of the {d_in}-wide input alone is "
             f"{d_in**2 * 8 / 2**30:.2f} GiB); more layers add to the file, not to it."), ""]


def _reduced(results: dict[str, dict]) -> list[str]:
    """One line per benchmark that ran in a reduced mode, from its own recorded settings."""
    notes = []
    for name, r in results.items():
        if r.get("mode", "full") == "full":
            continue
        q = r["settings"]
        if name == "size":  # its settings are not in the result files written before it existed
            notes.append(f"size ({r['mode']}): {_size_note(q)}")
            continue
        if name == "auto":
            sizes = "; ".join(f"{k} {t['calib_samples']} x {t['seq_len']} calibration tokens, {t['eval_windows']} "
                              "evaluation windows" for k, t in r["tables"].items())
            notes.append(f"auto ({r['mode']}): {sizes}")
            continue
        text = {
            "floor": f"{q['floor_samples']} calibration samples of {q['seq_len']} tokens, best of "
                     f"{q['floor_repeats']} run(s)",
            "explorer": f"median of {q['explorer_repeats']} runs for the embedded sublayers; large shapes "
                        f"{', '.join(f'{k} {v[0]}x{v[1]}' for k, v in q['large_shapes'].items())}, "
                        f"{q['large_repeats']} run(s)",
            "memory": f"{q['memory_samples'][0]} and {q['memory_samples'][1]} calibration samples "
                      f"(instead of 32 and 128)",
            "eval": f"{q['eval_windows']} windows, best of {q['eval_repeats']} run(s)",
            "quality": f"configs {', '.join(q['configs'])} at ratio(s) {', '.join(str(x) for x in q['ratios'])}, "
                       f"{q['quality_eval_windows']} evaluation windows; curve of {', '.join(q['curve_configs'])} "
                       f"at {', '.join(str(n) for n in q['curve_samples'])} samples",
            "appcost": f"{q.get('app_repeats', 1)} turn(s) (instead of 3)",
        }[name]
        notes.append(f"{name} ({r['mode']}): {text}")
    return notes


def write_docs(results_dir: Path, docs_path: Path, command: str) -> Path:
    results = load_results(results_dir)
    docs_dir = docs_path.parent
    img_dir = docs_dir / "img"
    img_dir.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Benchmarks", "",
        (f"Written by `{command}` from the JSON files in `{os.path.relpath(results_dir, docs_dir)}/`; "
         "do not edit by hand. Every number here was measured by `python -m benchmarks`; each section "
         "says when, in which mode and on what machine. Speed goals are ratios measured within one run, "
         "so they compare like with like even on a busy machine (see the load average)."), "",
        "| benchmark | goal | measured | verdict | mode |", "|---|---|---|---|---|",
    ]
    for name, r in results.items():
        for g in r.get("goals", []):
            lines.append(f"| {name} | {g['name']} {g['op']} {g['target']:g}{g['unit']} | "
                         f"{_num(g['value'])}{g['unit']} | {_verdict(g['met'])} | {r.get('mode', 'full')} |")
    lines.append("")
    notes = _reduced(results)
    if notes:
        lines += [("Reduced settings of the sections run with `--quick` or `--tiny` (the full run uses "
                  "the sizes the issue asks for):"), ""] + [f"- {n}" for n in notes] + [""]
    sections = {"floor": _floor, "explorer": _explorer, "memory": _memory, "eval": _eval, "size": _size,
                "auto": _auto, "stream": _stream, "appcost": _appcost}
    for name, r in results.items():
        if name == "quality":
            lines += _quality(r, img_dir, docs_dir)
        else:
            lines += sections[name](r)
    docs_path.parent.mkdir(parents=True, exist_ok=True)
    docs_path.write_text("\n".join(lines).rstrip() + "\n")
    return docs_path


def print_goals(result: dict) -> None:
    for g in result.get("goals", []):
        print("  " + format_goal(g))
