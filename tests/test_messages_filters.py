"""GET /v1/messages filters: ruleset, rule (within a ruleset), channel, status, reason and the time
window `from`/`to`, each checked against counts the test makes from the messages it stored."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from rulesvc.core.messages import Message
from rulesvc.store.db import Store
from tests.helpers import yesterday_at

T0 = yesterday_at(8)  # sent messages are kept a year from it
RULES = {"cart": ["remind", "last_call"], "browse": ["remind"]}
STATUSES = ["sent", "suppressed", "dead"]


def planted() -> list[Message]:
    """60 messages: every ruleset/rule, three statuses, two channels, one a minute from T0."""
    pairs = [(rs, rule) for rs, rules in RULES.items() for rule in rules]
    out = []
    for n in range(60):
        ruleset, rule = pairs[n % len(pairs)]
        status = STATUSES[(n // 3) % 3]
        out.append(Message(
            message_id=f"m{n:02d}", contact_id=f"c{n % 4}", ruleset=ruleset, rule=rule,
            channel="email" if n % 2 else "sms", template="t", status=status,  # type: ignore[arg-type]
            reason="no_consent" if status == "suppressed" else ("timeout" if status == "dead" else None),
            created_at=T0 + timedelta(minutes=n),
        ))  # fmt: skip
    return out


def z(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


async def listed(client: Any, **params: str) -> list[str]:
    """Every id the filter gives, following the pages (a small page size, so paging is exercised too)."""
    seen: list[str] = []
    query = {"limit": "7", **params}
    while True:
        resp = await client.get("/v1/messages", params=query)
        assert resp.status == 200, await resp.text()
        page = await resp.json()
        seen += [m["message_id"] for m in page["messages"]]
        if page["next_before"] is None:
            return seen
        query |= {"before": page["next_before"], "before_id": page["next_before_id"]}


async def test_each_filter_and_the_time_window(client: Any, db: Any, settings: Any) -> None:
    messages = planted()
    store = Store(db.client, settings.database, timedelta(days=1))
    for m in messages:
        await store.insert_message(m)

    def expect(keep: Any) -> list[str]:
        return [m.message_id for m in sorted(messages, key=lambda m: m.created_at, reverse=True) if keep(m)]

    start, end, later = T0 + timedelta(minutes=10), T0 + timedelta(minutes=25), T0 + timedelta(minutes=55)
    cases: list[tuple[dict[str, str], Any]] = [
        ({"ruleset": "cart"}, lambda m: m.ruleset == "cart"),
        ({"ruleset": "cart", "rule": "remind"}, lambda m: (m.ruleset, m.rule) == ("cart", "remind")),
        ({"ruleset": "browse", "rule": "remind"}, lambda m: (m.ruleset, m.rule) == ("browse", "remind")),
        ({"channel": "email"}, lambda m: m.channel == "email"),
        ({"status": "dead"}, lambda m: m.status == "dead"),
        ({"reason": "no_consent"}, lambda m: m.reason == "no_consent"),
        ({"from": z(start)}, lambda m: m.created_at >= start),
        ({"to": z(end)}, lambda m: m.created_at < end),
        ({"from": z(start), "to": z(end)}, lambda m: start <= m.created_at < end),
        ({"ruleset": "cart", "rule": "last_call", "status": "sent", "from": z(start), "to": z(later)},
         lambda m: (m.ruleset, m.rule, m.status) == ("cart", "last_call", "sent")
         and start <= m.created_at < later),
    ]  # fmt: skip
    for params, keep in cases:
        wanted = expect(keep)
        assert wanted, params  # every case selects something, and not everything
        assert len(wanted) < len(messages), params
        assert await listed(client, **params) == wanted, params


async def test_refused_combinations(client: Any) -> None:
    for params, field, words in (
        ({"rule": "remind"}, "rule", "needs `ruleset`"),
        ({"from": "2026-11-20T09:00:00Z", "to": "2026-11-20T09:00:00Z"}, "from", "before `to`"),
        ({"from": "2026-11-20T09:00:00"}, "from", "time zone"),
        ({"to": "yesterday"}, "to", "RFC 3339"),
    ):
        resp = await client.get("/v1/messages", params=params)
        assert resp.status == 422, params
        body = await resp.json()
        assert body["field"] == field and words in body["error"], body


async def test_ruleset_filter_uses_its_index(client: Any, db: Any, settings: Any) -> None:
    store = Store(db.client, settings.database, timedelta(days=1))
    for m in planted()[:5]:
        await store.insert_message(m)
    plan = await db.command(
        "explain",
        {"find": "messages", "filter": {"ruleset": "cart", "rule": "remind"},
         "sort": {"created_at": -1, "_id": -1}},
        verbosity="queryPlanner",
    )  # fmt: skip
    assert "messages_by_ruleset" in str(plan["queryPlanner"]["winningPlan"])
    assert "'SORT'" not in str(plan["queryPlanner"]["winningPlan"])  # a page in index order, not sorted
