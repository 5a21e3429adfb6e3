"""How sure can we be that a variant beats its control: intervals for rates, uplift and revenue per entry.

Pure arithmetic on counts the store has already added up (entries, conversions, revenue and the sum of
squared conversion values per group), so the API, the CLI and the simulator report the same numbers.
Standard library only: the service must not depend on numpy or scipy to show a dashboard, so the Student t
quantile is computed here (regularised incomplete beta by continued fraction, inverted by bisection).

Every result is JSON-friendly: plain floats and ints, `None` where a number is undefined (with a reason
next to it), never NaN or infinity.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

# Below these, each group's numbers are shown but not trusted (`Comparison.enough_data` is False and no
# result is called significant). Wilson and Newcombe intervals keep close to their stated coverage even
# for small samples, but the Katz log interval and Welch's t for revenue (a skewed variable: mostly zeros)
# rest on normal approximations that need a handful of conversions in each group: the usual "at least 5
# events" rule for a binomial. 100 entries keep one entry from moving a rate by more than a point, and
# stop an early, lucky run of a few contacts from reading as a result.
MIN_ENTRIES = 100
MIN_CONVERSIONS = 5
CONFIDENCE = 0.95

METHOD = (
    "Conversion rate per group: Wilson score interval. Absolute uplift (treatment rate minus control rate):"
    " Newcombe's hybrid score interval (Newcombe 1998, method 10). Relative uplift (treatment rate /"
    " control rate - 1): Katz log interval for the ratio of two proportions. Revenue per entry (entries"
    " without a conversion count 0): difference of means with Welch's t interval and Welch-Satterthwaite"
    f" degrees of freedom. Two-sided {CONFIDENCE:.0%} intervals. Not enough data below {MIN_ENTRIES}"
    f" entries or {MIN_CONVERSIONS} conversions in either group."
)

# Beyond this many degrees of freedom the t quantile is the normal one: they differ by less than 1e-6
# (relative) there for any confidence up to 99.99%, and the continued fraction would need ever more terms.
_NORMAL_DF = 1e7
_CF_EPS = 1e-15
_CF_TINY = 1e-300
_CF_MAX_TERMS = 100_000


@dataclass(frozen=True)
class Group:
    """One arm's totals over a period, as the stats store adds them up.

    `revenue` is the sum of the conversions' values and `revenue_sq` the sum of their squares; an entry
    without a conversion has value 0, so these two sums and `entries` are all Welch's test needs.
    """

    name: str
    entries: int
    conversions: int
    revenue: float = 0.0
    revenue_sq: float = 0.0

    def __post_init__(self) -> None:
        # Conversions above entries are data (a window that cuts entries off from their conversions):
        # `compare` reports them. Negative or infinite totals are a caller's bug.
        if self.entries < 0 or self.conversions < 0:
            raise ValueError(f"group {self.name!r}: entries and conversions must not be negative")
        if not (math.isfinite(self.revenue) and math.isfinite(self.revenue_sq)) or self.revenue_sq < 0:
            raise ValueError(f"group {self.name!r}: revenue must be finite and revenue_sq finite and >= 0")


@dataclass(frozen=True)
class Interval:
    """A two-sided confidence interval."""

    low: float
    high: float

    def excludes(self, value: float) -> bool:
        return value < self.low or value > self.high


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its interval; `None` where undefined, and `why` says why in plain words."""

    value: float | None
    interval: Interval | None
    why: str = ""


@dataclass(frozen=True)
class Welch:
    """Difference of two means with Welch's t interval; `df` is the Welch-Satterthwaite estimate."""

    difference: float
    interval: Interval | None
    df: float | None
    why: str = ""


@dataclass(frozen=True)
class GroupStats:
    """One group's rate and revenue per entry, as shown next to the comparison."""

    name: str
    entries: int
    conversions: int
    revenue: float
    rate: float | None
    rate_interval: Interval | None
    revenue_per_entry: float | None


@dataclass(frozen=True)
class Comparison:
    """Treatment against control: what the API and the CLI show for one pair of groups.

    `significant` is only ever True with `enough_data`: a small sample's interval may exclude 0 by luck
    often enough that calling it a result would mislead.
    """

    treatment: GroupStats
    control: GroupStats
    confidence: float
    absolute_uplift: Estimate  # treatment rate - control rate (Newcombe)
    relative_uplift: Estimate  # treatment rate / control rate - 1 (Katz log)
    revenue_per_entry_difference: Estimate  # treatment - control (Welch)
    revenue_df: float | None  # Welch-Satterthwaite degrees of freedom of the revenue interval
    enough_data: bool
    significant: bool  # the absolute uplift's interval excludes 0 (and there is enough data)
    note: str  # plain English: why there is not enough data; "" when there is
    method: str = METHOD

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError("confidence must be between 0 and 1 (exclusive)")
    return NormalDist().inv_cdf(0.5 + confidence / 2.0)


def _check_counts(x: int, n: int) -> None:
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if not 0 <= x <= n:
        raise ValueError(f"x must be between 0 and n ({n}), got {x}")


