"""`GET /v1/stats` and `rulesvc stats` on a real mongod: the `stats` collection is seeded here with counts
in the documented schema (one document per hour, ruleset, rule, group, channel and writing shard), made
from contacts the test draws itself, and every number read back is judged against what the test computed:
the sums by plain Python, the intervals by statsmodels and scipy."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from scipy import stats as scipy_stats
from statsmodels.stats.proportion import confint_proportions_2indep, proportion_confint

from rulesvc.config import Settings
from rulesvc.core.funnel import COUNTED, Increment
from rulesvc.store.db import Store
from rulesvc.web.app import create_app
from tests.helpers import eventually
from tests.test_api_contract import check_against_document
from tests.test_backtest_api import write_rulesets

Client = Any
Doc = dict[str, Any]
START = datetime(2026, 11, 25, 10, tzinfo=UTC)  # 30 hours from here: across the UTC midnight of the 26th
HOURS = 30
SHARDS = ("inbox:w1", "inbox:w2", "scheduler:w1")
ARMS = [{"name": "a", "weight": 50}, {"name": "b", "weight": 50, "channel": "email"}]
PROMO = {
    "holdout": "10%",
    "goal": {"event": "purchased", "within": "5d", "value": "attributes.value"},
    "rules": [{"name": "remind", "when": {"event": "cart_updated"},
               "then": [{"send": {"channel": "log", "template": "cart", "after": "20m", "variants": ARMS}}]}],
}  # fmt: skip
WINDOW = {"from": "2026-11-25T10:00:00Z", "to": "2026-11-26T16:00:00Z"}
CHANNEL = {"a": "log", "b": "email", "holdout": ""}
RATES = {"a": 0.05, "b": 0.08, "holdout": 0.03}
SIZES = {"a": 1500, "b": 1500, "holdout": 330}


@dataclass
class Seed:
    """The documents to insert, and what the test knows they say: per group, each entry's conversion
    value (0: none), and every count by (hour, rule, group, channel, status[, reason])."""

    docs: dict[tuple[Any, ...], Doc] = field(default_factory=dict)
    values: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    counts: dict[tuple[Any, ...], float] = field(default_factory=lambda: defaultdict(float))

    def add(self, hour: datetime, ruleset: str, rule: str, group: str, channel: str, shard: str,
            status: str, n: int = 1, reason: str | None = None,
            value: float | None = None) -> None:  # fmt: skip
        key = (hour, ruleset, rule, group, channel, shard)
        doc = self.docs.setdefault(key, {
            "_id": "|".join([hour.isoformat(), ruleset, rule, group, channel, shard]), "hour": hour,
            "ruleset": ruleset, "rule": rule, "variant": group, "channel": channel, "shard": shard,
            "counts": {}, "reasons": {}, "revenue": 0.0, "revenue_sq": 0.0,
        })  # fmt: skip
        doc["counts"][status] = doc["counts"].get(status, 0) + n
        self.counts[(ruleset, hour, rule, group, channel, status)] += n
        if reason is not None:
            by = doc["reasons"].setdefault(status, {})
            by[reason] = by.get(reason, 0) + n
            self.counts[(ruleset, hour, rule, group, channel, status, reason)] += n
        if value is not None:
            doc["revenue"] += value
            doc["revenue_sq"] += value * value
            self.counts[(ruleset, hour, rule, group, channel, "revenue")] += value

    def total(self, ruleset: str, status: str, reason: str | None = None, **only: Any) -> float:
        """The sum of one status (or one reason of it, or `revenue`) over the keys matching `only`."""
        names = ("ruleset", "hour", "rule", "group", "channel", "status", "reason")
        found = 0.0
        for key, n in self.counts.items():
            parts = dict(zip(names, key, strict=False))
            if parts["ruleset"] != ruleset or parts["status"] != status or parts.get("reason") != reason:
                continue
            if all(parts[k] == v or (callable(v) and v(parts[k])) for k, v in only.items()):
                found += n
        return found


def seed_promo(seed: Seed, ruleset: str = "promo", sizes: dict[str, int] = SIZES) -> None:
    """Contacts enter in random hours through random shards; messaged arms go through the funnel
    (scheduled, then sent or suppressed, delivered, opened, clicked), held-out ones are held_out; some
    convert, at their group's rate, with a value."""
    rng = random.Random(16)
    for group, size in sizes.items():
        channel = CHANNEL[group]
        for _ in range(size):
            hour = START + timedelta(hours=rng.randrange(HOURS))
            shard = rng.choice(SHARDS)
            seed.add(hour, ruleset, "remind", group, "", shard, "entered")
            if group == "holdout":
                seed.add(hour, ruleset, "remind", group, "log", "scheduler:w1", "held_out", reason="held_out")
            else:
                seed.add(hour, ruleset, "remind", group, channel, shard, "scheduled")
                fate = rng.random()
                if fate < 0.1:
                    why = rng.choice(["no_consent", "frequency_cap"])
                    seed.add(
                        hour, ruleset, "remind", group, channel, "scheduler:w1", "suppressed", reason=why
                    )
                elif fate < 0.15:
                    seed.add(hour, ruleset, "remind", group, channel, shard, "cancelled",
                             reason="cancelled_by_event")  # fmt: skip
                else:
                    seed.add(hour, ruleset, "remind", group, channel, "scheduler:w1", "sent")
                    for status, p in (("delivered", 0.9), ("opened", 0.4), ("clicked", 0.1)):
                        if rng.random() < p:
                            seed.add(hour, ruleset, "remind", group, channel, "inbox:w2", status)
            value = 0.0
            if rng.random() < RATES[group]:
                value = round(rng.uniform(5, 250), 2)
                later = min(hour + timedelta(hours=rng.randrange(3)), START + timedelta(hours=HOURS - 1))
                seed.add(later, ruleset, "remind", group, channel, shard, "converted", value=value)
            seed.values[group].append(value)


