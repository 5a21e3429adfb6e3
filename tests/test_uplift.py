"""The uplift statistics agree with independent implementations (statsmodels, scipy) and published values.

The judge never calls `rulesvc.core.uplift` to get its expected numbers: intervals come from statsmodels
and scipy, Welch's interval from the raw per-entry values (not the sums the module reads), and worked
examples from Newcombe's 1998 papers.
"""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from statsmodels.stats.proportion import confint_proportions_2indep, proportion_confint

from rulesvc.core.uplift import (
    METHOD,
    MIN_CONVERSIONS,
    MIN_ENTRIES,
    Group,
    compare,
    katz_ratio,
    newcombe_difference,
    student_t_quantile,
    welch_difference,
    wilson,
)

CONFIDENCES = st.sampled_from([0.8, 0.9, 0.95, 0.99])


@st.composite
def counts(draw: st.DrawFn, max_n: int = 5000) -> tuple[int, int]:
    """(x, n) with the edges drawn often: x = 0, x = n, n = 1."""
    n = draw(st.one_of(st.integers(1, 5), st.integers(1, max_n)))
    x = draw(st.one_of(st.just(0), st.just(n), st.integers(0, n)))
    return x, n


def close(a: float, b: float, rel: float = 1e-9, abs_: float = 1e-12) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=abs_)


@settings(max_examples=300, deadline=None)
@given(counts(), CONFIDENCES)
def test_wilson_matches_statsmodels(xn: tuple[int, int], confidence: float) -> None:
    x, n = xn
    low, high = proportion_confint(x, n, alpha=1 - confidence, method="wilson")
    got = wilson(x, n, confidence)
    assert close(got.low, float(low)) and close(got.high, float(high)), (got, low, high)
    assert 0.0 <= got.low <= x / n <= got.high <= 1.0


@pytest.mark.parametrize(
    ("x", "n", "low", "high"),
    [(81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718)],
)
def test_wilson_published_examples(x: int, n: int, low: float, high: float) -> None:
    """Newcombe (1998), "Two-sided confidence intervals for the single proportion", method 3."""
    got = wilson(x, n)
    assert (round(got.low, 4), round(got.high, 4)) == (low, high)


@settings(max_examples=300, deadline=None)
@given(counts(), counts(), CONFIDENCES)
def test_newcombe_matches_statsmodels(a: tuple[int, int], b: tuple[int, int], confidence: float) -> None:
    (x1, n1), (x2, n2) = a, b
    low, high = confint_proportions_2indep(
        x1, n1, x2, n2, method="newcomb", compare="diff", alpha=1 - confidence
    )
    got = newcombe_difference(x1, n1, x2, n2, confidence)
    assert close(got.low, float(low)) and close(got.high, float(high)), (got, low, high)
    assert -1.0 <= got.low <= x1 / n1 - x2 / n2 <= got.high <= 1.0


@pytest.mark.parametrize(
    ("x1", "n1", "x2", "n2", "low", "high"),
    [
        (56, 70, 48, 80, 0.0524, 0.3339),
        (9, 10, 3, 10, 0.1705, 0.8090),
        (5, 56, 0, 29, -0.0381, 0.1926),
        (0, 10, 0, 20, -0.1611, 0.2775),
        (0, 10, 0, 10, -0.2775, 0.2775),
        (10, 10, 0, 20, 0.6791, 1.0),
        (10, 10, 0, 10, 0.6075, 1.0),
    ],
)
def test_newcombe_published_examples(x1: int, n1: int, x2: int, n2: int, low: float, high: float) -> None:
    """Newcombe (1998), "Interval estimation for the difference between independent proportions",
    Table II, method 10 (hybrid score, no continuity correction)."""
    got = newcombe_difference(x1, n1, x2, n2)
    assert (round(got.low, 4), round(got.high, 4)) == (low, high)


