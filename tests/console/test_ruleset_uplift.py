"""A ruleset page's uplift section with enough data: each comparison of `GET /v1/stats` drawn as an
interval chart with its numbers, and the groups' table. The `stats` collection is seeded with counts in
its documented schema (as tests/test_stats_api.py does); the page is read over HTTP with a console
session, and judged against the API's own answer for the same window."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from rulesvc.config import Settings
from rulesvc.web.app import create_app
from rulesvc.web.keys import KEYS
from tests.test_backtest_api import write_rulesets

ARMS = [{"name": "a", "weight": 50}, {"name": "b", "weight": 50, "channel": "email"}]
PROMO = {
    "holdout": "10%",
    "goal": {"event": "purchased", "within": "5d"},
    "rules": [{"name": "remind", "when": {"event": "cart_updated"},
               "then": [{"send": {"channel": "log", "template": "cart", "after": "20m", "variants": ARMS}}]}],
}  # fmt: skip
GROUPS = {"a": (1500, 75), "b": (1500, 120), "holdout": (330, 6)}


async def test_uplift_with_intervals(make_client: Any, settings: Settings, db: Any) -> None:
    write_rulesets(Path(settings.rulesets_dir), {"promo": PROMO})
    app = create_app(settings)
    client = await make_client(app)
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=2)
    docs = [
        {"_id": f"{hour.isoformat()}|promo|remind|{group}||w1", "hour": hour, "ruleset": "promo",
         "rule": "remind", "variant": group, "channel": "", "shard": "w1",
         "counts": {"entered": entries, "converted": conversions}, "reasons": {}, "revenue": 0.0,
         "revenue_sq": 0.0}
        for group, (entries, conversions) in GROUPS.items()
    ]  # fmt: skip
    await db.stats.insert_many(docs)

    key, _ = await app[KEYS].create("read", "console test")
    page = await (await client.get("/console/login")).text()
    token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
    del client.session.headers["Authorization"]  # the console's own session, not the API key
    logged = await client.post(
        "/console/login", data={"csrf_token": token, "api_key": key, "next": "/console/"}
    )
    assert logged.status == 200 and "/console/login" not in str(logged.url)
    response = await client.get("/console/rulesets/promo?window=24h")
    assert response.status == 200
    html = await response.text()

    window = re.search(r"Counts from (\S+ \S+) UTC to (\S+ \S+) UTC", html)
    assert window is not None
    frm = datetime.strptime(window.group(1), "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
    stats = await client.get(
        "/v1/stats",
        params={"ruleset": "promo", "from": frm.isoformat()},
        headers={"Authorization": f"Bearer {key}"},
    )
    report = await stats.json()
    assert [g["group"] for g in report["groups"]] == ["treatment", "a", "b", "holdout"]
    assert len(report["comparisons"]) == 4  # treatment, a, b against the holdout; b against a
    for c in report["comparisons"]:
        a = c["absolute_uplift"]
        assert f"{c['group']} against {c['baseline']}" in html
        said = f"{a['value'] * 100:+.1f} points</strong> (95 % interval {a['ci']['low'] * 100:+.1f} points to " \
               f"{a['ci']['high'] * 100:+.1f} points)"  # fmt: skip
        assert said in html, said
        label = f"Uplift of {c['group']} over {c['baseline']}"
        assert f'aria-label="{label}: {a["value"] * 100:+.1f} points' in html, label
        if not c["enough_data"]:
            assert c["note"] in html.replace("&#39;", "'")
    assert html.count('<svg class="interval"') == 4
    for g in report["groups"]:
        assert re.search(
            rf"<th scope=\"row\">{g['group']}</th><td class=\"num\">{g['entries']:,}</td>", html
        ), g
