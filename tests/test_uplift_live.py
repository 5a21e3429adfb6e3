"""A flow's uplift, measured by the real service against a holdout: the test makes messaged contacts buy
at one rate and held-out contacts at another, and the service must report exactly the rates, revenue
and intervals the test computes itself (with statsmodels and scipy as the judges), and an interval that
covers the difference the test built in.

`rulesvc serve --workers 2` on a real mongod; 3,000 contacts; who is held out is predicted from the
documented hash, not read from the service."""

from __future__ import annotations

import hashlib
import json
import os
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from scipy import stats as scipy_stats
from statsmodels.stats.proportion import confint_proportions_2indep

from rulesvc.store.mongod import EmbeddedMongod
from tests.helpers import wait_for
from tests.service import ServiceProcess

CONTACTS = [f"u{n:04d}" for n in range(3000)]
SALT = "uplift-test"
HOLDOUT = 0.20
RATE = {"treatment": 0.30, "holdout": 0.15}  # what the test makes each group do
RULESET = {
    "holdout": "20%",
    "salt": SALT,
    "goal": {"event": "purchased", "within": "1d", "value": "attributes.value"},
    "rules": [
        {
            "name": "remind",
            "when": {"event": "cart_updated"},
            "then": [{"send": {"channel": "log", "template": "cart", "after": "1m"}}],
        }
    ],
}


def held_out(contact: str) -> bool:
    digest = hashlib.sha256(f"{SALT}\x00{contact}\x00holdout".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < HOLDOUT


def stamp(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


@pytest.mark.slow
def test_reported_uplift_is_what_the_test_built_in(mongod: EmbeddedMongod, tmp_path: Path) -> None:
    rulesets = tmp_path / "rulesets"
    (rulesets / "templates").mkdir(parents=True)
    (rulesets / "templates" / "cart.body").write_text("Your cart is waiting")
    (rulesets / "cart.json").write_text(json.dumps(RULESET))
    env = {"MONGODB_URI": mongod.uri, "RULESVC_DATABASE": f"uplift_{os.getpid()}", "RULESVC_RATE_LIMIT": "0",
           "RULESVC_RULESETS_DIR": str(rulesets), "RULESVC_QUIET_HOURS": ""}  # fmt: skip
    service = ServiceProcess(tmp_path, env=env, workers=2)
    service.start()
    try:
        service.key = service.cli("keys", "create", "--scope", "admin").stdout.splitlines()[-1]
        earlier = stamp(datetime.now(UTC) - timedelta(minutes=10))  # the reminders are due at once
        carts = [{"id": f"cart-{c}", "type": "cart_updated", "contact_id": c, "time": earlier,
                  "attributes": {"value": 50}} for c in CONTACTS]  # fmt: skip
        assert service.request("POST", "/v1/events", carts)[0] == 202
        held = {c for c in CONTACTS if held_out(c)}

        def decided() -> bool:
            with service.db() as db:
                return db.messages.count_documents({"status": {"$in": ["sent", "held_out"]}}) == len(CONTACTS)

        wait_for(decided, 120, "every reminder sent or held out")
        with service.db() as db:
            assert {m["contact_id"] for m in db.messages.find({"status": "held_out"})} == held
            assert not db.messages.find_one({"status": "held_out", "sent_at": {"$exists": True}})

        # The test decides who buys, and for how much: a known difference of 15 points.
        rng = random.Random(16)
        values: dict[str, list[float]] = {"treatment": [], "holdout": []}
        purchases = []
        for c in CONTACTS:
            group = "holdout" if c in held else "treatment"
            bought = rng.random() < RATE[group]
            value = round(rng.uniform(10, 200), 2) if bought else 0.0
            values[group].append(value)
            if bought:
                at = stamp(datetime.now(UTC))
                purchases.append({"id": f"buy-{c}", "type": "purchased", "contact_id": c, "time": at,
                                  "attributes": {"value": value}})  # fmt: skip
        assert service.request("POST", "/v1/events", purchases)[0] == 202

        def report() -> dict[str, Any] | None:
            status, body = service.request("GET", "/v1/stats?ruleset=cart")
            assert status == 200, body
            return body if body["funnel"]["converted"] == len(purchases) else None

        body = wait_for(report, 120, "every purchase counted as a conversion")
    finally:
        service.stop()

    groups = {g["group"]: g for g in body["groups"]}
    n = {g: len(v) for g, v in values.items()}
    x = {g: sum(1 for value in v if value > 0) for g, v in values.items()}
    for g in ("treatment", "holdout"):
        assert (groups[g]["entries"], groups[g]["conversions"]) == (n[g], x[g]), g
        assert groups[g]["revenue"] == pytest.approx(sum(values[g]), abs=1e-6)
        assert groups[g]["conversion_rate"] == pytest.approx(x[g] / n[g], rel=1e-12)
    # Messaged buyers are credited to the reminder they got, held-out ones to their entry.
    rows = {(r["rule"], r["variant"], r["channel"]): r["funnel"] for r in body["rows"]}
    assert rows["remind", "", "log"]["converted"] == x["treatment"]
    assert rows["remind", "holdout", ""]["converted"] == x["holdout"]
    assert rows["remind", "holdout", "log"]["held_out"] == n["holdout"]

    [uplift] = [c for c in body["comparisons"] if (c["group"], c["baseline"]) == ("treatment", "holdout")]
    assert uplift["enough_data"] and uplift["significant"]
    args = (x["treatment"], n["treatment"], x["holdout"], n["holdout"])
    low, high = confint_proportions_2indep(*args, method="newcomb", compare="diff")
    absolute = uplift["absolute_uplift"]
    assert absolute["value"] == pytest.approx(x["treatment"] / n["treatment"] - x["holdout"] / n["holdout"])
    assert (absolute["ci"]["low"], absolute["ci"]["high"]) == pytest.approx((low, high), abs=1e-9)
    assert low < RATE["treatment"] - RATE["holdout"] < high  # the truth the test built in is covered
    low, high = confint_proportions_2indep(*args, method="log", compare="ratio")
    relative = uplift["relative_uplift"]
    assert (relative["ci"]["low"], relative["ci"]["high"]) == pytest.approx((low - 1, high - 1), abs=1e-9)
    welch = scipy_stats.ttest_ind(values["treatment"], values["holdout"], equal_var=False)
    ci = welch.confidence_interval(0.95)
    revenue = uplift["revenue_per_entry_difference"]
    mean = sum(values["treatment"]) / n["treatment"] - sum(values["holdout"]) / n["holdout"]
    assert revenue["value"] == pytest.approx(mean, rel=1e-9)
    assert (revenue["ci"]["low"], revenue["ci"]["high"]) == pytest.approx((ci.low, ci.high), rel=1e-6)
