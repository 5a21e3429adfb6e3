"""Sends that may have started and never finished, live against a real mongod: a call still in flight
is not repeated, an interrupted one is repeated at most once and only where the receiver de-duplicates,
and a call is cut off before the lease could run out. (Real killed workers: tests/test_slow_receivers.py.)"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from rulesvc.channels import Delivery, OutboundMessage
from rulesvc.config import Settings
from rulesvc.web.app import create_app
from tests.helpers import PROFILE, Provider, entry_doc, go, message_doc, registry, send, settled, setup


class Timed(Provider):
    """Remembers when each call came, and hangs while `hanging`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[datetime] = []

    async def send(self, message: OutboundMessage) -> Delivery:
        self.calls.append(datetime.now(UTC))
        return await super().send(message)


async def interrupted(db: Any, mid: str, contact: str, until: datetime, **fields: Any) -> None:
    """A message a process marked `sending` and then lost (killed, or stalled past its lease)."""
    started = until - timedelta(seconds=2)
    mark = {"status": "sending", "attempt": 1, "sent_channel": "push", "sending_at": started,
            "sending_until": until, "send_owner": "a-dead-process"}  # fmt: skip
    message = message_doc(mid, contact, "push", started, **mark, **fields)
    await db.messages.insert_one(message)
    await db.schedule.insert_one(entry_doc(message))  # its claim ran out: pending again, due
    await db.contacts.update_one({"_id": contact}, {"$set": PROFILE}, upsert=True)


async def test_an_interrupted_send_is_repeated_once_with_the_same_key_only_after_the_call_is_over(
    make_client: Any, settings: Settings, db: Any
) -> None:
    until = datetime.now(UTC) + timedelta(seconds=1.5)
    await interrupted(db, "in-flight", "c1", until)
    await interrupted(db, "repeated-before", "c2", datetime.now(UTC) - timedelta(seconds=1), resent=True)
    push = Timed("push", needs="push_tokens", deduplicates=True)
    client = await make_client(create_app(setup(settings, [send("push")]), registry(push)))
    [first] = await settled(client, "c1")
    [second] = await settled(client, "c2")
    # The first call may still be in flight until `sending_until`: the repeat comes only after it.
    assert push.keys_seen == ["in-flight"] and push.calls[0] >= until
    assert (first["status"], first["attempt"]) == ("sent", 1)  # the same attempt, completed
    assert (await db.messages.find_one({"_id": "in-flight"}))["resent"] is True
    # Repeated once already and interrupted again: not a third time.
    assert (second["status"], second["reason"]) == ("uncertain", "interrupted")
    assert second["detail"] == (
        "interrupted during the provider call, so it may have arrived; not sent again: "
        "it was sent once more with the same key already"
    )


async def test_a_call_is_cut_off_before_the_lease_runs_out(
    make_client: Any, settings: Settings, db: Any
) -> None:
    """Lease 1.5 s: a call gets 1 s. A de-duplicating channel retries with the same key; on any other a
    call cut off may have arrived, so the message is `uncertain` and not repeated."""
    quick = msgspec.structs.replace(settings, lease_seconds=1.5, max_attempts=2, retry_base_seconds=0.05)
    dedup, plain = Timed("push", needs="push_tokens", deduplicates=True), Timed("sms", needs="phone")
    dedup.hanging = plain.hanging = True  # they never answer
    app = create_app(setup(quick, [send("push", transactional=True), send("sms", transactional=True)]),
                     registry(dedup, plain))  # fmt: skip
    client = await make_client(app)
    await client.put("/v1/contacts/c1", json={**PROFILE, "phone": "+4915112345678"})
    await go(client)
    by_channel = {m["channel"]: m for m in await settled(client, count=2)}
    pushed, texted = by_channel["push"], by_channel["sms"]
    assert (pushed["status"], pushed["reason"], pushed["detail"]) == (
        "dead",
        "timeout",
        "gave up after 2 attempts: no answer within 1s (the send timeout)",
    )
    assert dedup.keys_seen == [pushed["message_id"]] * 2
    assert texted["status"] == "uncertain" and plain.keys_seen == [texted["message_id"]]
    assert texted["reason"] == "timeout"
    assert texted["detail"].startswith("cut off after 1s without an answer, so it may have arrived")
    assert dedup.calls[1] - dedup.calls[0] >= timedelta(seconds=1)  # the first call had its second
    channels = (await (await client.get("/v1/channels")).json())["channels"]
    limits = {c["name"]: (c["deduplicates"], c["send_timeout_seconds"]) for c in channels}
    assert limits["push"] == (True, 1.0) and limits["sms"] == (False, 1.0)
    dedup.hang.set()
    plain.hang.set()