@settings(max_examples=300, deadline=None)
@given(counts(), counts(), CONFIDENCES)
def test_katz_matches_statsmodels_log_ratio(
    a: tuple[int, int], b: tuple[int, int], confidence: float
) -> None:
    (x1, n1), (x2, n2) = a, b
    got = katz_ratio(x1, n1, x2, n2, confidence)
    if x1 == 0 or x2 == 0:
        assert got is None
        return
    low, high = confint_proportions_2indep(
        x1, n1, x2, n2, method="log", compare="ratio", alpha=1 - confidence
    )
    assert got is not None
    assert close(got.low, float(low)) and close(got.high, float(high)), (got, low, high)
    assert got.low <= (x1 / n1) / (x2 / n2) <= got.high


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(st.floats(0.5, 50), st.floats(50, 1e6), st.integers(1, 1000).map(float)),
    st.one_of(st.sampled_from([0.9, 0.95, 0.975, 0.995, 0.9995]), st.floats(0.0001, 0.9999)),
)
def test_t_quantile_matches_scipy(df: float, p: float) -> None:
    expected = float(stats.t.ppf(p, df))
    assert close(student_t_quantile(p, df), expected, rel=1e-8, abs_=1e-12)


@pytest.mark.parametrize("df", [2e6, 9.99e6, 1.01e7, 1e8, 1e12])
@pytest.mark.parametrize("p", [0.6, 0.975, 0.9995, 0.99995])
def test_t_quantile_huge_df_within_one_in_a_million(df: float, p: float) -> None:
    assert close(student_t_quantile(p, df), float(stats.t.ppf(p, df)), rel=1e-6)


def test_t_quantile_textbook_values() -> None:
    """The t table every statistics book prints: two-sided 95% for 1, 10 and 30 degrees of freedom."""
    assert [round(student_t_quantile(0.975, df), 3) for df in (1, 10, 30)] == [12.706, 2.228, 2.042]
    assert student_t_quantile(0.5, 7) == 0.0
    assert student_t_quantile(0.025, 10) == -student_t_quantile(0.975, 10)


def _values(entries: int, conversions: list[float]) -> list[float]:
    """Per-entry revenue: the conversions' values, then 0 for every entry without one."""
    return conversions + [0.0] * (entries - len(conversions))


def _group(name: str, values: list[float], conversions: int) -> Group:
    return Group(name, len(values), conversions, sum(values), sum(v * v for v in values))


money = st.floats(0.01, 5000).map(lambda v: round(v, 2))


@st.composite
def revenue_group(draw: st.DrawFn) -> tuple[int, list[float]]:
    converted = draw(st.lists(money, min_size=0, max_size=60))
    entries = len(converted) + draw(st.integers(0, 400))
    return entries, converted


@settings(max_examples=200, deadline=None)
@given(revenue_group(), revenue_group(), CONFIDENCES)
def test_welch_matches_scipy_on_raw_values(
    a: tuple[int, list[float]], b: tuple[int, list[float]], confidence: float
) -> None:
    treated, control = _values(*a), _values(*b)
    if len(treated) < 2 or len(control) < 2 or (len(set(treated)) == 1 and len(set(control)) == 1):
        return  # no variance: covered by test_welch_without_variation_has_no_interval
    t, c = _group("b", treated, len(a[1])), _group("a", control, len(b[1]))
    got = welch_difference(t.entries, t.revenue, t.revenue_sq, c.entries, c.revenue, c.revenue_sq, confidence)
    result = stats.ttest_ind(treated, control, equal_var=False)
    expected = result.confidence_interval(confidence_level=confidence)
    assert got.interval is not None and got.df is not None
    assert close(got.difference, sum(treated) / len(treated) - sum(control) / len(control), abs_=1e-9)
    assert close(got.df, float(result.df), rel=1e-6)
    assert close(got.interval.low, float(expected.low), rel=1e-6, abs_=1e-7), (got, expected)
    assert close(got.interval.high, float(expected.high), rel=1e-6, abs_=1e-7), (got, expected)


