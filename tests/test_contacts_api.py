"""PUT/GET /v1/contacts/{id}: profile validation with field paths, replace semantics."""

from __future__ import annotations

from typing import Any

import pytest

PROFILE: dict[str, Any] = {
    "email": "jane@example.com",
    "phone": "+4915112345678",
    "push_tokens": ["fcm-token-1"],
    "webpush_subscriptions": [
        {
            "endpoint": "https://push.example.net/sub/abc",
            "keys": {
                "p256dh": "BNcRdreALRFXTkOOUHK1EtK2wtaz5Ry4YfYCA_0QTpQtUbVlUls0VJXg7A8u"
                "-Ts1XbjhazAkj7I99e8QcYP7DkM",
                "auth": "tBHItJI5svbpez7KI4CCXg",
            },
        }
    ],
    "consent": {"email": True, "sms": False, "push": True},
    "timezone": "Europe/Berlin",
    "attributes": {"first_name": "Jane", "tier": "gold"},
}


async def test_create_then_read(client: Any) -> None:
    resp = await client.put("/v1/contacts/c-42", json=PROFILE)
    assert resp.status == 201
    created = await resp.json()
    assert created["contact_id"] == "c-42"
    resp = await client.get("/v1/contacts/c-42")
    assert resp.status == 200
    body = await resp.json()
    for key, value in PROFILE.items():
        assert body[key] == value
    assert body["email_invalid"] is False
    assert body["created_at"] == created["created_at"]


async def test_put_replaces_profile_keeps_created_at(client: Any) -> None:
    first = await (await client.put("/v1/contacts/c-1", json=PROFILE)).json()
    resp = await client.put("/v1/contacts/c-1", json={"phone": "+447700900123", "consent": {"sms": True}})
    assert resp.status == 200
    body = await (await client.get("/v1/contacts/c-1")).json()
    assert body["phone"] == "+447700900123"
    assert body["email"] is None  # replaced, not merged
    assert body["consent"] == {"sms": True}
    assert body["created_at"] == first["created_at"]
    assert body["updated_at"] > first["updated_at"]


async def test_unknown_contact_404(client: Any) -> None:
    resp = await client.get("/v1/contacts/nobody")
    assert resp.status == 404
    assert (await resp.json())["error"] == "no such contact"


@pytest.mark.parametrize(
    ("change", "path"),
    [
        ({"email": "not-an-email"}, "$.email"),
        ({"phone": "015112345678"}, "$.phone"),
        ({"phone": "+49 151 1234"}, "$.phone"),
        ({"timezone": "Europe/Berln"}, "$.timezone"),
        ({"timezone": "../../etc/passwd"}, "$.timezone"),
        ({"timezone": "localtime"}, "$.timezone"),  # the server's own zone, whatever that is
        ({"timezone": "posixrules"}, "$.timezone"),
        ({"timezone": "Factory"}, "$.timezone"),
        ({"consent": {"email": "yes"}}, "$.consent.email"),
        ({"consent": {"E-Mail": True}}, "$.consent"),
        ({"push_tokens": "abc"}, "$.push_tokens"),
        ({"push_tokens": ["a", "a"]}, "$.push_tokens"),
        (
            {"webpush_subscriptions": [{"endpoint": "https://x.example/1", "keys": {"auth": "a"}}]},
            "$.webpush_subscriptions[0].keys",
        ),
        (
            {"webpush_subscriptions": [{"endpoint": "ftp://x", "keys": {"auth": "a", "p256dh": "b"}}]},
            "$.webpush_subscriptions[0].endpoint",
        ),
        ({"nickname": "J"}, "$"),
    ],
)
async def test_invalid_values_422_with_path_and_nothing_changed(
    client: Any, change: dict[str, Any], path: str
) -> None:
    await client.put("/v1/contacts/c-v", json=PROFILE)
    resp = await client.put("/v1/contacts/c-v", json={**PROFILE, **change})
    assert resp.status == 422
    errors = (await resp.json())["errors"]
    assert [e["path"] for e in errors] == [path]
    assert errors[0]["message"]
    body = await (await client.get("/v1/contacts/c-v")).json()
    assert body["email"] == PROFILE["email"] and body["timezone"] == PROFILE["timezone"]


async def test_malformed_and_wrong_type(client: Any) -> None:
    resp = await client.put("/v1/contacts/c1", data=b"{", headers={"Content-Type": "application/json"})
    assert resp.status == 400
    resp = await client.put("/v1/contacts/c1", data=b"{}", headers={"Content-Type": "text/plain"})
    assert resp.status == 415


async def test_bounced_mark_survives_same_email_and_clears_on_new_one(client: Any, db: Any) -> None:
    await client.put("/v1/contacts/c-b", json=PROFILE)
    await db.contacts.update_one({"_id": "c-b"}, {"$set": {"email_invalid": True}})
    await client.put("/v1/contacts/c-b", json={**PROFILE, "attributes": {"tier": "silver"}})
    assert (await (await client.get("/v1/contacts/c-b")).json())["email_invalid"] is True
    await client.put("/v1/contacts/c-b", json={**PROFILE, "email": "jane.new@example.com"})
    assert (await (await client.get("/v1/contacts/c-b")).json())["email_invalid"] is False
