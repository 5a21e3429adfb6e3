"""GET /v1/contacts?q= (search by id, email in any letter case, phone) and GET /v1/contacts/{id}/state
(what the service keeps about a contact), against a real mongod and the live engine."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec

from rulesvc.config import Settings
from rulesvc.web.app import create_app
from tests.helpers import eventually, write_ruleset
from tests.stored import plant


async def test_search_by_id_email_any_case_and_phone(client: Any, db: Any) -> None:
    for cid, profile in {
        "c-a": {"email": "Ana.Smith@Example.com"},
        "c-b": {"email": "ana.smith@example.com", "phone": "+4915112345678"},
        "c-c": {"email": "bob@example.com"},
    }.items():
        assert (await client.put(f"/v1/contacts/{cid}", json=profile)).status == 201

    async def search(q: str, **extra: str) -> list[tuple[str, str]]:
        resp = await client.get("/v1/contacts", params={"q": q, **extra})
        assert resp.status == 200, await resp.text()
        return [(c["contact_id"], c["matched"]) for c in (await resp.json())["contacts"]]

    assert await search("ANA.SMITH@example.COM") == [("c-a", "email"), ("c-b", "email")]
    assert await search("  ana.smith@example.com ") == [("c-a", "email"), ("c-b", "email")]
    assert await search("ana.smith@example.com", limit="1") == [("c-a", "email")]
    assert await search("c-c") == [("c-c", "id")]
    assert await search("+4915112345678") == [("c-b", "phone")]
    assert await search("nobody@example.com") == []
    assert await search("c-zz") == []
    first = (await (await client.get("/v1/contacts", params={"q": "c-b"})).json())["contacts"][0]
    assert first["email"] == "ana.smith@example.com" and first["stored"] is True
    assert "state" not in first and "version" not in first

    # An id with events but no stored contact yet is found (not stored).
    await db.events.insert_one({"_id": "e-only", "type": "x", "contact_id": "c-events",
                                "time": datetime.now(UTC)})  # fmt: skip
    found = (await (await client.get("/v1/contacts", params={"q": "c-events"})).json())["contacts"]
    assert [(c["contact_id"], c["stored"]) for c in found] == [("c-events", False)]

    for params, field in (({}, "q"), ({"q": ""}, "q"), ({"q": "a", "limit": "51"}, "limit"),
                          ({"q": "a", "qq": "b"}, "qq")):  # fmt: skip
        resp = await client.get("/v1/contacts", params=params)
        assert resp.status == 422, params
        assert (await resp.json())["field"] == field


async def test_email_search_uses_its_index(client: Any, db: Any) -> None:
    assert (await client.put("/v1/contacts/c1", json={"email": "x@example.com"})).status == 201
    plan = await db.command(
        "explain",
        {"find": "contacts", "filter": {"email": "X@EXAMPLE.COM"},
         "collation": {"locale": "en", "strength": 2}},
        verbosity="queryPlanner",
    )  # fmt: skip
    assert "contacts_by_email" in str(plan["queryPlanner"]["winningPlan"])


def held_out(salt: str, contact_id: str, share: float) -> bool:
    """The holdout draw as documented (core/assign.py): SHA-256 of salt, id and purpose, as a fraction."""
    digest = hashlib.sha256(f"{salt}\x00{contact_id}\x00holdout".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


async def test_state_of_a_contact_after_its_events(make_client: Any, settings: Settings) -> None:
    folder = Path(settings.rulesets_dir)
    (folder / "templates").mkdir(parents=True)
    (folder / "templates" / "hello.body").write_text("hello")
    write_ruleset(folder, "track", {"rules": [{"name": "go", "when": {"event": "go"}, "then": [
        {"set_flag": {"name": "seen", "for": "1h"}},
        {"count": {"name": "goes", "window": "1d"}},
        {"remember": {"name": "last_code", "from": "attributes.code"}},
        {"suppress": {"channel": "sms", "for": "2h"}},
        {"send": {"channel": "log", "template": "hello"}},
    ]}]})  # fmt: skip
    write_ruleset(folder, "later", {"holdout": "50%", "rules": [
        {"name": "thanks", "when": {"event": "purchase"},
         "then": [{"send": {"channel": "log", "template": "hello"}}]}]})  # fmt: skip
    settings = msgspec.structs.replace(settings, frequency_caps={"log": 2, "email": 3})
    client = await make_client(create_app(settings))
    contact = "c-state"
    profile = {"email": "c@example.com", "consent": {"email": False}}
    assert (await client.put(f"/v1/contacts/{contact}", json=profile)).status == 201
    now = datetime.now(UTC)
    before = now.replace(microsecond=now.microsecond // 1000 * 1000)  # MongoDB keeps milliseconds
    events = [{"id": f"go-{i}", "type": "go", "contact_id": contact, "attributes": {"code": code}}
              for i, code in enumerate("ABC")]  # fmt: skip
    assert (await client.post("/v1/events", json=events)).status == 202

    async def decided() -> bool:
        page = await (await client.get(f"/v1/contacts/{contact}/messages")).json()
        return len(page["messages"]) == 3 and all(
            m["status"] in ("sent", "suppressed") for m in page["messages"]
        )

    await eventually(decided)
    resp = await client.get(f"/v1/contacts/{contact}/state")
    assert resp.status == 200, await resp.text()
    state = await resp.json()
    after = datetime.now(UTC)
    assert state["contact_id"] == contact and state["stored"] is True
    assert state["consent"] == {"email": False}

    def at(text: str) -> datetime:
        return datetime.fromisoformat(text)

    (flag,) = state["flags"]
    assert flag["name"] == "seen" and flag["active"] is True
    assert (
        before + timedelta(hours=1) - timedelta(seconds=1) <= at(flag["until"]) <= after + timedelta(hours=1)
    )
    assert state["counters"] == [{"name": "goes", "value": 3, "window": "1d", "per_key": False}]
    (value,) = state["values"]
    assert (value["name"], value["value"], value["active"]) == ("last_code", "C", True)
    (sms,) = state["suppressions"]
    assert sms["channel"] == "sms" and sms["active"] is True
    assert (
        before + timedelta(hours=2) - timedelta(seconds=1) <= at(sms["until"]) <= after + timedelta(hours=2)
    )
    assert state["session"]["number"] == 1

    channels = {c["channel"]: c for c in state["channels"]}
    log = channels["log"]
    # Two marketing messages a day on `log`: the first two went out, so the next would be suppressed.
    assert (log["cap"], log["sent_today"], log["blocked_by"]) == (2, 2, "frequency_cap")
    assert log["consent_needed"] is False and log["reachable"] is True
    email = channels["email"]
    assert email["consent"] is False and email["consent_needed"] is True
    assert email["sent_today"] == 0 and email["cap"] == 3
    # No email settings in this test: the first thing that stops an email is that, then the consent.
    assert (email["configured"], email["blocked_by"]) == (False, "channel_not_configured")
    assert email["why"].startswith("email: not configured")
    assert channels["sms"]["suppressed"] is True

    page = await (await client.get(f"/v1/contacts/{contact}/messages")).json()
    assert sorted((m["status"], m.get("reason")) for m in page["messages"]) == [
        ("sent", None), ("sent", None), ("suppressed", "frequency_cap")]  # fmt: skip

    rulesets = {r["ruleset"]: r for r in state["rulesets"]}
    (go,) = rulesets["track"]["listens_to"]
    assert (go["type"], go["count"]) == ("go", 3) and before <= at(go["last_at"]) <= after
    assert rulesets["track"]["group"] == "" and rulesets["track"]["held_out"] is False
    assert rulesets["later"]["listens_to"] == [{"type": "purchase", "count": 0, "last_at": None}]
    expected = held_out("later", contact, 0.5)
    assert rulesets["later"]["held_out"] is expected and rulesets["later"]["holdout"] == "50%"
    assert rulesets["track"]["holdout"] is None
    assert rulesets["later"]["group"] == ("holdout" if expected else "")
    assert "version" not in state and "leases" not in str(state)


async def test_state_of_nobody_and_bad_id(client: Any) -> None:
    resp = await client.get("/v1/contacts/nobody/state")
    assert resp.status == 404
    assert "no such contact" in (await resp.json())["error"]
    resp = await client.get("/v1/contacts/a%20b/state")
    assert resp.status == 400


async def test_documented_in_openapi(client: Any) -> None:
    doc = await (await client.get("/openapi.json")).json()
    search = doc["paths"]["/v1/contacts"]["get"]
    assert search["operationId"] == "searchContacts"
    assert {p["name"]: p["required"] for p in search["parameters"]} == {"q": True, "limit": False}
    state = doc["paths"]["/v1/contacts/{contact_id}/state"]["get"]
    assert state["operationId"] == "getContactState" and "404" in state["responses"]
    fields = doc["components"]["schemas"]["ContactState"]["properties"]
    assert {"channels", "suppressions", "flags", "counters", "values", "rulesets"} <= set(fields)
    assert not {"version", "leases", "state"} & set(fields)
    names = {p["name"] for p in doc["paths"]["/v1/messages"]["get"]["parameters"]}
    assert {"ruleset", "rule", "channel", "status", "reason", "from", "to"} <= names


async def test_what_the_why_panel_reads(make_client: Any, settings: Settings, db: Any) -> None:
    """A ruleset's `timeout` in the state; each event's state, arrival and failures in the contact's events;
    a message's fallback channels."""
    folder = Path(settings.rulesets_dir)
    (folder / "templates").mkdir(parents=True)
    (folder / "templates" / "hello.body").write_text("hello")
    send = {"channel": "log", "template": "hello", "fallback": ["email"], "after": "1h"}
    write_ruleset(folder, "carts", {"timeout": "12h", "rules": [
        {"name": "nudge", "when": {"event": "cart"}, "then": [{"send": send}]}]})  # fmt: skip
    client = await make_client(create_app(settings))
    now = datetime.now(UTC)
    old = (now - timedelta(hours=13)).replace(microsecond=0)
    events = [{"id": "old", "type": "cart", "contact_id": "w1", "time": old.isoformat()},
              {"id": "new", "type": "cart", "contact_id": "w1"}]  # fmt: skip
    assert (await client.post("/v1/events", json=events)).status == 202
    await plant(db, [{"_id": "bad", "type": "cart", "contact_id": "w1", "time": now,
                      "received_at": now, "state": "quarantined", "attempts": 3,
                      "error": "KeyError: 'sku'", "quarantined_at": now}])  # fmt: skip

    async def listed() -> dict[str, dict[str, Any]]:
        return {e["id"]: e for e in (await (await client.get("/v1/contacts/w1/events")).json())["events"]}

    async def decided() -> bool:
        return (await listed())["new"]["state"] == "done"

    await eventually(decided)
    found = await listed()
    assert found["old"]["state"] == "done" and at_least(found["old"]["received_at"], now)
    assert datetime.fromisoformat(found["old"]["time"]) == old
    assert (found["bad"]["state"], found["bad"]["attempts"], found["bad"]["error"]) == (
        "quarantined", 3, "KeyError: 'sku'")  # fmt: skip
    assert "attempts" not in found["new"] and "error" not in found["new"]
    state = await (await client.get("/v1/contacts/w1/state")).json()
    assert [(r["ruleset"], r["timeout"]) for r in state["rulesets"]] == [("carts", "12h")]
    # The old event started nothing (the timeout); the new one a send in an hour, with its fallback.
    (message,) = (await (await client.get("/v1/contacts/w1/messages")).json())["messages"]
    assert (message["status"], message["fallback"]) == ("scheduled", ["email"])


def at_least(text: str, moment: datetime) -> bool:
    return datetime.fromisoformat(text) >= moment.replace(microsecond=moment.microsecond // 1000 * 1000)