def test_welch_without_variation_has_no_interval() -> None:
    got = welch_difference(200, 0.0, 0.0, 300, 0.0, 0.0)
    assert got.difference == 0.0 and got.interval is None and got.df is None and "same revenue" in got.why
    one = welch_difference(1, 5.0, 25.0, 300, 30.0, 900.0)
    assert one.interval is None and "fewer than 2" in one.why


def test_welch_one_sided_variance_uses_the_other_groups_df() -> None:
    """A control that never converts has no variance: df is then n - 1 of the treatment (scipy agrees)."""
    treated = _values(150, [20.0, 35.5, 12.25, 80.0, 9.99, 44.0])
    control = [0.0] * 120
    t, c = _group("b", treated, 6), _group("holdout", control, 0)
    got = welch_difference(t.entries, t.revenue, t.revenue_sq, c.entries, c.revenue, c.revenue_sq)
    expected = stats.ttest_ind(treated, control, equal_var=False).confidence_interval()
    assert got.df == pytest.approx(149) and got.interval is not None
    assert got.interval.low == pytest.approx(float(expected.low), rel=1e-6)
    assert got.interval.high == pytest.approx(float(expected.high), rel=1e-6)


def _json(comparison: object) -> str:
    return json.dumps(comparison, allow_nan=False)


def test_compare_a_clear_winner() -> None:
    treated = _values(2000, [25.0] * 120 + [60.0] * 30)
    control = _values(2000, [25.0] * 70 + [60.0] * 10)
    result = compare(_group("b", treated, 150), _group("holdout", control, 80))

    assert result.enough_data and result.note == ""
    assert result.treatment.name == "b" and result.control.name == "holdout"
    assert result.treatment.rate == 150 / 2000 and result.control.rate == 80 / 2000
    wl, wh = proportion_confint(150, 2000, method="wilson")
    rate = result.treatment.rate_interval
    assert rate is not None and close(rate.low, float(wl)) and close(rate.high, float(wh))

    low, high = confint_proportions_2indep(150, 2000, 80, 2000, method="newcomb", compare="diff")
    absolute = result.absolute_uplift
    assert absolute.value == pytest.approx(0.035) and absolute.interval is not None
    assert close(absolute.interval.low, float(low)) and close(absolute.interval.high, float(high))
    assert float(low) > 0 and result.significant

    rl, rh = confint_proportions_2indep(150, 2000, 80, 2000, method="log", compare="ratio")
    relative = result.relative_uplift
    assert relative.value == pytest.approx(150 / 80 - 1) and relative.interval is not None
    assert close(relative.interval.low, float(rl) - 1) and close(relative.interval.high, float(rh) - 1)

    assert result.treatment.revenue_per_entry == pytest.approx(sum(treated) / 2000)
    expected = stats.ttest_ind(treated, control, equal_var=False)
    revenue = result.revenue_per_entry_difference
    assert revenue.interval is not None and result.revenue_df == pytest.approx(float(expected.df), rel=1e-6)
    assert revenue.interval.low == pytest.approx(float(expected.confidence_interval().low), rel=1e-6)
    json.loads(_json(result.to_dict()))


def test_compare_no_difference_is_not_significant() -> None:
    result = compare(Group("b", 5000, 250, 2500.0, 25000.0), Group("a", 5000, 248, 2480.0, 24800.0))
    assert result.enough_data and not result.significant
    interval = result.absolute_uplift.interval
    assert interval is not None and interval.low < 0 < interval.high and not interval.excludes(0.0)


def test_small_samples_are_never_significant_and_say_what_is_missing() -> None:
    # 40/50 against 0/50 would exclude 0 by a mile; 50 entries are still below the minimum.
    result = compare(Group("b", 50, 40, 400.0, 4000.0), Group("holdout", 50, 0))
    low, _ = confint_proportions_2indep(40, 50, 0, 50, method="newcomb", compare="diff")
    assert float(low) > 0 and result.absolute_uplift.interval is not None  # computed, shown...
    assert not result.enough_data and not result.significant  # ...but not trusted
    assert result.note.startswith("Not enough data")
    assert "group 'b' has 50 entries (needs 100)" in result.note
    assert "group 'holdout' has 50 entries (needs 100) and 0 conversions (needs 5)" in result.note
    json.loads(_json(result.to_dict()))


