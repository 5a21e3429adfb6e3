"""Console pages in states a browser test cannot reach quickly, read over HTTP with a console session:
a ruleset's uplift with enough data (the `stats` collection seeded with counts in its documented schema,
as tests/test_stats_api.py does; judged against `GET /v1/stats` for the same window), and a backtest
while it runs (its job document as the job's process writes it; judged by the numbers written)."""

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


async def console_login(client: Any, app: Any, scope: str) -> str:
    """Log the test client in to the console with a new key of `scope` (the form, its token, its cookie);
    the API key header goes: pages see the console session only. Returns the key."""
    key, _ = await app[KEYS].create(scope, "console test")
    page = await (await client.get("/console/login")).text()
    token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
    del client.session.headers["Authorization"]
    logged = await client.post(
        "/console/login", data={"csrf_token": token, "api_key": key, "next": "/console/"}
    )
    assert logged.status == 200 and "/console/login" not in str(logged.url)
    return str(key)


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
        low, high = a["ci"]["low"] * 100, a["ci"]["high"] * 100
        said = (
            f"{a['value'] * 100:+.1f} points</strong> (95 % interval {low:+.1f} points to {high:+.1f} points)"
        )
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


async def test_a_running_backtest_shows_its_progress_and_refreshes(
    make_client: Any, settings: Settings, db: Any
) -> None:
    write_rulesets(Path(settings.rulesets_dir), {"promo": PROMO})
    app = create_app(settings)
    client = await make_client(app)
    await console_login(client, app, "read")
    now = datetime.now(UTC)
    window = {"start": now - timedelta(days=1), "end": now}
    await db.backtests.insert_one({
        "_id": "bt-running", "status": "running", "active": True, "created_at": now, "started_at": now,
        "heartbeat_at": now, "cancel_requested": False, "owner": "host:1",
        "request": {"window": window, "baseline": "live rulesets", "candidate": "/srv/next", "contacts": None,
                    "examples": 5},
        "progress": {"replayed": 4200, "total": 10000, "contacts": 310, "percent": 42.0,
                     "elapsed_seconds": 12.0, "eta_seconds": 16.6},
    })  # fmt: skip
    response = await client.get("/console/try/backtests/bt-running")
    assert response.status == 200
    html = await response.text()
    assert '<meta http-equiv="refresh" content="2">' in html
    assert (
        "<strong>42 %</strong>: 4,200 of 10,000 events replayed, 310 contacts done, 12 s so far, about 17 s"
        in html
    )
    assert '<progress max="100" value="42.0"' in html
    listing = await (await client.get("/console/try/backtests")).text()
    assert "/console/try/backtests/bt-running" in listing and "42 %" in listing
    assert "A read-only session can look at backtests but not start one." in listing

    await db.backtests.update_one(
        {"_id": "bt-running"},
        {"$set": {"status": "cancelled", "finished_at": now, "error": "cancelled by request"},
         "$unset": {"active": ""}},
    )  # fmt: skip
    html = await (await client.get("/console/try/backtests/bt-running")).text()
    assert "http-equiv" not in html and "cancelled by request" in html
    missing = await client.get("/console/try/backtests/nope")
    assert missing.status == 404 and "no such backtest" in await missing.text()
