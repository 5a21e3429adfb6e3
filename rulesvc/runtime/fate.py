"""Every message's fate, told: one `message.outcome` log line per outcome (and the metrics, through a
callback the app gives), and an operator's retry or cancel of one message, shared by the HTTP API and
the CLI so both act the same way."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog
from pymongo.asynchronous.client_session import AsyncClientSession

from rulesvc.core import reasons
from rulesvc.core.funnel import Increment, message_increment
from rulesvc.core.messages import Fate, fate_of
from rulesvc.store.db import PROCESS_SHARD, Doc, OnCounts, Store
from rulesvc.store.messages import CANCELLABLE, DISMISSED, RETRYABLE, Messages
from rulesvc.store.schedule import Schedule
from rulesvc.store.transactions import in_transaction

log = structlog.get_logger("rulesvc.messages")

OnFate = Callable[[Fate], None]


def tell(fates: Iterable[Fate], on_fate: OnFate | None = None) -> None:
    """One info line per outcome (ids, channel, status, reason code, attempt, provider latency), and
    the callback (the app's metrics) once per outcome."""
    for fate in fates:
        fields: dict[str, Any] = {
            "message_id": fate.message_id,
            "contact_id": fate.contact_id,
            "ruleset": fate.ruleset,
            "rule": fate.rule,
            "channel": fate.channel,
            "status": fate.status,
            "reason": fate.reason,
            "attempt": fate.attempt,
        }
        if fate.latency is not None:
            fields["latency_ms"] = round(fate.latency * 1000, 1)
        log.info("message.outcome", **fields)
        if on_fate is not None:
            on_fate(fate)


@dataclass(frozen=True)
class Refusal:
    """Why an operator's action does not apply: the message's status now, and the statuses it needs."""

    status: str
    allowed: tuple[str, ...]


async def retry_message(store: Store, message_id: str, now: datetime) -> Doc | Refusal | None:
    """A dead, failed or uncertain message back to `scheduled`, due now, with a schedule entry: the
    message (after), a Refusal (its status does not allow it), or None (no such message)."""
    messages, schedule = Messages(store), Schedule(store)

    async def write(session: AsyncClientSession) -> Doc | None:
        doc = await messages.retry(message_id, now, session)
        if doc is not None:
            await schedule.send_again(doc, now, session)
        return doc

    doc = await in_transaction(store.client, write)
    if doc is None:
        return await _refusal(messages, message_id, RETRYABLE)
    # Not an outcome (its next send is one): its own line, and no count.
    log.info("message.retried", message_id=message_id, contact_id=doc.get("contact_id"),
             retries=doc.get("retries"))  # fmt: skip
    return doc


async def cancel_message(
    store: Store,
    message_id: str,
    now: datetime,
    on_fate: OnFate | None = None,
    on_counts: OnCounts | None = None,
) -> Doc | Refusal | None:
    """A scheduled message `cancelled` (reason `cancelled_by_operator`), or a dead or uncertain one
    dismissed (never retried), its schedule entry with it, and counted (rulesvc.store.stats) in the same
    transaction."""
    messages, schedule = Messages(store), Schedule(store)
    counted: list[Increment] = []

    async def write(session: AsyncClientSession) -> Doc | None:
        counted.clear()  # a transaction that is retried runs this again from the start
        doc = await messages.cancel_one(message_id, reasons.CANCELLED_BY_OPERATOR, now, session)
        if doc is not None:
            detail = str(doc.get("detail") or "")
            await schedule.cancel_entries([message_id], reasons.CANCELLED_BY_OPERATOR, detail, now, session)
            status = "dismissed" if detail.startswith(DISMISSED) else "cancelled"
            counted.append(message_increment(doc, status, now, reasons.CANCELLED_BY_OPERATOR))
            await store.add_counts(counted, PROCESS_SHARD, session)
        return doc

    doc = await in_transaction(store.client, write)
    if doc is None:
        return await _refusal(messages, message_id, CANCELLABLE)
    tell([fate_of(doc, "cancelled", reasons.CANCELLED_BY_OPERATOR)], on_fate)
    if on_counts is not None:
        on_counts(counted)
    return doc


async def _refusal(messages: Messages, message_id: str, allowed: tuple[str, ...]) -> Refusal | None:
    doc = await messages.get(message_id)
    return None if doc is None else Refusal(str(doc.get("status")), allowed)