def test_minimum_is_the_documented_constant_and_can_be_changed() -> None:
    assert (MIN_ENTRIES, MIN_CONVERSIONS) == (100, 5)
    just = compare(Group("b", 100, 5), Group("a", 100, 5))
    short = compare(Group("b", 100, 4), Group("a", 100, 5))
    assert just.enough_data and not short.enough_data and "4 conversions (needs 5)" in short.note
    assert compare(Group("b", 10, 2), Group("a", 10, 1), min_entries=10, min_conversions=1).enough_data


def test_no_conversions_in_control_gives_no_relative_uplift() -> None:
    result = compare(Group("b", 500, 20, 100.0, 600.0), Group("holdout", 500, 0))
    assert result.relative_uplift.value is None and result.relative_uplift.interval is None
    assert "'holdout' has no conversions" in result.relative_uplift.why
    assert result.absolute_uplift.value == pytest.approx(0.04)
    json.loads(_json(result.to_dict()))


def test_no_conversions_in_treatment_gives_minus_100_percent_without_interval() -> None:
    result = compare(Group("b", 500, 0), Group("a", 500, 20, 100.0, 600.0))
    assert result.relative_uplift.value == -1.0 and result.relative_uplift.interval is None
    assert "'b' has no conversions" in result.relative_uplift.why


def test_empty_group_and_group_without_variants_are_reported_not_crashed() -> None:
    result = compare(Group("", 0, 0), Group("holdout", 300, 10, 50.0, 300.0))
    assert result.treatment.rate is None and result.treatment.rate_interval is None
    assert result.absolute_uplift.value is None and result.revenue_per_entry_difference.value is None
    assert "the group without variants has 0 entries" in result.note
    json.loads(_json(result.to_dict()))


def test_more_conversions_than_entries_is_explained() -> None:
    result = compare(Group("b", 120, 130), Group("a", 500, 20))
    assert not result.enough_data and not result.significant and result.treatment.rate is None
    assert "more conversions (130) than entries (120)" in result.note


def test_method_names_every_method() -> None:
    for name in ("Wilson", "Newcombe", "Katz", "Welch"):
        assert name in METHOD
    assert compare(Group("b", 1, 0), Group("a", 1, 0)).to_dict()["method"] == METHOD


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="x must be between"):
        wilson(5, 4)
    with pytest.raises(ValueError, match="n must be positive"):
        newcombe_difference(0, 0, 1, 2)
    with pytest.raises(ValueError, match="negative"):
        Group("b", -1, 0)
    with pytest.raises(ValueError, match="finite"):
        Group("b", 10, 1, float("inf"), 1.0)
    with pytest.raises(ValueError, match="confidence"):
        compare(Group("b", 10, 1), Group("a", 10, 1), confidence=1.0)


group_numbers = st.builds(
    Group,
    st.sampled_from(["", "a", "b", "holdout"]),
    st.one_of(st.integers(0, 3), st.integers(0, 10**7)),
    st.one_of(st.integers(0, 3), st.integers(0, 10**7)),
    st.one_of(st.floats(-1e6, 1e12), st.floats(-1e308, 1e308)),
    st.one_of(st.floats(0, 1e18), st.floats(0, 1e308)),
)


@settings(max_examples=300, deadline=None)
@given(group_numbers, group_numbers)
def test_any_totals_give_plain_json(treatment: Group, control: Group) -> None:
    """Whatever the store adds up (even sums of squares that cannot belong to the sums), the result is
    JSON without NaN or infinity, and only enough data is ever significant."""
    result = compare(treatment, control)
    json.loads(_json(result.to_dict()))
    assert result.enough_data or not result.significant
    assert result.enough_data == (result.note == "")
