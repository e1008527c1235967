"""Charts for reports: the Pareto front of size and latency against accuracy.

Everything here is pure Python and returns inline SVG, except :func:`write_png`,
which imports matplotlib only when called.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from html import escape
from pathlib import Path
from typing import Any

from compressor.outputs import atomic_write
from compressor.results import ReportData, VariantResult, human_bytes

#: Quality measures in order of preference; the first any variant has is used for all of them.
QUALITY_MEASURES = ("accuracy", "agreement", "cosine")
_QUALITY_TITLES = {
    "accuracy": "accuracy",
    "agreement": "agreement with the original",
    "cosine": "cosine similarity to the original (mean)",
}
FONT = "system-ui, -apple-system, 'Segoe UI', sans-serif"
FRONT_COLOUR, OTHER_COLOUR, FAIL_COLOUR, BAR_COLOUR = "#1f6feb", "#8c959f", "#cf222e", "#54aeff"


@dataclass(frozen=True)
class Measure:
    """One number per variant, how to print it, and the unit its axis ticks are rounded in."""

    title: str
    read: Callable[[VariantResult], float | None]
    format: Callable[[float], str]
    bytes: bool = False
    #: No tick beyond this value (100% for shares).
    upper: float | None = None


@dataclass(frozen=True)
class Point:
    name: str
    x: float
    y: float
    over_budget: bool = False


@dataclass(frozen=True)
class Chart:
    title: str
    svg: str


def _finite(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _size(variant: VariantResult) -> float | None:
    return _finite(variant.metrics.get("size_bytes"))


def _latency_p50(variant: VariantResult) -> float | None:
    latency = variant.metrics.get("latency_ms")
    return _finite(latency.get("p50")) if isinstance(latency, Mapping) else None


def _peak_ram(variant: VariantResult) -> float | None:
    return _finite(variant.metrics.get("peak_rss_bytes"))


def _milliseconds(value: float) -> str:
    return f"{value:.3g} ms"


SIZE = Measure("size", _size, human_bytes, bytes=True)
LATENCY = Measure("latency p50", _latency_p50, _milliseconds)
PEAK_RAM = Measure("peak RAM", _peak_ram, human_bytes, bytes=True)


def quality(variant: VariantResult, key: str) -> float | None:
    value = variant.metrics.get(key)
    if key == "cosine":
        value = value.get("mean") if isinstance(value, Mapping) else None
    return _finite(value)


def quality_measure(report: ReportData) -> Measure | None:
    """Accuracy when there are labels, else agreement, else cosine similarity; None if none."""
    for key in QUALITY_MEASURES:
        if any(quality(v, key) is not None for v in report.variants if not v.error):
            read = partial(quality, key=key)
            if key == "cosine":
                return Measure(_QUALITY_TITLES[key], read, lambda v: f"{v:.4f}", upper=1.0)
            return Measure(_QUALITY_TITLES[key], read, lambda v: f"{100 * v:.2f}%", upper=1.0)
    return None


def points(report: ReportData, x: Measure, y: Measure) -> list[Point]:
    """Variants that were measured on both axes; failed variants are left out."""
    found = []
    for variant in report.variants:
        x_value, y_value = x.read(variant), y.read(variant)
        if variant.error or x_value is None or y_value is None:
            continue
        found.append(Point(variant.name, x_value, y_value, bool(variant.budget_failures)))
    return found


def pareto_front(candidates: Sequence[Point]) -> list[Point]:
    """The points no other point beats, smallest ``x`` first.

    A point is beaten when another is at most as large (or slow) and at least as
    accurate, and strictly better in one of the two; identical points both stay.
    """
    def beats(a: Point, b: Point) -> bool:
        return a.x <= b.x and a.y >= b.y and (a.x < b.x or a.y > b.y)

    front = [p for p in candidates if not any(beats(other, p) for other in candidates)]
    return sorted(front, key=lambda p: (p.x, -p.y))


def front_names(report: ReportData, x: Measure = SIZE) -> list[str]:
    """Names of the variants on the Pareto front of ``x`` against the report's quality measure:
    the best trade-offs. Variants outside a budget or with a warning are never among them."""
    y = quality_measure(report)
    if y is None:
        return []
    flagged = {v.name for v in report.variants if v.budget_failures or getattr(v, "warnings", None)}
    return [p.name for p in pareto_front([p for p in points(report, x, y) if p.name not in flagged])]


# ------------------------------------------------------------------ axes


def _tick_unit(byte_units: bool, span: float) -> float:
    """Linear ticks of byte measures fall on round KB / MB / GB values."""
    if not byte_units or span < 1024:
        return 1.0
    return 1024.0 ** min(3, int(math.log(span, 1024)))


def _linear_ticks(low: float, high: float, count: int = 5) -> list[float]:
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def _log_ticks(low: float, high: float, byte_units: bool) -> list[float]:
    if byte_units:
        candidates = [(m, m * 1024.0**k) for k in range(5) for m in (1, 2, 5, 10, 20, 50, 100, 200, 500)]
    else:
        exponents = range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
        candidates = [(m, m * 10.0**e) for e in exponents for m in (1, 2, 5)]
    ticks = [(m, value) for m, value in candidates if low <= value <= high]
    if len(ticks) > 7:
        ticks = [(m, value) for m, value in ticks if m in (1, 10, 100)]
    return [value for _, value in ticks] if len(ticks) >= 2 else _linear_ticks(low, high)


@dataclass(frozen=True)
class Axis:
    """Maps values of one measure onto pixels, on a log scale when they span 10x or more."""

    low: float
    high: float
    start: float
    end: float
    log: bool
    byte_units: bool
    upper: float | None = None

    @classmethod
    def fit(cls, values: Sequence[float], start: float, end: float, measure: Measure,
            allow_log: bool = True) -> Axis:
        low, high = min(values), max(values)
        log = allow_log and low > 0 and high / low >= 10
        if log:
            low, high = low / 1.25, high * 1.25
        else:
            pad = (high - low) * 0.08 or abs(high) * 0.05 or 1.0
            low, high = (max(low - pad, 0.0) if low >= 0 else low - pad), high + pad
        return cls(low, high, start, end, log, measure.bytes, measure.upper)

    def __call__(self, value: float) -> float:
        if self.log:
            share = math.log(value / self.low) / math.log(self.high / self.low)
        else:
            share = (value - self.low) / (self.high - self.low)
        return self.start + share * (self.end - self.start)

    def ticks(self) -> list[float]:
        if self.log:
            ticks = _log_ticks(self.low, self.high, self.byte_units)
        else:
            unit = _tick_unit(self.byte_units, self.high - self.low)
            ticks = [t * unit for t in _linear_ticks(self.low / unit, self.high / unit)]
        return [t for t in ticks if self.upper is None or t <= self.upper + 1e-12]


# ------------------------------------------------------------------ SVG


def _svg(width: int, height: int, title: str, body: list[str]) -> str:
    return "\n".join([
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" role="img" font-family="{FONT}" font-size="11">',
        f"<title>{escape(title)}</title>",
        *body,
        "</svg>",
    ])


def _text(x: float, y: float, text: str, anchor: str = "start", **attributes: str) -> str:
    extra = "".join(f' {key.replace("_", "-")}="{value}"' for key, value in attributes.items())
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}"{extra}>{escape(text)}</text>'


def scatter_svg(report: ReportData, x: Measure, y: Measure, title: str) -> str | None:
    """A scatter of ``y`` against ``x`` with the Pareto front joined and labelled."""
    plotted = points(report, x, y)
    if not plotted:
        return None
    front = pareto_front(plotted)
    on_front = {p.name for p in front}
    width, height, left, right, top, bottom = 620, 360, 70, 24, 34, 52
    x_axis = Axis.fit([p.x for p in plotted], left, width - right, x)
    y_axis = Axis.fit([p.y for p in plotted], height - bottom, top, y, allow_log=False)
    body = [
        _text(left, 18, title, font_size="13", font_weight="600"),
        f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" '
        'fill="none" stroke="#d0d7de"/>',
    ]
    for tick in x_axis.ticks():
        px = x_axis(tick)
        body.append(f'<line x1="{px:.1f}" y1="{top}" x2="{px:.1f}" y2="{height - bottom}" stroke="#eaeef2"/>')
        body.append(_text(px, height - bottom + 15, x.format(tick), "middle", fill="#57606a"))
    for tick in y_axis.ticks():
        py = y_axis(tick)
        body.append(f'<line x1="{left}" y1="{py:.1f}" x2="{width - right}" y2="{py:.1f}" stroke="#eaeef2"/>')
        body.append(_text(left - 6, py + 4, y.format(tick), "end", fill="#57606a"))
    scale = " (log scale)" if x_axis.log else ""
    body.append(_text((left + width - right) / 2, height - 14, f"{x.title}{scale}", "middle"))
    body.append(_text(14, (top + height - bottom) / 2, y.title, "middle",
                      transform=f"rotate(-90 14 {(top + height - bottom) / 2:.1f})"))
    path = " ".join(f"{x_axis(p.x):.1f},{y_axis(p.y):.1f}" for p in front)
    body.append(f'<polyline points="{path}" fill="none" stroke="{FRONT_COLOUR}" stroke-width="2"/>')
    for point in sorted(plotted, key=lambda p: p.name in on_front):
        px, py = x_axis(point.x), y_axis(point.y)
        colour = FRONT_COLOUR if point.name in on_front else OTHER_COLOUR
        ring = FAIL_COLOUR if point.over_budget else "#ffffff"
        tooltip = f"{point.name}: {x.format(point.x)}, {y.format(point.y)}"
        body.append(
            f'<circle cx="{px:.1f}" cy="{py:.1f}" r="{6 if point.name in on_front else 4.5}" '
            f'fill="{colour}" stroke="{ring}" stroke-width="2"><title>{escape(tooltip)}</title></circle>'
        )
        anchor, dx = ("end", -9) if px > width * 0.72 else ("start", 9)
        weight = "600" if point.name in on_front else "400"
        body.append(_text(px + dx, py - 7, point.name, anchor, font_weight=weight,
                          fill="#24292f" if point.name in on_front else "#57606a"))
    legend_x = width - right - 250
    body.append(f'<circle cx="{legend_x}" cy="14" r="5" fill="{FRONT_COLOUR}"/>')
    body.append(_text(legend_x + 9, 18, "Pareto front"))
    body.append(f'<circle cx="{legend_x + 95}" cy="14" r="4.5" fill="{OTHER_COLOUR}"/>')
    body.append(_text(legend_x + 104, 18, "beaten"))
    body.append(f'<circle cx="{legend_x + 160}" cy="14" r="4.5" fill="#ffffff" stroke="{FAIL_COLOUR}" stroke-width="2"/>')
    body.append(_text(legend_x + 169, 18, "over budget"))
    return _svg(width, height, title, body)


def bar_svg(report: ReportData, measure: Measure, title: str) -> str | None:
    """One horizontal bar per variant, in report order; None if no variant has the measure."""
    values = [(v, None if v.error else measure.read(v)) for v in report.variants]
    largest = max((value for _, value in values if value is not None), default=None)
    if not largest:
        return None
    longest = max(len(v.name) for v in report.variants)
    label_width = min(220, 16 + 6.5 * longest)
    row, top, value_width, width = 22, 30, 80, 620
    height = top + row * len(values) + 8
    bar_space = width - label_width - value_width
    body = [_text(4, 18, title, font_size="13", font_weight="600")]
    for index, (variant, value) in enumerate(values):
        y = top + index * row
        name = variant.name if len(variant.name) * 6.5 <= label_width - 16 else (
            variant.name[: int((label_width - 16) / 6.5) - 1] + "…"
        )
        body.append(f"<g><title>{escape(variant.name)}</title>"
                    f"{_text(label_width - 8, y + 15, name, 'end')}</g>")
        if value is None:
            body.append(_text(label_width, y + 15, "failed" if variant.error else "-", fill="#57606a"))
            continue
        length = max(1.0, bar_space * value / largest)
        colour = FAIL_COLOUR if variant.budget_failures else (OTHER_COLOUR if not variant.steps else BAR_COLOUR)
        body.append(f'<rect x="{label_width}" y="{y + 4}" width="{length:.1f}" height="{row - 8}" '
                    f'fill="{colour}" rx="2"/>')
        body.append(_text(label_width + length + 5, y + 15, measure.format(value), fill="#24292f"))
    return _svg(width, height, title, body)


def report_charts(report: ReportData) -> list[Chart]:
    """The scatter charts (when some quality is measured) then the per-variant bars."""
    drawn: list[tuple[str, str | None]] = []
    y = quality_measure(report)
    if y is not None:
        for x, name in ((SIZE, "Size"), (LATENCY, "Latency (p50)")):
            title = f"{name} vs {y.title}"
            drawn.append((title, scatter_svg(report, x, y, title)))
    for measure, name in ((SIZE, "Size"), (LATENCY, "Latency p50"), (PEAK_RAM, "Peak RAM")):
        title = f"{name} per variant"
        drawn.append((title, bar_svg(report, measure, title)))
    return [Chart(title, svg) for title, svg in drawn if svg is not None]


# ------------------------------------------------------------------ PNG


def write_png(report: ReportData, path: Path) -> bool:
    """Draw size vs quality with the Pareto front to ``path`` as PNG.

    Returns False and writes nothing when matplotlib is not installed or no
    variant has both a size and a quality measure."""
    y = quality_measure(report)
    plotted = points(report, SIZE, y) if y is not None else []
    if y is None or not plotted:
        return False
    try:
        import matplotlib  # noqa: F401 - fails fast when matplotlib is missing
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        return False
    quality_format = y.format
    front = pareto_front(plotted)
    on_front = {p.name for p in front}
    figure = Figure(figsize=(8, 5), dpi=120, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    others = [p for p in plotted if p.name not in on_front]
    axes.scatter([p.x for p in others], [p.y for p in others], color=OTHER_COLOUR, label="beaten", zorder=2)
    axes.plot([p.x for p in front], [p.y for p in front], "-o", color=FRONT_COLOUR,
              label="Pareto front", zorder=3)
    failing = [p for p in plotted if p.over_budget]
    if failing:
        axes.scatter([p.x for p in failing], [p.y for p in failing], s=140, facecolors="none",
                     edgecolors=FAIL_COLOUR, label="over budget", zorder=4)
    for point in plotted:
        axes.annotate(point.name, (point.x, point.y), textcoords="offset points", xytext=(6, 6),
                      fontsize=8, fontweight="bold" if point.name in on_front else "normal")
    x_axis = Axis.fit([p.x for p in plotted], 0, 1, SIZE)
    if x_axis.log:
        axes.set_xscale("log")
        axes.minorticks_off()
    axes.set_xticks(x_axis.ticks())
    axes.set_xlim(x_axis.low, x_axis.high)
    axes.margins(y=0.12)
    axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: human_bytes(value)))
    axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _: quality_format(value)))
    axes.set_xlabel("size")
    axes.set_ylabel(y.title)
    axes.set_title(f"{report.model}: size vs {y.title}", fontsize=10)
    axes.grid(True, color="#eaeef2")
    axes.legend(fontsize=8)
    atomic_write(path, lambda temporary: figure.savefig(temporary, format="png"))
    return True
