"""The funnel's hourly counters (`stats`) add up to what happened: every message counted once as
scheduled and once per status it reached, every outcome once per message however often it is reported;
the judge is the `messages` collection and the events the test posted, never the counting code."""

from __future__ import annotations

import zoneinfo
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec

from rulesvc.channels import Delivery, OutboundMessage
from rulesvc.config import Settings
from rulesvc.store.stats import Stats
from rulesvc.web.app import create_app
from rulesvc.web.keys import STORE
from tests.helpers import (
    PROFILE,
    TEMPLATES,
    Provider,
    entry_doc,
    eventually,
    message_doc,
    registry,
    send,
    setup,
    write_ruleset,
)

Count = Counter[tuple[str, str, str, str]]  # (rule, variant, channel, status) -> n
KOLKATA = "Asia/Kolkata"


def flow(settings: Settings) -> Settings:
    """On `go`: a push and a log line now, an email in an hour that a purchase cancels. Quiet hours
    around now in Kolkata (and not in UTC): a Kolkata contact's push waits."""
    folder = Path(settings.rulesets_dir)
    (folder / "templates").mkdir(parents=True, exist_ok=True)
    for name, text in TEMPLATES.items():
        (folder / "templates" / name).write_text(text)
    params = {"code": "$attributes.code"}
    rules = [
        {"name": "go", "when": {"event": "go"}, "then": [
            {"send": {"channel": "push", "template": "hello", "params": params}},
            {"send": {"channel": "log", "template": "hello", "params": params}},
        ]},
        {"name": "later", "when": {"event": "go"}, "then": [
            {"send": {"channel": "email", "template": "hello", "params": params, "after": "1h",
                      "cancel_on": ["purchased"]}},
        ]},
    ]  # fmt: skip
    write_ruleset(folder, "flow", {"rules": rules})
    local = datetime.now(UTC).astimezone(zoneinfo.ZoneInfo(KOLKATA))
    window = f"{(local - timedelta(hours=1)):%H:%M}-{(local + timedelta(hours=2)):%H:%M}"
    return msgspec.structs.replace(settings, quiet_hours=window)


def stored_counts(docs: list[dict[str, Any]]) -> tuple[Count, Counter[tuple[str, str, str]]]:
    """The `stats` documents added up by the test: counts, and reasons per (channel, status, reason)."""
    counts: Count = Counter()
    reasons: Counter[tuple[str, str, str]] = Counter()
    for d in docs:
        assert d["ruleset"] == "flow"
        for status, n in d["counts"].items():
            counts[d["rule"], d["variant"], d["channel"], status] += n
        for status, per in d.get("reasons", {}).items():
            for reason, n in per.items():
                reasons[d["channel"], status, reason] += n
    return counts, reasons


