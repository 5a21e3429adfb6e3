"""Chart geometry for the console's SVG (templates/charts.html draws it): pure arithmetic, no I/O, so the
pictures need no JavaScript and no chart library, and a test can check where a bar ends."""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

# Okabe-Ito: told apart by people with any common colour blindness.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")


def color(index: int) -> str:
    return PALETTE[index % len(PALETTE)]


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering [low, high]: steps of 1, 2 or 5 times a power of ten."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return [0.0, 1.0]
    if high <= low:
        high = low + 1
    raw = (high - low) / max(1, count)
    exponent = math.floor(math.log10(raw))
    magnitude = 10.0**exponent
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    digits = max(0, 1 - exponent)  # enough decimals for the step, no float noise (0.30000000000000004)
    first = math.floor(low / step)
    if first * step > low:  # low / step underflowed to 0 (a low of -5e-324)
        first -= 1
    ticks = [round((first + i) * step, digits) for i in range(count * 3)]
    ticks = [t for i, t in enumerate(ticks) if i == 0 or ticks[i - 1] < high]
    return ticks


def short_number(value: float) -> str:
    """12, 3.5, 12k, 1.2M: labels that fit an axis."""
    size = abs(value)
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if size >= limit:
            return f"{value / limit:.3g}{suffix}"
    return f"{value:.3g}" if size < 1000 else str(int(value))


@dataclass(frozen=True)
class Tick:
    position: float
    label: str
    anchor: str = "middle"  # SVG text-anchor: `end` for a label that would run past the right edge


CHAR_WIDTH = 7.5  # px per character of an axis label (the stylesheet's 12 px sans-serif, digits)


@dataclass(frozen=True)
class Line:
    name: str
    color: str
    path: str  # the SVG path's `d`
    points: list[tuple[float, float]]
    last: float
    dash: str = ""  # SVG stroke-dasharray ("" solid): a line drawn over another stays visible where equal


@dataclass(frozen=True)
class LineChart:
    width: int
    height: int
    left: int
    top: int
    bottom: int
    right: int
    lines: list[Line]
    x_ticks: list[Tick]
    y_ticks: list[Tick]
    empty: bool
    rows: list[tuple[str, list[float]]] = field(default_factory=list)  # the data as a table (accessible)


DASH = "6 4"


def line_chart(
    series: Mapping[str, Sequence[tuple[datetime, float]]],
    width: int = 720,
    height: int = 220,
    dashed: Collection[str] = (),
) -> LineChart:
    """Several series over the same time axis; times may differ per series. The series named in `dashed`
    are drawn dashed (put them last: drawn over the others, which show through the gaps)."""
    left, right, top, bottom = 48, width - 12, 12, height - 26
    times = sorted({t for points in series.values() for t, _ in points})
    values = [v for points in series.values() for _, v in points]
    if not times:
        return LineChart(width, height, left, top, bottom, right, [], [], [], True)
    t0, t1 = _seconds(times[0]), _seconds(times[-1])
    span = max(t1 - t0, 1.0)
    ticks = nice_ticks(0.0, max(values) if values else 1.0, 4)
    y_top = ticks[-1] or 1.0

    def x(t: datetime) -> float:
        return round(left + (right - left) * (_seconds(t) - t0) / span, 1)

    def y(v: float) -> float:
        return round(bottom - (bottom - top) * v / y_top, 1)

    lines = []
    for index, (name, points) in enumerate(series.items()):
        xy = [(x(t), y(v)) for t, v in sorted(points)]
        path = " ".join(f"{'M' if i == 0 else 'L'}{px},{py}" for i, (px, py) in enumerate(xy))
        last = sorted(points)[-1][1] if points else 0.0
        lines.append(Line(name, color(index), path, xy, last, DASH if name in dashed else ""))
    x_ticks = [
        _inside(x(t), t.astimezone(UTC).strftime("%H:%M"), width) for t in _time_ticks(times[0], times[-1])
    ]
    y_ticks = [Tick(y(v), short_number(v)) for v in ticks]
    by_time: dict[datetime, list[float]] = {t: [0.0] * len(series) for t in times}
    for index, points in enumerate(series.values()):
        for t, v in points:
            by_time[t][index] = v
    rows = [(t.astimezone(UTC).strftime("%Y-%m-%d %H:%M"), by_time[t]) for t in times]
    return LineChart(width, height, left, top, bottom, right, lines, x_ticks, y_ticks, not values, rows)


