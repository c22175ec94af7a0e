"""A grid of Plotly subplots laid out as one dict and validated once.

``plotly.subplots.make_subplots`` and ``update_xaxes(row=, col=)`` validate every
property path on every call: a four-panel figure spends about ten times as long in
them as in building the same figure from one layout dict, and the layout
explorer redraws three or four such figures on every widget change. ``Grid`` takes
the same calls the figures make (traces, axis properties and vertical lines per
panel) and builds the ``go.Figure`` at the end, with make_subplots' layout: axes
``xaxis``, ``xaxis2``, ... numbered row by row from the top left, each anchored to
its partner, panel titles as paper annotations above each panel.
"""

from __future__ import annotations

from collections.abc import Sequence

import plotly.graph_objects as go
from plotly.basedatatypes import BasePlotlyType


def _nested(props: dict) -> dict:
    """``title_text="..."`` (Plotly's underscore shorthand for the title) as ``{"title": {"text": ...}}``."""
    out: dict = {}
    for key, value in props.items():
        if key.startswith("title_"):
            out.setdefault("title", {})[key[len("title_"):]] = value
        else:
            out[key] = value
    return out


def set_props(obj, props: dict) -> None:
    """``obj.update(props)`` for a Plotly object (a figure's ``layout``, an axis): nested dicts merge into
    what is set, other values replace it. Each property is set and validated once; ``update`` and
    ``update_layout`` run Plotly's batch-update machinery, about ten times slower for a figure's layout."""
    for key, value in props.items():
        child = obj[key] if isinstance(value, dict) and key in obj else None
        if isinstance(child, BasePlotlyType):
            set_props(child, value)
        else:
            obj[key] = value


def _unit(value: float) -> float:
    """A domain end in [0, 1] (the spacing sums round a hair outside it)."""
    return min(max(value, 0.0), 1.0)


class Grid:
    """``rows`` x ``cols`` panels; ``shared_xaxes`` ties each column's x axes (labels on the bottom
    row only), ``shared_yaxes`` each row's y axes (labels on the first column only)."""

    def __init__(self, rows: int = 1, cols: int = 1, titles: Sequence[str] = (),
                 horizontal_spacing: float | None = None, vertical_spacing: float | None = None,
                 shared_xaxes: bool = False, shared_yaxes: bool = False):
        self.rows, self.cols = rows, cols
        h = 0.2 / cols if horizontal_spacing is None else horizontal_spacing
        v = 0.3 / rows if vertical_spacing is None else vertical_spacing
        width, height = (1 - h * (cols - 1)) / cols, (1 - v * (rows - 1)) / rows
        self.traces: list = []
        self.shapes: list[dict] = []
        self.layout: dict = {}
        annotations = []
        for r in range(1, rows + 1):
            for c in range(1, cols + 1):
                x, y = self._names(r, c)
                x0, y1 = (c - 1) * (width + h), 1 - (r - 1) * (height + v)
                xaxis = {"anchor": y, "domain": [_unit(x0), _unit(x0 + width)]}
                yaxis = {"anchor": x, "domain": [_unit(y1 - height), _unit(y1)]}
                if shared_xaxes and r < rows:
                    xaxis.update(matches=self._names(rows, c)[0], showticklabels=False)
                if shared_yaxes and c > 1:
                    yaxis.update(matches=self._names(r, 1)[1], showticklabels=False)
                self.layout[self._key(x)], self.layout[self._key(y)] = xaxis, yaxis
                index = (r - 1) * cols + c - 1
                if index < len(titles) and titles[index]:
                    annotations.append({"text": titles[index], "x": x0 + width / 2, "y": y1, "xref": "paper",
                                        "yref": "paper", "xanchor": "center", "yanchor": "bottom",
                                        "showarrow": False, "font": {"size": 16}})
        if annotations:
            self.layout["annotations"] = annotations

    def _names(self, row: int, col: int) -> tuple[str, str]:
        n = (row - 1) * self.cols + col
        suffix = "" if n == 1 else str(n)
        return "x" + suffix, "y" + suffix

    @staticmethod
    def _key(axis: str) -> str:
        return axis[0] + "axis" + axis[1:]

    def add_trace(self, trace, row: int = 1, col: int = 1) -> Grid:
        x, y = self._names(row, col)
        trace.update(xaxis=x, yaxis=y)
        self.traces.append(trace)
        return self

    def _update(self, which: int, props: dict, row: int | None, col: int | None) -> Grid:
        for r in range(1, self.rows + 1):
            for c in range(1, self.cols + 1):
                if (row is None or row == r) and (col is None or col == c):
                    axis = self.layout[self._key(self._names(r, c)[which])]
                    for key, value in _nested(props).items():
                        if isinstance(value, dict) and isinstance(axis.get(key), dict):
                            axis[key].update(value)
                        else:
                            axis[key] = value
        return self

    def update_xaxes(self, row: int | None = None, col: int | None = None, **props) -> Grid:
        return self._update(0, props, row, col)

    def update_yaxes(self, row: int | None = None, col: int | None = None, **props) -> Grid:
        return self._update(1, props, row, col)

    def add_vline(self, x: float, line: dict, row: int = 1, col: int = 1) -> Grid:
        xa, ya = self._names(row, col)
        self.shapes.append({"type": "line", "x0": x, "x1": x, "xref": xa, "y0": 0, "y1": 1, "yref": f"{ya} domain",
                            "line": line})
        return self

    def figure(self, **layout) -> go.Figure:
        """The figure, with ``layout`` (shapes and annotations added to the grid's own)."""
        full = {**self.layout, **layout}
        full["shapes"] = self.shapes + list(layout.get("shapes", []))
        full["annotations"] = self.layout.get("annotations", []) + list(layout.get("annotations", []))
        return go.Figure(data=self.traces, layout=full)
