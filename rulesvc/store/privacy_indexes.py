"""The indexes of the privacy requests' collections (rulesvc.store.privacy), apart from its queries so
that `Store.ensure_schema` can create them without importing the module that imports the store."""

from __future__ import annotations

from typing import Any

from pymongo import ASCENDING, DESCENDING, IndexModel
from pymongo.asynchronous.database import AsyncDatabase


async def ensure_privacy_indexes(db: AsyncDatabase[dict[str, Any]]) -> None:
    """The request log newest first (`GET /v1/privacy/requests`), the identity links by contact (an
    erasure takes the anonymous ids linked to its contact); tombstones are found by `_id`."""
    await db["privacy_requests"].create_indexes(
        [IndexModel([("requested_at", DESCENDING), ("_id", DESCENDING)], name="privacy_requests_by_time")]
    )
    await db["identities"].create_indexes(
        [IndexModel([("contact_id", ASCENDING)], name="privacy_identities_by_contact")]
    )
