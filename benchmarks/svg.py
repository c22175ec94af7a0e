"""Small dependency-free SVG line charts (offline, a few kB, rendered by any Markdown viewer)."""

from __future__ import annotations

import math
from html import escape

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39")
DASHES = ("", "6,3", "2,2", "8,3,2,3")


def _nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    if high <= low:
        high = low + 1.0
    raw = (high - low) / count
    step = 10 ** math.floor(math.log10(raw))
    for mult in (1, 2, 5, 10):
        if raw <= mult * step:
            step *= mult
            break
    start = math.floor(low / step) * step
    ticks = []
    value = start
    while True:
        ticks.append(round(value, 10))
        if value >= high - step * 1e-9:
            return ticks
        value += step


def _fmt(value: float) -> str:
    return f"{value:g}" if abs(value) < 1e5 else f"{value:.2e}"


def line_chart(
    series: dict[str, list[tuple[float, float]]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    log_x: bool = False,
    hline: tuple[float, str] | None = None,
    log_y: bool | None = None,
    width: int = 720,
    height: int = 380,
) -> str:
    """An SVG document: one polyline with markers per series, legend on the right.

    ``log_y=None`` picks a log y axis when the values span more than a factor of 5.
    """
    left, right, top, bottom = 60, 210, 34, 46
    plot_w, plot_h = width - left - right, height - top - bottom
    xs = [x for pts in series.values() for x, _ in pts]
    ys = [y for pts in series.values() for _, y in pts if y is not None and math.isfinite(y)]
    if hline:
        ys.append(hline[0])
    if not xs or not ys:
        xs, ys = [0.0, 1.0], [0.0, 1.0]
    if log_y is None:
        log_y = min(ys) > 0 and max(ys) / min(ys) > 5
    fx = (lambda v: math.log10(v)) if log_x else (lambda v: v)
    fy = (lambda v: math.log10(v)) if log_y else (lambda v: v)
    x_low, x_high = min(fx(x) for x in xs), max(fx(x) for x in xs)
    if x_high == x_low:
        x_low, x_high = x_low - 0.5, x_high + 0.5
    pad = 0.05 * (x_high - x_low)
    x_low, x_high = x_low - pad, x_high + pad
    if log_y:
        lo, hi = min(ys), max(ys)
        grid = sorted(m * 10.0**e for e in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1)
                      for m in (1, 2, 5))
        y_ticks = [t for t in grid if max(g for g in grid if g <= lo) <= t <= min(g for g in grid if g >= hi)]
    else:
        y_ticks = _nice_ticks(min(ys), max(ys))
    y_low, y_high = y_ticks[0], y_ticks[-1]
    if y_high == y_low:
        y_high = y_low + 1.0

    def px(x: float) -> float:
        return left + (fx(x) - x_low) / (x_high - x_low) * plot_w

    def py(y: float) -> float:
        return top + (1 - (fy(y) - fy(y_low)) / (fy(y_high) - fy(y_low))) * plot_h

    out = [
        (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">'),
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{left}" y="20" font-size="14" font-weight="bold">{escape(title)}</text>',
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>',
    ]
    for t in y_ticks:
        y = py(t)
        out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>')
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{_fmt(t)}</text>')
    for x in sorted(set(xs)):
        X = px(x)
        out.append(f'<line x1="{X:.1f}" x2="{X:.1f}" y1="{top}" y2="{top + plot_h}" stroke="#eee"/>')
        out.append(f'<text x="{X:.1f}" y="{top + plot_h + 16}" text-anchor="middle">{_fmt(x)}</text>')
    out.append(f'<text x="{left + plot_w / 2:.1f}" y="{height - 8}" text-anchor="middle">{escape(xlabel)}</text>')
    out.append(f'<text x="14" y="{top + plot_h / 2:.1f}" text-anchor="middle" '
               f'transform="rotate(-90 14 {top + plot_h / 2:.1f})">{escape(ylabel)}</text>')
    if hline:
        y = py(hline[0])
        out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="black" '
                   f'stroke-dasharray="4,4"/>')
        out.append(f'<text x="{left + 4}" y="{y - 4:.1f}">{escape(hline[1])}</text>')
    for i, (name, pts) in enumerate(series.items()):
        color = PALETTE[i % len(PALETTE)]
        dash = DASHES[i % len(DASHES)]
        style = f' stroke-dasharray="{dash}"' if dash else ""
        valid = sorted((x, y) for x, y in pts if y is not None and math.isfinite(y))
        if len(valid) > 1:
            coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in valid)
            out.append(f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="2"{style}/>')
        for x, y in valid:
            out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3.5" fill="{color}"/>')
        ly = top + 8 + 16 * i
        lx = left + plot_w + 14
        out.append(f'<line x1="{lx}" x2="{lx + 22}" y1="{ly}" y2="{ly}" stroke="{color}" stroke-width="2"{style}/>')
        out.append(f'<text x="{lx + 28}" y="{ly + 4}">{escape(name)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
