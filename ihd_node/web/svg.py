"""Small server-rendered SVG charts (no script, no external assets): line and step charts, grouped bars, the
calibration diagonal. Shared by the console's /performance page and the validation report, so both draw the
same figures. Every chart is one <svg> string with a <title> and axis labels; values are data, text is escaped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape

from markupsafe import Markup

PALETTE = ("#1f3a5f", "#c8553d", "#2a9d8f", "#8d6a9f", "#e9a03b", "#5c5c5c")
WIDTH, HEIGHT = 420, 300
MARGIN = (48, 16, 22, 44)  # left, right, top, bottom


@dataclass
class Line:
    label: str
    points: Sequence[tuple[float, float]]
    color: str = PALETTE[0]
    step: bool = False  # a step chart (post: each value holds until the next x)
    dots: bool = True
    # optional vertical error bars: (x, low, high) in data units
    bars: Sequence[tuple[float, float, float]] = field(default_factory=list)
    dashed: bool = False


@dataclass(frozen=True)
class Axes:
    x_range: tuple[float, float]
    y_range: tuple[float, float]
    width: int = WIDTH
    height: int = HEIGHT
    bottom: int = MARGIN[3]  # room under the plot for the tick labels and the axis title

    def x(self, value: float) -> float:
        lo, hi = self.x_range
        return MARGIN[0] + (value - lo) / ((hi - lo) or 1.0) * (self.width - MARGIN[0] - MARGIN[1])

    def y(self, value: float) -> float:
        lo, hi = self.y_range
        return self.height - self.bottom - (value - lo) / ((hi - lo) or 1.0) * (self.height - MARGIN[2] - self.bottom)


def _fmt(v: float) -> str:
    return f"{v:.1f}"


def _frame(axes: Axes, title: str, x_label: str, y_label: str, x_ticks: Sequence[float],
           y_ticks: Sequence[float], x_tick_labels: Sequence[str] | None = None) -> list[str]:
    w, h = axes.width, axes.height
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {w} {h}" width="{w}" height="{h}" '
           f'role="img" aria-label="{escape(title)}"><title>{escape(title)}</title>',
           f'<rect x="0" y="0" width="{w}" height="{h}" fill="#fff"/>']
    x0, x1, y0, y1 = axes.x(axes.x_range[0]), axes.x(axes.x_range[1]), axes.y(axes.y_range[0]), axes.y(axes.y_range[1])
    for t in y_ticks:
        y = axes.y(t)
        out.append(f'<line x1="{_fmt(x0)}" y1="{_fmt(y)}" x2="{_fmt(x1)}" y2="{_fmt(y)}" stroke="#e4e4e4"/>')
        out.append(f'<text x="{_fmt(x0 - 4)}" y="{_fmt(y + 4)}" font-size="11" text-anchor="end">{t:.3g}</text>')
    slanted = axes.bottom > MARGIN[3]  # crowded category labels are written at a slant
    for i, t in enumerate(x_ticks):
        x = axes.x(t)
        label = x_tick_labels[i] if x_tick_labels else f"{t:g}"
        if slanted:
            out.append(f'<text x="{_fmt(x)}" y="{_fmt(y0 + 12)}" font-size="10" text-anchor="end" '
                       f'transform="rotate(-35 {_fmt(x)} {_fmt(y0 + 12)})">{escape(label)}</text>')
        else:
            out.append(f'<text x="{_fmt(x)}" y="{_fmt(y0 + 14)}" font-size="11" text-anchor="middle">'
                       f'{escape(label)}</text>')
    out.append(f'<path d="M{_fmt(x0)},{_fmt(y1)} V{_fmt(y0)} H{_fmt(x1)}" fill="none" stroke="#333"/>')
    out.append(f'<text x="{_fmt((x0 + x1) / 2)}" y="{h - 6}" font-size="12" text-anchor="middle">'
               f'{escape(x_label)}</text>')
    out.append(f'<text x="12" y="{_fmt((y0 + y1) / 2)}" font-size="12" text-anchor="middle" '
               f'transform="rotate(-90 12 {_fmt((y0 + y1) / 2)})">{escape(y_label)}</text>')
    return out


def _legend(out: list[str], axes: Axes, items: Sequence[tuple[str, str]]) -> None:
    x = axes.x(axes.x_range[0]) + 8
    for i, (label, color) in enumerate(items):
        y = MARGIN[2] + 4 + 14 * i
        out.append(f'<rect x="{_fmt(x)}" y="{y}" width="10" height="10" fill="{color}"/>'
                   f'<text x="{_fmt(x + 14)}" y="{y + 9}" font-size="11">{escape(label)}</text>')


def line_chart(title: str, lines: Sequence[Line], *, x_label: str, y_label: str,
               x_range: tuple[float, float] = (0.0, 1.0), y_range: tuple[float, float] = (0.0, 1.0),
               diagonal: bool = False, ticks: int = 5, empty: str = "no data yet") -> Markup:
    """Lines (or steps) over data ranges; `diagonal` draws y = x (the calibration ideal) dashed."""
    axes = Axes(x_range, y_range)
    step_x = (x_range[1] - x_range[0]) / ticks
    step_y = (y_range[1] - y_range[0]) / ticks
    out = _frame(axes, title, x_label, y_label, [x_range[0] + i * step_x for i in range(ticks + 1)],
                 [y_range[0] + i * step_y for i in range(ticks + 1)])
    if diagonal:
        out.append(f'<line class="diagonal" x1="{_fmt(axes.x(x_range[0]))}" y1="{_fmt(axes.y(y_range[0]))}" '
                   f'x2="{_fmt(axes.x(x_range[1]))}" y2="{_fmt(axes.y(y_range[1]))}" stroke="#999" '
                   'stroke-dasharray="4 3"/>')
    drawn = False
    for line in lines:
        pts = [(x, y) for x, y in line.points if x is not None and y is not None]
        if not pts:
            continue
        drawn = True
        d = f"M{_fmt(axes.x(pts[0][0]))},{_fmt(axes.y(pts[0][1]))}"
        for x, y in pts[1:]:
            if line.step:
                d += f" H{_fmt(axes.x(x))} V{_fmt(axes.y(y))}"
            else:
                d += f" L{_fmt(axes.x(x))},{_fmt(axes.y(y))}"
        dash = ' stroke-dasharray="5 3"' if line.dashed else ""
        out.append(f'<path class="series" data-label="{escape(line.label)}" d="{d}" fill="none" '
                   f'stroke="{line.color}" stroke-width="2"{dash}/>')
        for x, lo, hi in line.bars:
            out.append(f'<line class="interval" x1="{_fmt(axes.x(x))}" y1="{_fmt(axes.y(lo))}" x2="{_fmt(axes.x(x))}" '
                       f'y2="{_fmt(axes.y(hi))}" stroke="{line.color}" stroke-opacity=".6"/>')
        if line.dots:
            for x, y in pts:
                out.append(f'<circle class="point" cx="{_fmt(axes.x(x))}" cy="{_fmt(axes.y(y))}" r="3" '
                           f'fill="{line.color}"><title>{escape(line.label)}: {x:.3g}, {y:.3g}</title></circle>')
    if not drawn:
        out.append(f'<text x="{_fmt(axes.width / 2)}" y="{_fmt(axes.height / 2)}" font-size="13" '
                   f'text-anchor="middle" fill="#777">{escape(empty)}</text>')
    _legend(out, axes, [(line.label, line.color) for line in lines if line.label])
    out.append("</svg>")
    return Markup("".join(out))


def bar_chart(title: str, categories: Sequence[str], groups: Sequence[tuple[str, Sequence[float], str]], *,
              y_label: str, y_max: float | None = None, empty: str = "no data yet") -> Markup:
    """Grouped bars: one group of bars per category (e.g. reference and current share of each bin)."""
    values = [v for _, vals, _ in groups for v in vals]
    top = y_max if y_max is not None else max([*values, 0.0]) or 1.0
    n = max(len(categories), 1)
    labels = [c if len(c) <= 18 else c[:17] + "…" for c in categories]
    width = max(WIDTH, 40 * n + 80)
    crowded = sum(6.5 * len(c) + 8 for c in labels) > width - MARGIN[0] - MARGIN[1]
    bottom = MARGIN[3] + int(5.5 * max((len(c) for c in labels), default=0)) if crowded else MARGIN[3]
    axes = Axes((0.0, float(n)), (0.0, top), width=width, height=HEIGHT + bottom - MARGIN[3], bottom=bottom)
    out = _frame(axes, title, "", y_label, [i + 0.5 for i in range(len(categories))],
                 [top * i / 4 for i in range(5)], labels)
    if not values or not categories:
        out.append(f'<text x="{_fmt(axes.width / 2)}" y="{_fmt(axes.height / 2)}" font-size="13" '
                   f'text-anchor="middle" fill="#777">{escape(empty)}</text>')
    slot = (axes.x(1.0) - axes.x(0.0)) * 0.8 / max(len(groups), 1)
    for g, (label, vals, color) in enumerate(groups):
        for i, v in enumerate(vals):
            x = axes.x(float(i)) + (axes.x(1.0) - axes.x(0.0)) * 0.1 + g * slot
            y = axes.y(v)
            out.append(f'<rect class="bar" x="{_fmt(x)}" y="{_fmt(y)}" width="{_fmt(slot * 0.9)}" '
                       f'height="{_fmt(axes.y(0.0) - y)}" fill="{color}"><title>{escape(label)} · '
                       f'{escape(categories[i])}: {v:.3g}</title></rect>')
    _legend(out, axes, [(label, color) for label, _, color in groups])
    out.append("</svg>")
    return Markup("".join(out))