async def test_stats_add_up_to_the_messages_and_the_outcomes_posted(
    make_client: Any, settings: Settings, db: Any
) -> None:
    push, email = Provider("push", needs="push_tokens"), Provider("email", needs="email")
    app = create_app(flow(settings), registry(push, email))
    client = await make_client(app)
    profile = {"push_tokens": ["tok"], "email": "a@example.com"}
    consent = {"push": True, "email": True}
    contacts = {
        "buyer": {**profile, "consent": consent, "timezone": "UTC"},  # sent; the email cancelled
        "no-consent": {**profile, "consent": {"email": True}, "timezone": "UTC"},  # push suppressed
        "night": {**profile, "consent": consent, "timezone": KOLKATA},  # push postponed
    }
    for cid, body in contacts.items():
        assert (await client.put(f"/v1/contacts/{cid}", json=body)).status in (200, 201)
    go = [
        {"id": f"go-{cid}", "type": "go", "contact_id": cid, "attributes": {"code": "X"}} for cid in contacts
    ]
    assert (await client.post("/v1/events", json=go)).status == 202

    async def decided() -> bool:
        pushes = {m["contact_id"]: m async for m in db.messages.find({"channel": "push"})}
        return (
            len(pushes) == 3
            and pushes["buyer"]["status"] == "sent"
            and (
                pushes["no-consent"]["status"] == "suppressed"
                and pushes["night"].get("reason") == "quiet_hours"
            )
            and await db.messages.count_documents({"channel": "log", "status": "sent"}) == 3
        )

    await eventually(decided)
    ids = {(m["contact_id"], m["channel"]): m["_id"] async for m in db.messages.find({})}
    outcomes = [
        ("buyer", "push", "message_opened"),
        ("buyer", "push", "message_opened"),  # a second open of the same message: counted once
        ("buyer", "push", "message_delivered"),
        ("buyer", "log", "message_clicked"),
        ("no-consent", "push", "message_opened"),  # never sent: recorded on it, not counted
    ]
    events: list[dict[str, Any]] = [
        {"id": f"out-{i}", "type": kind, "contact_id": cid, "attributes": {"message_id": ids[cid, channel]}}
        for i, (cid, channel, kind) in enumerate(outcomes)
    ]
    # A report naming another channel than the message's: counted on the channel the message went out on
    # (a payload never makes a counter key, nor a metric label).
    events[2]["attributes"]["channel"] = "made-up"
    events.append({"id": "buy", "type": "purchased", "contact_id": "buyer", "attributes": {}})
    assert (await client.post("/v1/events", json=events)).status == 202

    async def recorded() -> bool:
        pending = await db.inbox.count_documents({"state": "pending"})
        return bool(pending == 0 and await db.messages.count_documents({"status": "cancelled"}) == 1)

    await eventually(recorded)

    # The judge: from the messages as stored, and the outcomes as posted.
    messages = await db.messages.find({}).to_list()
    expected: Count = Counter()
    expected_reasons: Counter[tuple[str, str, str]] = Counter()
    by_id = {m["_id"]: m for m in messages}
    for m in messages:
        channel = m.get("sent_channel") or m["channel"]
        expected[m["rule"], "", channel, "scheduled"] += 1
        status = m["status"]
        if m.get("sent_at") is not None:
            expected[m["rule"], "", channel, "sent"] += 1
        elif status == "scheduled" and m.get("reason") == "quiet_hours":
            expected[m["rule"], "", channel, "postponed"] += 1
            expected_reasons[channel, "postponed", "quiet_hours"] += 1
        elif status in ("suppressed", "cancelled"):
            expected[m["rule"], "", channel, status] += 1
            expected_reasons[channel, status, m["reason"]] += 1
    for mid, kind in {(e["attributes"]["message_id"], e["type"]) for e in events if e["id"] != "buy"}:
        m = by_id[mid]
        if m.get("sent_at") is not None:
            expected[m["rule"], "", m.get("sent_channel") or m["channel"], kind.removeprefix("message_")] += 1
    # Each contact's `go` made it enter the ruleset once (the rule `go` fired with nothing pending).
    expected["go", "", "", "entered"] += len(contacts)
    assert expected[("go", "", "push", "opened")] == 1 and expected[("later", "", "email", "cancelled")] == 1
    assert expected_reasons == {
        ("push", "suppressed", "no_consent"): 1,
        ("push", "postponed", "quiet_hours"): 1,
        ("email", "cancelled", "cancelled_by_event"): 1,
    }

    docs = await db.stats.find({}).to_list()
    counts, reasons = stored_counts(docs)
    assert counts == expected
    assert reasons == expected_reasons
    now = datetime.now(UTC)
    assert all(d["hour"] <= now and d["hour"].minute == 0 and d["shard"] for d in docs)

    # The read adds shards and hours up to the same numbers.
    rows = await Stats(app[STORE]).totals(
        "flow", since=now - timedelta(days=1), until=now + timedelta(hours=1)
    )
    read: Count = Counter()
    for row in rows:
        for status, n in row["counts"].items():
            read[row["rule"], row["variant"], row["channel"], status] += n
    assert read == expected
    per_day: dict[datetime, Counter[str]] = {}
    for d in docs:
        if d["rule"] == "later":
            per_day.setdefault(d["hour"].replace(hour=0), Counter()).update(d["counts"])
    days = await Stats(app[STORE]).totals("flow", rule="later", since=now - timedelta(days=1), by="day")
    assert {row["at"]: row["counts"] for row in days} == per_day
    assert sum(per_day.values(), Counter()) == {"scheduled": 3, "cancelled": 1}
    assert [row["reasons"] for row in days if "cancelled" in row["counts"]] == [
        {"cancelled": {"cancelled_by_event": 1}}
    ]
    assert await Stats(app[STORE]).totals("flow", since=now + timedelta(hours=2)) == []

    # Prometheus counts the same, once each.
    text = await (await client.get("/metrics")).text()
    flow_lines = [line for line in text.splitlines() if line.startswith("rulesvc_flow_total{")]
    scraped: Count = Counter()
    for line in flow_lines:
        labels = dict(part.split("=", 1) for part in line[line.index("{") + 1 : line.index("}")].split(","))
        rule, variant, channel, status = (
            labels[k].strip('"') for k in ("rule", "variant", "channel", "status")
        )
        scraped[rule, variant, channel, status] += int(float(line.rsplit(" ", 1)[1]))
    assert scraped == expected