async def insert(db: Any, seed: Seed) -> None:
    await db.stats.insert_many(list(seed.docs.values()))


def app_with(settings: Settings, rulesets: dict[str, Any]) -> Any:
    write_rulesets(Path(settings.rulesets_dir), rulesets)
    return create_app(settings)


@pytest.fixture
async def promo(settings: Settings, db: Any, make_client: Any) -> tuple[Client, Seed]:
    seed = Seed()
    seed_promo(seed)
    await insert(db, seed)
    client = await make_client(app_with(settings, {"promo": PROMO}))
    return client, seed


async def get(client: Client, **params: str) -> tuple[int, Any]:
    resp = await client.get("/v1/stats", params=params)
    body = await resp.json()
    check_against_document("GET", "/v1/stats", resp.status, body)
    return resp.status, body


STATUSES = ["entered", "scheduled", "sent", "suppressed", "held_out", "cancelled", "postponed", "retried",
            "failed", "dead", "uncertain", "dismissed", "delivered", "opened", "clicked", "replied",
            "bounced", "blocked", "converted"]  # fmt: skip


def expected_funnel(seed: Seed, ruleset: str, **only: Any) -> dict[str, Any]:
    funnel: dict[str, Any] = {s: int(seed.total(ruleset, s, **only)) for s in STATUSES}
    funnel["revenue"] = pytest.approx(seed.total(ruleset, "revenue", **only), abs=1e-6)
    reasons: dict[str, dict[str, int]] = {}
    for status, reason in sorted({(k[5], k[6]) for k in seed.counts if len(k) == 7 and k[0] == ruleset}):
        n = int(seed.total(ruleset, status, reason, **only))
        if n:
            reasons.setdefault(status, {})[reason] = n
    funnel["reasons"] = reasons
    return funnel


