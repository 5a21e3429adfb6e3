"""A partial profile (Segment traits, a Shopify customer) merges into the stored one: what it names
changes, consent and attributes merge key by key, and nothing it leaves out is lost."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from rulesvc.config import Settings
from rulesvc.core.contacts import ContactIn, ContactPatch
from rulesvc.store.db import Store


async def test_patch_merges_into_the_stored_profile(db: Any, settings: Settings) -> None:
    store = Store(db.client, settings.database, timedelta(days=1))
    await store.put_contact(
        "c1",
        ContactIn(
            email="old@example.com",
            phone="+4915112345678",
            consent={"email": True, "sms": False},
            attributes={"tier": "gold", "city": "Berlin"},
            push_tokens=["tok"],
        ),
    )
    await db.contacts.update_one({"_id": "c1"}, {"$set": {"email_invalid": True}})
    await store.patch_contact("c1", ContactPatch(consent={"sms": True}, attributes={"city": "Paris"}))
    doc = await db.contacts.find_one({"_id": "c1"})
    assert doc["email"] == "old@example.com" and doc["email_invalid"] is True  # untouched: still bounced
    assert doc["phone"] == "+4915112345678" and doc["push_tokens"] == ["tok"]
    assert doc["consent"] == {"email": True, "sms": True}
    assert doc["attributes"] == {"tier": "gold", "city": "Paris"}

    await store.patch_contact("c1", ContactPatch(email="new@example.com"))
    doc = await db.contacts.find_one({"_id": "c1"})
    assert (
        doc["email"] == "new@example.com" and doc["email_invalid"] is False
    )  # a new address is not known to bounce


async def test_patch_creates_a_new_contact(db: Any, settings: Settings) -> None:
    store = Store(db.client, settings.database, timedelta(days=1))
    await store.patch_contact("c2", ContactPatch(email="a@example.com", consent={"email": True}))
    doc = await db.contacts.find_one({"_id": "c2"})
    assert doc["email"] == "a@example.com" and doc["consent"] == {"email": True} and doc["attributes"] == {}
    assert doc["created_at"] == doc["updated_at"]
