"""Carries out the privacy requests Shopify sends (customers/data_request, customers/redact, shop/redact).

The webhook only records the request and answers at once (Shopify wants an answer within 5 seconds, and a
shop's redact may erase thousands of contacts); this loop, in every service process, erases or logs the
export of what each open request names and then marks it done. A request a crash interrupted stays open
and is carried out again (erasure is idempotent); one that fails waits a growing pause while the others
go first."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

from rulesvc.runtime.privacy import erase_contact, record_request
from rulesvc.store.db import Store, failure_text
from rulesvc.store.privacy import Privacy
from rulesvc.store.shopify import ShopifyPrivacy

log = structlog.get_logger(__name__)

POLL = 2.0  # seconds between looks for open requests
MAX_PAUSE = 300.0  # seconds at most before a failed request is tried again


async def carry_out(store: Store, limit: int = 10) -> int:
    """The open requests, oldest first; how many were done. An export is logged for the shop owner to fetch
    (`GET /v1/contacts/{id}/export`, `rulesvc contacts export`): Shopify expects the data from the shop, not
    through the webhook. An erasure erases every contact the request names, or for `shop/redact` every
    contact of the shop."""
    requests = ShopifyPrivacy(store)
    done = 0
    for doc in await requests.open_requests(datetime.now(UTC), limit):
        try:
            counts = await _carry_out_one(store, requests, doc)
        except Exception as exc:
            pause = min(MAX_PAUSE, 2.0 ** int(doc.get("attempts") or 0))
            await requests.failed(doc["_id"], failure_text(exc), datetime.now(UTC) + timedelta(seconds=pause))
            log.warning("shopify.privacy_retry", request=doc["_id"], error=type(exc).__name__, pause=pause)
            continue
        await requests.done(doc["_id"], datetime.now(UTC), counts)
        log.info("shopify.privacy_done", request=doc["_id"], kind=doc.get("kind"), **counts)
        done += 1
    return done


async def _carry_out_one(store: Store, requests: ShopifyPrivacy, doc: dict[str, Any]) -> dict[str, Any]:
    source = f"shopify:{doc.get('shop', '')}"
    contact_ids = [c for c in doc.get("contact_ids") or [] if isinstance(c, str)]
    if doc.get("kind") == "export":
        details = {"shopify_request_id": doc.get("request_id"), "orders": doc.get("orders") or []}
        stored = [c for c in contact_ids if await Privacy(store).known(c)]  # not ids nothing is kept of
        for contact_id in stored:
            await record_request(store, "export", contact_id, source, details, doc.get("received_at"))
        return {"exports_logged": len(stored)}
    if doc.get("scope") == "shop":  # no pause per contact: the shop sends nothing any more
        erased = 0
        async for contact_id in requests.shop_contacts(str(doc.get("shop", ""))):
            await erase_contact(store, contact_id, datetime.now(UTC), source, settle=0.0)
            erased += 1
        return {"contacts_erased": erased}
    for contact_id in contact_ids:
        await erase_contact(store, contact_id, datetime.now(UTC), source)
    return {"contacts_erased": len(contact_ids)}


async def run(store: Store, stop: asyncio.Event, wake: asyncio.Event) -> None:
    """Until `stop`: carry out open requests, then wait for the webhook's `wake` or the next poll."""
    while not stop.is_set():
        try:
            await carry_out(store)
        except Exception as exc:
            log.warning("shopify.privacy_unavailable", error=type(exc).__name__)
        wake.clear()
        try:
            await asyncio.wait_for(wake.wait(), POLL)
        except TimeoutError:
            pass
