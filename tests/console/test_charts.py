"""The chart geometry the console's SVG is drawn from: where bars end and lines go, checked by hand."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from rulesvc.web.console.charts import bar_chart, interval_chart, line_chart, nice_ticks, stacked_bars


@given(st.floats(-1e6, 1e6), st.floats(1e-2, 1e9))
def test_ticks_cover_the_range_in_round_steps(low: float, width: float) -> None:
    high = low + width
    ticks = nice_ticks(low, high)
    assert ticks[0] <= low and ticks[-1] >= high
    steps = {round(b - a, 6) for a, b in itertools.pairwise(ticks)}
    assert len(steps) <= 2  # one step (float rounding may show it twice)
    assert len(ticks) <= 12


def test_bars_are_proportional() -> None:
    chart = bar_chart([("entered", 200), ("sent", 150), ("opened", 50), ("clicked", 0)])
    lengths = [b.length for b in chart.bars]
    assert lengths[0] == chart.width - chart.label_width - 70  # the largest fills the room
    assert abs(lengths[1] / lengths[0] - 0.75) < 0.01 and abs(lengths[2] / lengths[0] - 0.25) < 0.01
    assert lengths[3] == 0 and not chart.empty
    assert bar_chart([("a", 0)]).empty


def test_stacked_segments_follow_each_other() -> None:
    chart = stacked_bars([("email", {"sent": 30, "suppressed": 10}), ("sms", {"sent": 5})])
    email = chart.bars[0]
    (_, _, x1, w1, c1), (_, _, x2, _, c2) = email.segments
    assert x1 == chart.label_width and abs(x2 - (x1 + w1)) < 0.2 and c1 != c2
    assert [name for name, _ in chart.legend] == ["sent", "suppressed"]
    assert chart.bars[1].segments[0][4] == c1  # one colour per status across bars


def test_line_chart_spans_the_axis() -> None:
    start = datetime(2026, 11, 26, tzinfo=UTC)
    chart = line_chart({"events/s": [(start + timedelta(hours=h), float(h)) for h in range(25)]})
    points = chart.lines[0].points
    assert points[0][0] == chart.left and points[-1][0] == chart.right
    assert points[0][1] == chart.bottom  # 0 at the bottom
    assert min(y for _, y in points) >= chart.top  # the largest value stays inside
    assert chart.rows[3] == ("2026-11-26 03:00", [3.0])
    assert line_chart({}).empty


def test_interval_always_shows_zero() -> None:
    chart = interval_chart(0.05, 0.02, 0.08)
    assert chart.zero < chart.low < chart.point < chart.high
    chart = interval_chart(-0.01, -0.04, 0.02)
    assert chart.low < chart.zero < chart.high


def test_time_labels_stay_inside_the_picture() -> None:
    # 24 h ending on a whole hour: the last tick sits on the right end of the axis, 12 px from the edge,
    # where a centred "04:00" would be cut off.
    end = datetime(2026, 11, 27, 4, 0, tzinfo=UTC)
    series = {"events/s": [(end - timedelta(minutes=15 * i), 1.0) for i in range(96)]}
    for width in (1200, 720, 300):
        chart = line_chart(series, width=width)
        assert chart.x_ticks[-1].label == "04:00" and chart.x_ticks[-1].position == chart.right
        for tick in chart.x_ticks:
            text = len(tick.label) * 7.5  # px, 11 px digits are ~6 px wide: the estimate is generous
            start = {"start": 0.0, "middle": text / 2, "end": text}[tick.anchor]
            assert 0 <= tick.position - start and tick.position - start + text <= width, (width, tick)
        assert chart.x_ticks[-1].anchor == "end"
        assert {t.anchor for t in chart.x_ticks[1:-1]} == {"middle"}


def test_a_dashed_line_is_marked_so() -> None:
    start = datetime(2026, 11, 26, tzinfo=UTC)
    same = [(start + timedelta(minutes=15 * i), 2.0) for i in range(4)]
    chart = line_chart({"accepted": same, "decided": same}, dashed=["decided"])
    accepted, decided = chart.lines
    assert accepted.path == decided.path  # equal values: one drawn over the other
    assert accepted.dash == "" and decided.dash  # so the one on top has gaps


def test_fixed_colours_keep_a_status_alike_across_charts() -> None:
    items = [("email", {"waiting": 4}), ("push", {"suppressed": 4})]
    first = stacked_bars(items, fixed={"suppressed": "#E69F00"})
    second = stacked_bars([("email", {"suppressed": 2})], fixed={"suppressed": "#E69F00"})
    assert first.legend == [("waiting", "#0072B2"), ("suppressed", "#E69F00")]
    assert second.legend == [("suppressed", "#E69F00")]  # not the first colour of the palette