async def test_stats_off_writes_nothing(make_client: Any, settings: Settings, db: Any) -> None:
    push, email = Provider("push", needs="push_tokens"), Provider("email", needs="email")
    client = await make_client(create_app(msgspec.structs.replace(flow(settings), stats=False),
                                          registry(push, email)))  # fmt: skip
    body = {"push_tokens": ["tok"], "email": "a@example.com", "consent": {"push": True, "email": True}}
    assert (await client.put("/v1/contacts/c1", json=body)).status in (200, 201)
    go = {"id": "go-1", "type": "go", "contact_id": "c1", "attributes": {"code": "X"}}
    assert (await client.post("/v1/events", json=[go])).status == 202

    async def sent() -> bool:
        return bool(await db.messages.count_documents({"status": "sent"}) == 2)

    await eventually(sent)
    email_id = (await db.messages.find_one({"channel": "email"}))["_id"]
    assert (await client.post(f"/v1/messages/{email_id}/cancel")).status == 200
    push_id = (await db.messages.find_one({"channel": "push"}))["_id"]
    opened = {
        "id": "o-1",
        "type": "message_opened",
        "contact_id": "c1",
        "attributes": {"message_id": push_id},
    }
    assert (await client.post("/v1/events", json=[opened])).status == 202

    async def recorded() -> bool:
        return bool(await db.inbox.count_documents({"state": "pending"}) == 0)

    await eventually(recorded)
    assert await db.messages.count_documents({"outcomes.opened": {"$exists": True}}) == 1
    assert await db.stats.count_documents({}) == 0


class Unstorable(Provider):
    """Answers `sent` with a record no database can store for the message whose `code` says so."""

    async def send(self, message: OutboundMessage) -> Delivery:
        if message.params.get("code") == "unstorable":
            return Delivery("sent", record={"when": object()})
        return await super().send(message)


async def test_a_batch_the_database_refuses_is_counted_message_by_message(
    make_client: Any, settings: Settings, db: Any
) -> None:
    """The batch's transaction aborts on the value it cannot store; each message is then written, and
    counted, alone: every one once."""
    due = datetime.now(UTC) - timedelta(seconds=1)
    planted = [message_doc(f"m{i}", f"c{i}", "push", due, params={"code": code})
               for i, code in enumerate(["fine", "unstorable", "fine"])]  # fmt: skip
    await db.messages.insert_many(planted)
    await db.schedule.insert_many([entry_doc(m) for m in planted])
    await db.contacts.insert_many([{"_id": m["contact_id"], **PROFILE} for m in planted])
    push = Unstorable("push", needs="push_tokens")
    await make_client(create_app(setup(settings, [send("push", transactional=True)]), registry(push)))

    async def settled() -> bool:
        return bool(await db.messages.count_documents({"status": "sent"}) == 3)

    await eventually(settled)
    assert "when" not in await db.messages.find_one({"_id": "m1"})  # written alone, without the record
    docs = await db.stats.find({}).to_list()
    assert stored_counts(docs)[0] == {("go", "", "push", "sent"): 3}
