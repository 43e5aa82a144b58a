"""Redemptions per hour as an SVG bar chart, drawn on the server with pygal (pure Python).

Rules this module keeps:
- the chart draws exactly view.hourly()'s figures (redeemed and not redeemed, stacked), one bar
  per hour, the current hour last; nothing is computed here;
- the page shows it as an <img>: an SVG loaded as an image runs no script, so pygal's inline
  script and style are inert beyond the SVG's own drawing (the app gives that one response a
  CSP allowing its inline style); pygal's external tooltip script is never linked (js=[]).
"""

from __future__ import annotations

from typing import Any

import pygal
from pygal.style import Style

_STYLE = Style(background="#ffffff", plot_background="#ffffff", foreground="#1d2329",
               foreground_strong="#1d2329", foreground_subtle="#d9dee3",
               colors=("#1a7f37", "#c62828"), font_family="system-ui, sans-serif",
               label_font_size=11, major_label_font_size=11, legend_font_size=12)


def svg(hours: list[dict[str, Any]]) -> bytes:
    chart = pygal.StackedBar(
        js=[], style=_STYLE, width=960, height=280, margin=8, legend_at_bottom=True,
        show_y_guides=True, x_label_rotation=0, show_minor_x_labels=False,
        print_values=False, include_x_axis=True, min_scale=1, max_scale=6, order_min=0)
    chart.x_labels = [h["label"] for h in hours]
    chart.x_labels_major = [h["label"] for h in hours[::3]]
    chart.add("redeemed", [h["redeemed"] for h in hours])
    chart.add("not redeemed", [h["other"] for h in hours])
    return chart.render()