async def test_totals_rows_and_series_add_up_every_shard_and_hour(promo: tuple[Client, Seed]) -> None:
    client, seed = promo
    status, body = await get(client, ruleset="promo", **WINDOW)
    assert status == 200, body
    assert body["window"] == WINDOW and body["ruleset"] == "promo" and body["rule"] is None
    assert body["funnel"] == expected_funnel(seed, "promo")
    assert body["funnel"]["reasons"]["suppressed"].keys() == {"no_consent", "frequency_cap"}
    assert body["funnel"]["entered"] == sum(SIZES.values())
    rows = {(r["rule"], r["variant"], r["channel"]): r["funnel"] for r in body["rows"]}
    cells = {(k[2], k[3], k[4]) for k in seed.counts}
    assert set(rows) == cells
    for rule, group, channel in cells:
        assert rows[rule, group, channel] == expected_funnel(seed, "promo", rule=rule, group=group,
                                                             channel=channel), (group, channel)  # fmt: skip
    assert body["series"] is None

    status, body = await get(client, ruleset="promo", by="hour", **WINDOW)
    hours = sorted({k[1] for k in seed.counts})
    assert [datetime.fromisoformat(p["at"]) for p in body["series"]] == hours
    for point in body["series"]:
        assert point["funnel"] == expected_funnel(seed, "promo", hour=datetime.fromisoformat(point["at"]))

    status, body = await get(client, ruleset="promo", by="day", **WINDOW)
    days = [datetime(2026, 11, 25, tzinfo=UTC), datetime(2026, 11, 26, tzinfo=UTC)]
    assert [datetime.fromisoformat(p["at"]) for p in body["series"]] == days
    for point, day in zip(body["series"], days, strict=True):
        in_day = lambda h, d=day: d <= h < d + timedelta(days=1)  # noqa: E731
        assert point["funnel"] == expected_funnel(seed, "promo", hour=in_day)


async def test_the_window_and_the_rule_filter(promo: tuple[Client, Seed]) -> None:
    client, seed = promo
    start, end = START + timedelta(hours=4), START + timedelta(hours=9)
    status, body = await get(client, ruleset="promo", **{"from": "2026-11-25T15:30:00+01:00",
                                                          "to": "2026-11-25T19:00:00Z"})  # fmt: skip
    # 15:30+01:00 is 14:30Z: the hours overlapping [14:30, 19:00) are 14:00 to 18:00, counted whole.
    assert body["window"] == {"from": "2026-11-25T14:30:00Z", "to": "2026-11-25T19:00:00Z"}
    assert body["funnel"] == expected_funnel(seed, "promo", hour=lambda h: start <= h < end)
    status, body = await get(client, ruleset="promo", rule="remind", **WINDOW)
    assert body["rule"] == "remind" and body["funnel"]["entered"] == sum(SIZES.values())
    assert body["groups"] and body["comparisons"] == []  # one rule's groups are not compared
    status, body = await get(client, ruleset="promo", rule="other", **WINDOW)
    assert status == 200 and body["funnel"]["entered"] == 0 and body["rows"] == []
    # The default window is the 7 days up to the end of this hour: the seeded hours are in the past.
    status, body = await get(client, ruleset="promo")
    end_of_hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    assert datetime.fromisoformat(body["window"]["to"]) in (end_of_hour, end_of_hour + timedelta(hours=1))
    assert datetime.fromisoformat(body["window"]["to"]) - datetime.fromisoformat(body["window"]["from"]) == (
        timedelta(days=7)
    )


def judge_group(values: list[float]) -> dict[str, Any]:
    n, x = len(values), sum(1 for v in values if v > 0)
    low, high = proportion_confint(x, n, method="wilson")
    return {"entries": n, "conversions": x, "conversion_rate": pytest.approx(x / n, rel=1e-12),
            "conversion_rate_ci": {"low": pytest.approx(low, rel=1e-9),
                                   "high": pytest.approx(high, rel=1e-9)},
            "revenue": pytest.approx(sum(values), abs=1e-6),
            "revenue_per_entry": pytest.approx(sum(values) / n, rel=1e-9)}  # fmt: skip


def judge_comparison(treated: list[float], control: list[float]) -> dict[str, Any]:
    x1, n1 = sum(1 for v in treated if v > 0), len(treated)
    x2, n2 = sum(1 for v in control if v > 0), len(control)
    dl, dh = confint_proportions_2indep(x1, n1, x2, n2, method="newcomb", compare="diff")
    rl, rh = confint_proportions_2indep(x1, n1, x2, n2, method="log", compare="ratio")
    welch = scipy_stats.ttest_ind(treated, control, equal_var=False).confidence_interval(0.95)
    mean_diff = sum(treated) / n1 - sum(control) / n2
    return {
        "absolute": (x1 / n1 - x2 / n2, dl, dh),
        "relative": ((x1 / n1) / (x2 / n2) - 1, rl - 1, rh - 1),
        "revenue": (mean_diff, float(welch.low), float(welch.high)),
        "significant": not dl <= 0 <= dh,
    }


