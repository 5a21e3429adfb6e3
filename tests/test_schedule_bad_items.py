"""Scheduled work with bad items, live against a real mongod: an entry whose processing raises (a damaged
document, a plugin that raises what no one expects or answers nonsense) is set aside, `failed` with the
error, while the other due entries of its batch are sent; it is never retried forever."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from rulesvc.channels import Delivery, OutboundMessage
from rulesvc.config import Settings
from rulesvc.web.app import create_app
from tests.helpers import (
    PROFILE,
    Provider,
    entry_doc,
    eventually,
    go,
    history,
    message_doc,
    registry,
    send,
    setup,
)


class Fickle(Provider):
    """A plugin with bugs: what it does depends on the message's `code` parameter."""

    async def send(self, message: OutboundMessage) -> Delivery:
        self.keys_seen.append(message.message_id)
        code = message.params.get("code")
        if code == "cancel":
            raise asyncio.CancelledError()  # not a cancellation of ours: a plugin's bug
        if code == "none":
            return None  # type: ignore[return-value]
        if code == "unstorable":
            return Delivery("sent", record={"when": object()})  # nothing a database can store
        self.delivered.append(message)
        return Delivery("sent")


async def test_a_bad_scheduled_entry_is_set_aside_and_the_rest_of_its_batch_is_sent(
    make_client: Any, settings: Settings, db: Any
) -> None:
    due = datetime.now(UTC) - timedelta(seconds=1)
    bad = {
        # params of the wrong type where a guard reads them
        "bad-params": message_doc(
            "bad-params", "c1", "log", due, params=["not", "an", "object"], guard="price_still_lower"
        ),
        "bad-fallback": message_doc("bad-fallback", "c1", "log", due, fallback=7),
        "plugin-cancel": message_doc("plugin-cancel", "c2", "push", due, params={"code": "cancel"}),
        "plugin-none": message_doc("plugin-none", "c3", "push", due, params={"code": "none"}),
    }
    fine = {
        "fine-log": message_doc("fine-log", "c1", "log", due + timedelta(milliseconds=1)),
        "fine-push": message_doc("fine-push", "c2", "push", due + timedelta(milliseconds=1)),
        "unstorable": message_doc("unstorable", "c4", "push", due, params={"code": "unstorable"}),
    }
    messages = {**bad, **fine}
    # All due in one batch, written before the service starts, as a damaged database would hold them.
    await db.messages.insert_many(list(messages.values()))
    entries = [entry_doc(m) for m in messages.values()]
    no_contact = message_doc("no-contact", "c5", "log", due)
    await db.messages.insert_one(no_contact)
    entries.append({**entry_doc(no_contact), "contact_id": None})
    await db.schedule.insert_many(entries)
    await db.contacts.insert_many([{"_id": c, **PROFILE} for c in ("c1", "c2", "c3", "c4")])

    push = Fickle("push", needs="push_tokens")
    quick = msgspec.structs.replace(settings, lease_seconds=1)  # a stuck entry would come back every second
    client = await make_client(create_app(setup(quick, [send("push", transactional=True)]), registry(push)))

    async def settled() -> bool:
        docs = await db.messages.find({"_id": {"$in": [*messages, "no-contact"]}}).to_list()
        return all(d["status"] not in ("scheduled", "sending") for d in docs)

    await eventually(settled)
    await go(client, contact="c1")  # and the schedule still runs: a new message goes out

    async def new_one_sent() -> bool:
        return any(m["status"] == "sent" and m["message_id"] not in messages for m in await history(client))

    await eventually(new_one_sent)

    by_id = {m["message_id"]: m for c in ("c1", "c2", "c3", "c4") for m in await history(client, c)}
    assert {mid: by_id[mid]["status"] for mid in fine} == dict.fromkeys(fine, "sent")
    unstorable = await db.messages.find_one({"_id": "unstorable"})
    assert unstorable["status"] == "sent" and "when" not in unstorable  # the plugin's record left out
    assert by_id["bad-params"]["status"] == "failed"  # in the contact's history, with the error
    assert by_id["bad-params"]["reason"] == by_id["bad-fallback"]["reason"] == "processing_error"
    assert by_id["bad-params"]["detail"] == (
        "could not be processed: AttributeError: 'list' object has no attribute 'get'"
    )
    assert by_id["bad-fallback"]["status"] == "failed"
    assert by_id["bad-fallback"]["detail"].startswith("could not be processed: TypeError:")
    assert (by_id["plugin-cancel"]["status"], by_id["plugin-cancel"]["reason"]) == ("failed", "channel_error")
    assert by_id["plugin-cancel"]["detail"] == "channel error: CancelledError: "
    assert (by_id["plugin-none"]["status"], by_id["plugin-none"]["reason"]) == ("failed", "channel_error")
    assert by_id["plugin-none"]["detail"] == "channel error: send returned NoneType, not a Delivery"
    failed = await (await client.get("/v1/messages", params={"status": "failed"})).json()
    assert {"bad-params", "bad-fallback", "plugin-cancel", "plugin-none"} <= {
        m["message_id"] for m in failed["messages"]
    }
    # Set aside once, not claimed again and again: the entries are finished, with the error.
    entry = await db.schedule.find_one({"_id": "no-contact"})
    assert (entry["status"], entry["reason"]) == (
        "failed",
        "schedule entry field `contact_id` is NoneType, not str",
    )
    assert (await db.messages.find_one({"_id": "no-contact"}))["status"] == "failed"
    assert {e["_id"]: e["status"] for e in await db.schedule.find({"_id": {"$in": list(bad)}}).to_list()} == {
        "bad-params": "failed",
        "bad-fallback": "failed",
        "plugin-cancel": "done",
        "plugin-none": "done",
    }
    # The plugin was asked once per message, not once per lease.
    assert push.keys_seen.count("plugin-cancel") == 1 and push.keys_seen.count("plugin-none") == 1