def wilson(x: int, n: int, confidence: float = CONFIDENCE) -> Interval:
    """Wilson score interval for x successes in n trials: unlike the Wald interval it stays inside
    [0, 1] and keeps near its stated coverage with few conversions or rates near 0."""
    _check_counts(x, n)
    z = _z(confidence)
    z2 = z * z
    p = x / n
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    low = 0.0 if x == 0 else max(0.0, centre - half)
    high = 1.0 if x == n else min(1.0, centre + half)
    return Interval(low, high)


def newcombe_difference(x1: int, n1: int, x2: int, n2: int, confidence: float = CONFIDENCE) -> Interval:
    """Newcombe's hybrid score interval for p1 - p2 (1998, method 10), built from the two Wilson
    intervals: good coverage without iteration, and no overshoot beyond [-1, 1]."""
    l1, u1 = dataclasses.astuple(wilson(x1, n1, confidence))
    l2, u2 = dataclasses.astuple(wilson(x2, n2, confidence))
    p1, p2 = x1 / n1, x2 / n2
    d = p1 - p2
    low = d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    high = d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return Interval(max(-1.0, low), min(1.0, high))


def katz_ratio(x1: int, n1: int, x2: int, n2: int, confidence: float = CONFIDENCE) -> Interval | None:
    """Katz log interval for p1 / p2; None when either group has no conversion (log 0: the standard
    error is infinite, and any finite interval would claim a precision the data does not have)."""
    _check_counts(x1, n1)
    _check_counts(x2, n2)
    if x1 == 0 or x2 == 0:
        return None
    ratio = (x1 / n1) / (x2 / n2)
    se = math.sqrt(max(0.0, 1 / x1 - 1 / n1 + 1 / x2 - 1 / n2))
    half = _z(confidence) * se
    return Interval(ratio * math.exp(-half), ratio * math.exp(half))


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz), converging for
    x < (a + 1) / (a + b + 2)."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = 1.0
    d = 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > _CF_TINY else _CF_TINY)
    h = d
    for m in range(1, _CF_MAX_TERMS + 1):
        m2 = 2 * m
        for aa in (
            m * (b - m) * x / ((qam + m2) * (a + m2)),
            -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)),
        ):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > _CF_TINY else _CF_TINY)
            c = 1.0 + aa / c
            c = c if abs(c) > _CF_TINY else _CF_TINY
            h *= d * c
        if abs(d * c - 1.0) < _CF_EPS:
            return h
    raise ArithmeticError(f"incomplete beta did not converge (a={a}, b={b}, x={x})")


def _betainc(a: float, b: float, x: float, y: float) -> float:
    """Regularised incomplete beta I_x(a, b), with y = 1 - x given separately so that neither loses
    digits when close to 1."""
    if x <= 0.0:
        return 0.0
    if y <= 0.0:
        return 1.0
    log_front = a * math.log(x) + b * math.log(y) + math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, y) / b


def _t_upper_tail(t: float, df: float) -> float:
    """P(T > t) for t >= 0."""
    t2 = t * t
    return 0.5 * _betainc(df / 2.0, 0.5, df / (df + t2), t2 / (df + t2))


def student_t_quantile(p: float, df: float) -> float:
    """The p quantile of Student's t with df (not necessarily whole) degrees of freedom, within 1e-8
    relative (1e-12 below 1000 df); above 1e7 degrees of freedom the normal quantile (within 1e-6)."""
    if not 0.0 < p < 1.0:
        raise ValueError("p must be between 0 and 1 (exclusive)")
    if not df > 0.0:
        raise ValueError("df must be positive")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -student_t_quantile(1.0 - p, df)
    if df > _NORMAL_DF:
        return NormalDist().inv_cdf(p)
    tail = 1.0 - p
    low, high = 0.0, max(1.0, NormalDist().inv_cdf(p))
    while _t_upper_tail(high, df) > tail:
        low, high = high, high * 2.0
    # Bisection: slow-ish but cannot diverge, and the tail is monotone in t.
    while high - low > 1e-14 * high:
        mid = (low + high) / 2.0
        if _t_upper_tail(mid, df) > tail:
            low = mid
        else:
            high = mid
    return (low + high) / 2.0


def _mean_and_variance(n: int, total: float, total_sq: float) -> tuple[float, float]:
    mean = total / n
    # The sums can disagree by rounding (sum of squares a hair below total²/n): a variance is never < 0.
    variance = max(0.0, (total_sq - total * mean) / (n - 1)) if n > 1 else 0.0
    return mean, variance