def close(estimate: dict[str, Any], expected: tuple[float, float, float]) -> bool:
    value, low, high = expected
    return (estimate["value"], estimate["ci"]["low"], estimate["ci"]["high"]) == (
        pytest.approx(value, rel=1e-9, abs=1e-12),
        pytest.approx(low, rel=1e-6, abs=1e-9),
        pytest.approx(high, rel=1e-6, abs=1e-9),
    )


async def test_groups_and_uplift_match_statsmodels_and_scipy(promo: tuple[Client, Seed]) -> None:
    client, seed = promo
    _, body = await get(client, ruleset="promo", **WINDOW)
    values = seed.values
    treated = values["a"] + values["b"]
    groups = {g["group"]: g for g in body["groups"]}
    assert [g["group"] for g in body["groups"]] == ["treatment", "a", "b", "holdout"]
    for name, judged in (("treatment", treated), ("a", values["a"]), ("b", values["b"]),
                         ("holdout", values["holdout"])):  # fmt: skip
        assert groups[name] == {"group": name, **judge_group(judged)}, name
    pairs = [(c["group"], c["baseline"]) for c in body["comparisons"]]
    assert pairs == [("treatment", "holdout"), ("a", "holdout"), ("b", "holdout"), ("b", "a")]
    judged_pairs = {("treatment", "holdout"): (treated, values["holdout"]),
                    ("a", "holdout"): (values["a"], values["holdout"]),
                    ("b", "holdout"): (values["b"], values["holdout"]),
                    ("b", "a"): (values["b"], values["a"])}  # fmt: skip
    for c in body["comparisons"]:
        judged = judge_comparison(*judged_pairs[c["group"], c["baseline"]])
        assert c["enough_data"] is True and c["note"] is None, c
        assert close(c["absolute_uplift"], judged["absolute"]), c
        assert close(c["relative_uplift"], judged["relative"]), c
        assert close(c["revenue_per_entry_difference"], judged["revenue"]), c
        assert c["significant"] is judged["significant"], c
    assert "Wilson" in body["method"] and "Newcombe" in body["method"] and "Welch" in body["method"]
    assert body["minimum_entries"] > 0 and body["minimum_conversions"] > 0


async def test_too_few_entries_is_said_and_never_significant(
    settings: Settings, db: Any, make_client: Any
) -> None:
    seed = Seed()
    seed_promo(seed, "tiny", {"a": 40, "b": 40, "holdout": 8})
    await insert(db, seed)
    client = await make_client(app_with(settings, {"tiny": PROMO}))
    status, body = await get(client, ruleset="tiny", **WINDOW)
    assert status == 200 and body["comparisons"]
    for c in body["comparisons"]:
        assert c["enough_data"] is False and c["significant"] is False, c
        assert c["note"].startswith("Not enough data") and "entries" in c["note"], c
    assert {g["group"]: g["entries"] for g in body["groups"]} == {
        "treatment": 80,
        "a": 40,
        "b": 40,
        "holdout": 8,
    }


async def test_rulesets_without_a_test_removed_ones_and_unknown_names(
    settings: Settings, db: Any, make_client: Any
) -> None:
    plain = {"rules": [{"name": "remind", "when": {"event": "cart_updated"},
                        "then": [{"send": {"channel": "log", "template": "cart"}}]}]}  # fmt: skip
    seed = Seed()
    hour = START
    for group in ("x", "y", "holdout"):  # `gone` was removed: its groups come from its counts
        for n in range(3):
            seed.add(hour, "gone", "r", group, "", SHARDS[n], "entered", 50)
            seed.add(hour, "gone", "r", group, "", SHARDS[n], "converted", 5, value=10.0)
    seed.add(hour, "plain", "remind", "", "log", SHARDS[0], "sent", 7)
    await insert(db, seed)
    client = await make_client(app_with(settings, {"plain": plain, "promo": PROMO}))

    status, body = await get(client, ruleset="plain", **WINDOW)
    assert status == 200 and body["funnel"]["sent"] == 7
    assert body["groups"] == [] and body["comparisons"] == [] and body["method"] is None

    status, body = await get(client, ruleset="gone", **WINDOW)
    assert status == 200 and body["funnel"]["entered"] == 450 and body["funnel"]["converted"] == 45
    assert [g["group"] for g in body["groups"]] == ["treatment", "x", "y", "holdout"]
    assert body["groups"][0]["entries"] == 300 and body["groups"][0]["revenue"] == pytest.approx(60.0)

    status, body = await get(client, ruleset="promo", **WINDOW)  # loaded, never counted: zeros
    assert status == 200 and body["funnel"]["entered"] == 0 and body["rows"] == []
    assert [g["group"] for g in body["groups"]] == ["treatment", "a", "b", "holdout"]
    assert all(g["conversion_rate"] is None and g["entries"] == 0 for g in body["groups"])
    assert all(
        c["enough_data"] is False and c["absolute_uplift"]["value"] is None for c in body["comparisons"]
    )

    status, body = await get(client, ruleset="nope", **WINDOW)
    assert status == 404 and "nope" in body["error"]