async def test_a_send_in_flight_keeps_its_claim_and_is_made_once(
    make_client: Any, settings: Settings
) -> None:
    """Lease 4.5 s, a provider that answers after 1.8 s, three messages of one contact sent one after
    another (5.4 s): the claim is renewed while the calls run, so no pass takes a message over. (Each
    call is cut off after two thirds of the lease, 3 s: room for a slow machine's lag, which 0.9 s of a
    1 s cut-off did not leave.)"""
    quick = msgspec.structs.replace(settings, lease_seconds=4.5)
    push = Timed("push", needs="push_tokens")
    client = await make_client(create_app(setup(quick, [send("push", transactional=True)]), registry(push)))

    async def slow_send(message: OutboundMessage) -> Delivery:
        push.keys_seen.append(message.message_id)
        await asyncio.sleep(1.8)
        return Delivery("sent")

    push.send = slow_send  # type: ignore[method-assign]
    await client.put("/v1/contacts/c1", json=PROFILE)
    await go(client, n=3)
    msgs = await settled(client, count=3)
    assert [m["status"] for m in msgs] == ["sent"] * 3
    assert sorted(push.keys_seen) == sorted(m["message_id"] for m in msgs)  # each once


async def test_a_send_whose_mark_took_the_whole_send_timeout_is_made_later_not_taken_for_uncertain(
    settings: Settings, db: Any, mongod: Any
) -> None:
    """During a failover the `sending` mark can come back after the call's deadline (seen in
    tests/test_scale_out.py): the provider was never called, so the message is no doubt but a send
    still to make. The database's slowness is the clock's step here: each reading 2 s after the last."""
    from pymongo import AsyncMongoClient

    from rulesvc.runtime.dispatcher import Dispatcher
    from rulesvc.store.db import Store
    from rulesvc.web.lifecycle import send_policy, templates_of

    quick = setup(msgspec.structs.replace(settings, lease_seconds=1.5), [send("sms", transactional=True)])
    readings = iter(datetime.now(UTC) + timedelta(seconds=2 * n) for n in range(100))
    plain = Timed("sms", needs="phone")  # no de-duplication: a doubt would never be cleared
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongod.uri, tz_aware=True)
    try:
        store = Store(client, settings.database, timedelta(days=1))
        dispatcher = Dispatcher(store, registry(plain), templates_of(quick), send_policy(quick),
                                clock=lambda: next(readings))  # fmt: skip
        message = message_doc("slow-mark", "c1", "sms", datetime.now(UTC))
        await db.messages.insert_one(message)
        contact = {"_id": "c1", **PROFILE, "phone": "+4915112345678"}
        result = await dispatcher.dispatch(message, contact, datetime.now(UTC), owner="me")
    finally:
        await client.close()
    assert plain.keys_seen == []  # never handed to the provider
    assert (result.kind, result.reason, result.attempt) == ("retry", "timeout", 0)  # the same attempt again
    assert result.detail == "not sent: marking it took the whole send timeout (1s); tried again"
    # The mark is taken back at once (the message as it was), and the retry is written under that guard.
    assert result.guard == {"status": "scheduled"}
    stored = await db.messages.find_one({"_id": "slow-mark"})
    assert (stored["status"], stored.get("attempt"), stored.get("send_owner")) == ("scheduled", None, None)


async def test_a_sending_mark_whose_answer_was_lost_is_taken_back_only_while_it_is_still_ours(
    settings: Settings, db: Any, mongod: Any
) -> None:
    """A failover can lose the answer to the `sending` mark although the mark was written: the provider
    was not called, so the dispatcher undoes the mark (rulesvc.runtime.dispatcher `_take_back_mark`) and
    the message is sent later instead of being taken for interrupted mid-call. Never someone else's."""
    from pymongo import AsyncMongoClient

    from rulesvc.store.db import Store
    from rulesvc.store.messages import Messages

    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongod.uri, tz_aware=True)
    try:
        messages = Messages(Store(client, settings.database, timedelta(days=1)))
        now = datetime.now(UTC).replace(microsecond=0)
        before = message_doc("m1", "c1", "sms", now, attempt=1, sent_channel="sms")  # a retry's second try
        await db.messages.insert_one(before)
        stored = await db.messages.find_one({"_id": "m1"})
        until = now + timedelta(seconds=5)
        mark = {"status": "sending", "attempt": 2, "sending_at": now, "sending_until": until,
                "sent_channel": "sms", "send_owner": "me"}  # fmt: skip
        assert await messages.mark_sending("m1", {"status": "scheduled"}, mark)
        assert await messages.take_back_mark("m1", mark, stored)
        assert await db.messages.find_one({"_id": "m1"}) == stored  # exactly as before the mark
        # Another process's mark (or a later one of ours) is left alone.
        theirs = {**mark, "send_owner": "them"}
        assert await messages.mark_sending("m1", {"status": "scheduled"}, theirs)
        assert not await messages.take_back_mark("m1", mark, stored)
        assert (await db.messages.find_one({"_id": "m1"}))["send_owner"] == "them"
    finally:
        await client.close()