def _inside(position: float, label: str, width: int) -> Tick:
    """A tick whose label, centred, would be cut off at an edge of the picture is anchored at that edge."""
    half = len(label) * CHAR_WIDTH / 2
    if position + half > width:
        return Tick(position, label, "end")
    if position - half < 0:
        return Tick(position, label, "start")
    return Tick(position, label)


def _seconds(moment: datetime) -> float:
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def _time_ticks(first: datetime, last: datetime, count: int = 6) -> list[datetime]:
    span = _seconds(last) - _seconds(first)
    if span <= 0:
        return [first]
    step = next(
        (s for s in (60, 300, 900, 1800, 3600, 7200, 14400, 21600, 43200, 86400) if span / s <= count), 86400
    )
    start = math.ceil(_seconds(first) / step) * step
    ticks, moment = [], float(start)
    while moment <= _seconds(last):
        ticks.append(datetime.fromtimestamp(moment, UTC))
        moment += step
    return ticks


@dataclass(frozen=True)
class Bar:
    label: str
    value: float
    y: float
    length: float
    segments: list[tuple[str, float, float, float, str]] = field(
        default_factory=list
    )  # name, value, x, w, colour


@dataclass(frozen=True)
class BarChart:
    width: int
    height: int
    label_width: int
    bar_height: int
    bars: list[Bar]
    legend: list[tuple[str, str]]
    empty: bool


def bar_chart(items: Sequence[tuple[str, float]], width: int = 720, label_width: int = 200) -> BarChart:
    """Horizontal bars, one per item, longest = the largest value (a funnel is bars in its order)."""
    return stacked_bars([(label, {"": value}) for label, value in items], width, label_width)


def stacked_bars(
    items: Sequence[tuple[str, Mapping[str, float]]],
    width: int = 720,
    label_width: int = 200,
    fixed: Mapping[str, str] | None = None,
) -> BarChart:
    """One horizontal bar per item, split into segments (e.g. messages of a channel by status).
    `fixed`: a segment name's colour, so that charts side by side colour a status alike."""
    bar_height, gap = 22, 8
    names = list(dict.fromkeys(name for _, parts in items for name in parts))
    colours = {name: (fixed or {}).get(name) or color(i) for i, name in enumerate(names)}
    largest = max((sum(parts.values()) for _, parts in items), default=0.0) or 1.0
    room = width - label_width - 70
    bars = []
    for row, (label, parts) in enumerate(items):
        y, x, segments = row * (bar_height + gap), float(label_width), []
        for name, value in parts.items():
            w = round(room * value / largest, 1)
            segments.append((name, value, round(x, 1), w, colours[name]))
            x += w
        total = sum(parts.values())
        bars.append(Bar(label, total, y, round(x - label_width, 1), segments))
    height = max(1, len(items)) * (bar_height + gap)
    legend = [(name, colours[name]) for name in names if name]
    return BarChart(width, height, label_width, bar_height, bars, legend, not any(b.value for b in bars))


@dataclass(frozen=True)
class IntervalChart:
    width: int
    height: int
    zero: float
    low: float
    high: float
    point: float
    ticks: list[Tick]


def interval_chart(
    point: float, low: float, high: float, width: int = 420, height: int = 54
) -> IntervalChart:
    """A difference and its confidence interval on an axis that always shows zero (no effect)."""
    lo, hi = min(low, 0.0, point), max(high, 0.0, point)
    pad = (hi - lo) * 0.1 or 0.01
    lo, hi = lo - pad, hi + pad
    left, right = 10, width - 10

    def x(v: float) -> float:
        return round(left + (right - left) * (v - lo) / (hi - lo), 1)

    ticks = [
        Tick(x(v), f"{v:+.0%}" if abs(v) >= 0.01 or v == 0 else f"{v:+.1%}")
        for v in nice_ticks(lo, hi, 4)
        if lo <= v <= hi
    ]
    return IntervalChart(width, height, x(0.0), x(low), x(high), x(point), ticks)