async def test_odd_counts_never_fail_the_read(settings: Settings, db: Any, make_client: Any) -> None:
    """Revenue past a float's range (purchases of 1e308 added up) reads as unknown, not as a 500."""
    arms = [{"name": "test", "weight": 1}, {"name": "control", "weight": 1}]
    odd = {**PROMO, "rules": [{"name": "remind", "when": {"event": "cart_updated"},
           "then": [{"send": {"channel": "log", "template": "cart", "variants": arms}}]}]}  # fmt: skip
    seed = Seed()
    for group in ("test", "control", "holdout"):
        seed.add(START, "odd", "remind", group, "", SHARDS[0], "entered", 200)
        seed.add(START, "odd", "remind", group, "", SHARDS[0], "converted", 20, value=10.0)
    seed.add(START, "odd", "remind", "control", "", SHARDS[1], "converted", 1, value=1e308)
    seed.add(START, "odd", "remind", "control", "", SHARDS[2], "converted", 1, value=1e308)
    await insert(db, seed)
    client = await make_client(app_with(settings, {"odd": odd}))
    status, body = await get(client, ruleset="odd", **WINDOW)
    assert status == 200, body
    assert body["funnel"]["revenue"] is None
    groups = {g["group"]: g for g in body["groups"]}
    assert list(groups) == ["treatment", "test", "control", "holdout"]
    assert groups["treatment"]["entries"] == 400 and groups["test"]["entries"] == 200
    assert groups["control"]["revenue"] is None and groups["test"]["revenue"] == 10.0
    pairs = {(c["group"], c["baseline"]): c for c in body["comparisons"]}
    assert list(pairs) == [("treatment", "holdout"), ("test", "holdout"), ("control", "holdout"),
                           ("control", "test")]  # fmt: skip
    unknown = pairs["control", "holdout"]["revenue_per_entry_difference"]
    assert unknown == {"value": None, "ci": None, "why": "revenue too large to compute with"}
    assert pairs["control", "holdout"]["absolute_uplift"]["value"] == pytest.approx(22 / 200 - 20 / 200)


@pytest.mark.parametrize(
    ("params", "field", "words"),
    [
        ({}, "ruleset", "query parameter `ruleset` is required"),
        ({"ruleset": "Promo!"}, "ruleset", "must be a ruleset name"),
        ({"ruleset": "promo", "rule": "a b"}, "rule", "must be a rule name"),
        ({"ruleset": "promo", "from": "yesterday"}, "from", "must be an RFC 3339 time"),
        ({"ruleset": "promo", "to": "2026-11-26T00:00:00"}, "to", "needs a time zone offset"),
        ({"ruleset": "promo", "from": "2026-11-26T00:00:00Z", "to": "2026-11-26T00:00:00Z"}, "from",
         "the window is empty"),
        ({"ruleset": "promo", "by": "week"}, "by", "`week` is not one of hour, day"),
        ({"ruleset": "promo", "by": "hour", "from": "2020-01-01T00:00:00Z", "to": "2026-01-01T00:00:00Z"},
         "by", "more than 5000 points"),
        ({"ruleset": "promo", "to": "0001-01-02T00:00:00Z"}, "to", "too early"),
        ({"ruleset": "promo", "since": "7d"}, "since", "unknown query parameter `since`"),
    ],
)  # fmt: skip
async def test_bad_queries_get_422_naming_the_parameter(
    promo: tuple[Client, Seed], params: dict[str, str], field: str, words: str
) -> None:
    client, _ = promo
    status, body = await get(client, **params)
    assert (status, body["field"]) == (422, field), body
    assert words in body["error"], body