def welch_difference(
    n1: int,
    sum1: float,
    sumsq1: float,
    n2: int,
    sum2: float,
    sumsq2: float,
    confidence: float = CONFIDENCE,
) -> Welch:
    """Welch's t interval for mean1 - mean2 from each group's count, sum and sum of squares: it does not
    assume equal variances, which revenue of two arms seldom has."""
    if n1 <= 0 or n2 <= 0:
        raise ValueError("both groups need at least one entry")
    mean1, var1 = _mean_and_variance(n1, sum1, sumsq1)
    mean2, var2 = _mean_and_variance(n2, sum2, sumsq2)
    difference = mean1 - mean2
    if n1 < 2 or n2 < 2:
        return Welch(difference, None, None, "a group has fewer than 2 entries: no variance to estimate")
    w1, w2 = var1 / n1, var2 / n2
    se2 = w1 + w2
    if not (math.isfinite(se2) and math.isfinite(difference)):
        return Welch(difference, None, None, "revenue too large to compute an interval")
    if se2 <= 0.0:
        return Welch(difference, None, None, "every entry has the same revenue: no variation to measure")
    f1, f2 = w1 / se2, w2 / se2  # shares of the variance: the squares below cannot underflow to 0
    df = 1.0 / (f1 * f1 / (n1 - 1) + f2 * f2 / (n2 - 1))
    half = student_t_quantile(0.5 + confidence / 2.0, df) * math.sqrt(se2)
    if not (math.isfinite(half) and math.isfinite(df)):
        return Welch(difference, None, None, "revenue too large to compute an interval")
    return Welch(difference, Interval(difference - half, difference + half), df)


def _group_stats(group: Group, confidence: float) -> GroupStats:
    usable = group.entries > 0 and group.conversions <= group.entries
    return GroupStats(
        name=group.name,
        entries=group.entries,
        conversions=group.conversions,
        revenue=group.revenue,
        rate=group.conversions / group.entries if usable else None,
        rate_interval=wilson(group.conversions, group.entries, confidence) if usable else None,
        revenue_per_entry=group.revenue / group.entries if group.entries > 0 else None,
    )


def _shortfalls(group: Group, min_entries: int, min_conversions: int) -> str:
    missing = []
    if group.entries < min_entries:
        missing.append(f"{group.entries} entries (needs {min_entries})")
    if group.conversions < min_conversions:
        missing.append(f"{group.conversions} conversions (needs {min_conversions})")
    return f"{_label(group)} has " + " and ".join(missing) if missing else ""


def _label(group: Group) -> str:
    return f"group {group.name!r}" if group.name else "the group without variants"


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _relative(treatment: Group, control: Group, confidence: float) -> Estimate:
    if control.conversions == 0:
        return Estimate(None, None, f"{_label(control)} has no conversions: no rate to compare against")
    rel = (treatment.conversions / treatment.entries) / (control.conversions / control.entries) - 1.0
    ratio = katz_ratio(
        treatment.conversions, treatment.entries, control.conversions, control.entries, confidence
    )
    if ratio is None:
        why = f"{_label(treatment)} has no conversions: the log interval is undefined"
        return Estimate(rel, None, why)
    return Estimate(rel, Interval(ratio.low - 1.0, ratio.high - 1.0))


def compare(
    treatment: Group,
    control: Group,
    *,
    confidence: float = CONFIDENCE,
    min_entries: int = MIN_ENTRIES,
    min_conversions: int = MIN_CONVERSIONS,
) -> Comparison:
    """Treatment against control. Numbers are computed whenever they are defined, even on too little
    data (a dashboard shows them greyed out); only `significant` waits for `enough_data`."""
    _z(confidence)
    treatment_stats = _group_stats(treatment, confidence)
    control_stats = _group_stats(control, confidence)
    notes = []
    inconsistent = [g for g in (treatment, control) if g.conversions > g.entries]
    for group in inconsistent:
        notes.append(
            f"{_label(group)} has more conversions ({group.conversions}) than entries ({group.entries}):"
            " the period cuts conversions off from entries made before it; widen it"
        )
    if not inconsistent:
        notes.extend(s for g in (treatment, control) if (s := _shortfalls(g, min_entries, min_conversions)))
    enough = not notes

    no_rates = "a group has no entries" if not inconsistent else "more conversions than entries"
    if treatment_stats.rate is None or control_stats.rate is None:
        absolute = Estimate(None, None, no_rates)
        relative = Estimate(None, None, no_rates)
    else:
        interval = newcombe_difference(
            treatment.conversions, treatment.entries, control.conversions, control.entries, confidence
        )
        absolute = Estimate(treatment_stats.rate - control_stats.rate, interval)
        relative = _relative(treatment, control, confidence)

    revenue = Estimate(None, None, "a group has no entries")
    revenue_df = None
    if treatment.entries > 0 and control.entries > 0:
        welch = welch_difference(
            treatment.entries,
            treatment.revenue,
            treatment.revenue_sq,
            control.entries,
            control.revenue,
            control.revenue_sq,
            confidence,
        )
        revenue = Estimate(_finite(welch.difference), welch.interval, welch.why)
        revenue_df = welch.df

    significant = enough and absolute.interval is not None and absolute.interval.excludes(0.0)
    note = "Not enough data: " + "; ".join(notes) + "." if notes else ""
    return Comparison(
        treatment=treatment_stats,
        control=control_stats,
        confidence=confidence,
        absolute_uplift=absolute,
        relative_uplift=relative,
        revenue_per_entry_difference=revenue,
        revenue_df=revenue_df,
        enough_data=enough,
        significant=significant,
        note=note,
    )
