"""The ads audience sync against a local provider peer that checks auth and hashed identifiers; the
digests judged by Meta's published examples and by hashlib over values normalised by hand."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from rulesvc_ads import AudienceSync, member

from rulesvc.channels import ChannelSettingsError
from rulesvc.config import Settings
from rulesvc.core.audiences import normalise_phone
from rulesvc.plugins import builtin_channels
from rulesvc.web.app import create_app
from tests.helpers import eventually, write_ruleset

HEX64 = re.compile(r"^[0-9a-f]{64}$")


class AdsPeer:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.fail_next = 0

    async def members(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != "Bearer ads-token":
            return web.json_response({"error": "unauthorized"}, status=401)
        raw = await request.text()
        if "@" in raw or "+49" in raw:
            return web.json_response({"error": "plain identifiers are not accepted"}, status=400)
        body = json.loads(raw)
        for entry in body["add"] + body["remove"]:
            keys_ok = all(k in ("email_sha256", "phone_sha256") and HEX64.match(v) for k, v in entry.items())
            if not entry or not keys_ok:
                return web.json_response({"error": "bad member"}, status=400)
        if self.fail_next:
            self.fail_next -= 1
            return web.json_response({"error": "internal"}, status=500)
        self.calls.append((request.match_info["audience"], body))
        return web.json_response({"received": len(body["add"]) + len(body["remove"])})


def h(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


async def test_audience_changes_are_batched_hashed_and_retried(
    make_client: Any, aiohttp_server: Any, settings: Settings, db: Any
) -> None:
    peer = AdsPeer()
    peer.fail_next = 1
    app = web.Application()
    app.router.add_post("/audiences/{audience}/members", peer.members)
    server = await aiohttp_server(app)
    join = {
        "name": "join",
        "when": {"event": "cart_updated"},
        "then": [{"audience": {"add": "cart_abandoners"}}],
    }
    leave = {
        "name": "leave",
        "when": {"event": "purchased"},
        "then": [{"audience": {"remove": "cart_abandoners"}}],
    }
    write_ruleset(Path(settings.rulesets_dir), "ads", {"rules": [join, leave]})
    channels = builtin_channels()
    job = AudienceSync({"base_url": str(server.make_url("")), "token": "ads-token", "interval": 0.3})
    channels.jobs.append(job)
    client = await make_client(create_app(settings, channels))
    assert (
        await client.put("/v1/contacts/c1", json={"email": "Ann@Example.COM", "phone": "+4915112345678"})
    ).status == 201
    assert (await client.put("/v1/contacts/c2", json={"email": "bob@example.com"})).status == 201
    events = [
        {"id": "a", "type": "cart_updated", "contact_id": "c1"},
        {"id": "b", "type": "cart_updated", "contact_id": "c2"},
        {"id": "c", "type": "purchased", "contact_id": "c2", "time": "2099-01-01T00:00:00Z"},
        {"id": "d", "type": "cart_updated", "contact_id": "c3"},  # no email or phone: nothing to match on
    ]
    assert (await client.post("/v1/events", json=events)).status == 202

    async def synced() -> bool:
        return bool(peer.calls) and await db.audience_changes.count_documents({"synced": False}) == 0

    await eventually(synced)
    adds = [m for audience, body in peer.calls for m in body["add"] if audience == "cart_abandoners"]
    removes = [m for audience, body in peer.calls for m in body["remove"] if audience == "cart_abandoners"]
    assert adds == [{"email_sha256": h("ann@example.com"), "phone_sha256": h("+4915112345678")}]
    assert removes == [{"email_sha256": h("bob@example.com")}]  # its last change was a removal
    contact = await db.contacts.find_one({"_id": "c1"})
    assert "cart_abandoners" in contact["state"]["audiences"]


def test_phone_normalisation() -> None:
    assert normalise_phone("+49 151 1234-5678") == "+4915112345678"
    assert normalise_phone("0049 151 12345678") == "+4915112345678"
    assert normalise_phone("0151 12345678") is None  # no country code: cannot be matched reliably
    assert normalise_phone("0049 (151) 1234-5678", "meta") == "4915112345678"
    assert normalise_phone("0151 12345678", "meta") is None


# Meta's own examples (Conversions API, customer information parameters: `em` and `ph`): the input, and
# the SHA-256 Meta expects. Its phone example is "US phone number (650)555-1212", normalised 16505551212.
META_EMAIL = ("John_Smith@gmail.com", "62a14e44f765419d10fea99367361a727c12365e2520f32218d505ed9aa0f62f")
META_PHONE = ("+1 (650) 555-1212", "e323ec626319ca94ee8bff2e4c87cf613be6ea19919ed1364124e16807ab3176")


def test_meta_hashes_match_metas_published_examples() -> None:
    """Found: phones were hashed with their `+`, a digest Meta never matches."""
    contact = {"email": f"  {META_EMAIL[0]} ", "phone": META_PHONE[0]}
    assert member(contact, "meta") == {"email_sha256": META_EMAIL[1], "phone_sha256": META_PHONE[1]}


def test_google_and_generic_hash_e164() -> None:
    """Google Customer Match: E.164 with the `+`, email trimmed and lower-cased."""
    contact = {"email": META_EMAIL[0], "phone": "+1 (650) 555-1212"}
    e164 = {"email_sha256": h("john_smith@gmail.com"), "phone_sha256": h("+16505551212")}
    assert member(contact, "google") == e164
    assert member(contact, "generic") == e164
    assert member(contact) == e164  # generic is the default


def test_platform_setting_is_checked() -> None:
    config = {"base_url": "https://ads.example", "token": "t"}
    assert AudienceSync({**config, "platform": "meta"}).status()[1].endswith("(meta matching)")
    with pytest.raises(ChannelSettingsError) as wrong:
        AudienceSync({**config, "platform": "facebook"})
    assert wrong.value.problems == [
        'channels.ads.platform: expected one of `generic`, `meta`, `google`, got "facebook"'
    ]


async def test_meta_platform_sends_digits_only_phone_digests(
    make_client: Any, aiohttp_server: Any, settings: Settings, db: Any
) -> None:
    peer = AdsPeer()
    app = web.Application()
    app.router.add_post("/audiences/{audience}/members", peer.members)
    server = await aiohttp_server(app)
    join = {"name": "join", "when": {"event": "cart_updated"}, "then": [{"audience": {"add": "buyers"}}]}
    write_ruleset(Path(settings.rulesets_dir), "ads", {"rules": [join]})
    channels = builtin_channels()
    job = AudienceSync({"base_url": str(server.make_url("")), "token": "ads-token", "interval": 0.3,
                        "platform": "meta"})  # fmt: skip
    channels.jobs.append(job)
    client = await make_client(create_app(settings, channels))
    profile = {"email": "Ann@Example.COM", "phone": "+4915112345678"}  # the API takes E.164 only
    assert (await client.put("/v1/contacts/c1", json=profile)).status == 201
    assert (
        await client.post("/v1/events", json=[{"id": "a", "type": "cart_updated", "contact_id": "c1"}])
    ).status == 202

    async def synced() -> bool:
        return bool(peer.calls) and await db.audience_changes.count_documents({"synced": False}) == 0

    await eventually(synced)
    assert peer.calls == [
        ("buyers", {"add": [{"email_sha256": h("ann@example.com"), "phone_sha256": h("4915112345678")}],
                    "remove": []})
    ]  # fmt: skip