async def test_admin_key_required(settings: Settings, make_client: Any) -> None:
    app = app_with(settings, {"promo": PROMO})
    client = await make_client(app, "ingest")
    resp = await client.get("/v1/stats", params={"ruleset": "promo"})
    assert resp.status == 403
    check_against_document("GET", "/v1/stats", 403, await resp.json())
    del client.session.headers["Authorization"]
    resp = await client.get("/v1/stats", params={"ruleset": "promo"})
    assert resp.status == 401
    check_against_document("GET", "/v1/stats", 401, await resp.json())


def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RULESVC_", "MONGODB_"))}
    env |= {"MONGODB_URI": settings.mongodb_uri or "", "RULESVC_DATABASE": settings.database,
            "RULESVC_RULESETS_DIR": settings.rulesets_dir, "RULESVC_DATA_DIR": settings.data_dir}  # fmt: skip
    return subprocess.run([sys.executable, "-m", "rulesvc", *args], env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip


async def test_the_command_reads_the_same_numbers(settings: Settings, promo: tuple[Client, Seed]) -> None:
    client, seed = promo
    _, api = await get(client, ruleset="promo", by="day", **WINDOW)
    window = ["--from", WINDOW["from"], "--until", WINDOW["to"]]
    done = cli(settings, "stats", "promo", *window, "--by", "day", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == api

    done = cli(settings, "stats", "promo", *window)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    entered = int(seed.total("promo", "entered"))
    assert any(line.split() == ["entered", str(entered)] for line in lines), done.stdout
    suppressed = next(line for line in lines if line.split()[:1] == ["suppressed"])
    reasons = api["funnel"]["reasons"]["suppressed"]
    assert all(f"{reason} {n}" in suppressed for reason, n in reasons.items()), suppressed
    treatment = next(g for g in api["groups"] if g["group"] == "treatment")
    rate = f"{treatment['conversion_rate'] * 100:.1f} %"
    first = api["comparisons"][0]
    uplift = f"{first['absolute_uplift']['value'] * 100:+.1f} pts"
    line = next(line for line in lines if line.strip().startswith("treatment ") and " vs holdout " in line)
    assert rate in line and uplift in line, line
    assert line.endswith("— significant" if first["significant"] else "— not significant"), line

    done = cli(settings, "stats", "nope")
    assert done.returncode == 1 and "no ruleset nope" in done.stderr
    done = cli(settings, "stats", "promo", "--since", "7d", "--from", WINDOW["from"])
    assert done.returncode == 2  # argparse: one or the other
    done = cli(settings, "stats", "promo", "--from", "2026-11-25")
    assert done.returncode == 1 and "--from" in done.stderr


async def test_counts_written_by_the_service_read_back(settings: Settings, db: Any, make_client: Any) -> None:
    """What the counting code writes (two shards, reasons, revenue) is what the read adds up; and every
    status it may write has its place in the funnel, so none is dropped unseen."""
    store = Store(db.client, db.name, timedelta(days=30))
    hour = START + timedelta(minutes=17)
    values = [12.5, 40.0, 7.25]
    for n, shard in enumerate(("inbox:one", "scheduler:two")):
        increments = [Increment(hour, "promo", "remind", "a", "", "entered", n=10),
                      Increment(hour, "promo", "remind", "a", "log", "suppressed", "no_consent", n=2),
                      Increment(hour, "promo", "remind", "a", "log", "retried",
                                "provider_error")]  # fmt: skip
        increments += [
            Increment(hour, "promo", "remind", "a", "log", "converted", revenue=v) for v in values[n:]
        ]
        await store.add_counts(increments, shard, None)
    client = await make_client(app_with(settings, {"promo": PROMO}))
    _, body = await get(client, ruleset="promo", **WINDOW)
    funnel = body["funnel"]
    assert (funnel["entered"], funnel["suppressed"], funnel["retried"], funnel["converted"]) == (20, 4, 2, 5)
    assert funnel["reasons"] == {"suppressed": {"no_consent": 4}, "retried": {"provider_error": 2}}
    assert funnel["revenue"] == pytest.approx(sum(values) + sum(values[1:]))
    a = next(g for g in body["groups"] if g["group"] == "a")
    assert (a["entries"], a["conversions"]) == (20, 5)
    assert set(COUNTED) <= set(funnel), set(COUNTED) - set(funnel)


def fraction(salt: str, contact: str, purpose: str) -> float:
    """The documented group formula (docs/rulesets.md), computed here."""
    digest = hashlib.sha256(f"{salt}\x00{contact}\x00{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


FLOW = {**PROMO, "holdout": "20%", "rules": [{"name": "remind", "when": {"event": "cart_updated"},
        "then": [{"send": {"channel": "log", "template": "cart"}}]}]}  # fmt: skip
CONTACTS = [f"c{n}" for n in range(300)]
HELD = {c for c in CONTACTS if fraction("flow", c, "holdout") < 0.20}
BUYERS = {c: float(n % 50 + 1) for n, c in enumerate(CONTACTS) if n % 4 == 0}


async def live_flow(settings: Settings, make_client: Any) -> tuple[Client, datetime]:
    """The service with `flow` (a 20 % holdout, a goal), and a cart from each contact a minute ago."""
    app = app_with(settings, {"flow": FLOW})
    (Path(settings.rulesets_dir) / "templates" / "cart.body").write_text("Still thinking about it?")
    client = await make_client(app)
    now = datetime.now(UTC).replace(microsecond=0)
    carts = [{"id": f"cart-{c}", "type": "cart_updated", "contact_id": c, "time": stamp(now, 2),
              "attributes": {"value": 30}} for c in CONTACTS]  # fmt: skip
    resp = await client.post("/v1/events", json=carts)
    assert resp.status == 202, await resp.text()
    return client, now


def stamp(now: datetime, minutes_ago: int) -> str:
    return (now - timedelta(minutes=minutes_ago)).isoformat().replace("+00:00", "Z")


async def test_live_sends_are_counted_per_group(settings: Settings, make_client: Any) -> None:
    """Events through the running service: the held-out contacts (predicted from their hashes) are
    counted `held_out` in the holdout group, the others' messages in the treatment's rows."""
    client, _ = await live_flow(settings, make_client)

    async def decided() -> bool:
        funnel = (await get(client, ruleset="flow"))[1]["funnel"]
        return bool(funnel["held_out"] + funnel["sent"] + funnel["suppressed"] == len(CONTACTS))

    await eventually(decided)
    _, body = await get(client, ruleset="flow")
    rows = {(r["variant"], r["channel"]): r["funnel"] for r in body["rows"]}
    assert rows["holdout", "log"]["held_out"] == len(HELD) and rows["holdout", "log"]["sent"] == 0
    treated = rows["", "log"]
    assert treated["held_out"] == 0
    assert treated["sent"] + treated["suppressed"] == treated["scheduled"] == len(CONTACTS) - len(HELD)
    assert [g["group"] for g in body["groups"]] == ["treatment", "holdout"]


async def test_live_entries_and_conversions_per_group(settings: Settings, make_client: Any) -> None:
    """Entries and conversions by group as the test predicts them from the contacts' hashes and the
    purchases it makes."""
    client, now = await live_flow(settings, make_client)

    async def entered() -> bool:
        return bool((await get(client, ruleset="flow"))[1]["funnel"]["entered"] == len(CONTACTS))

    await eventually(entered, 15)
    purchases = [{"id": f"buy-{c}", "type": "purchased", "contact_id": c, "time": stamp(now, 1),
                  "attributes": {"value": v}} for c, v in BUYERS.items()]  # fmt: skip
    assert (await client.post("/v1/events", json=purchases)).status == 202

    async def converted() -> bool:
        return bool((await get(client, ruleset="flow"))[1]["funnel"]["converted"] == len(BUYERS))

    await eventually(converted)
    _, body = await get(client, ruleset="flow")
    groups = {g["group"]: g for g in body["groups"]}
    for name, members in (("holdout", HELD), ("treatment", set(CONTACTS) - HELD)):
        bought = [BUYERS[c] for c in members if c in BUYERS]
        assert (groups[name]["entries"], groups[name]["conversions"]) == (len(members), len(bought)), name
        assert groups[name]["revenue"] == pytest.approx(sum(bought)), name
