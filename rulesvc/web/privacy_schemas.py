"""Bodies of the privacy routes (erase, export, the request log)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

import msgspec


class Erased(msgspec.Struct):
    """`deleted`: documents deleted (or, for `backtests` and `privacy_requests`, cleaned) per collection;
    all zeros for an id nothing was stored of (an erasure may be repeated)."""

    erased: bool
    contact_id_sha256: str
    deleted: dict[str, int]
    audience_removals: int  # removals queued for the ad platforms, by hashed email and phone
    linked_ids: int  # anonymous ids linked to the contact, erased with it
    request_id: str


class PrivacyRequest(msgspec.Struct):
    """One erasure or export. `contact_id` only on an export of a contact not erased since."""

    id: str
    kind: Literal["erase", "export"]
    source: str  # `api:<key id>`, `cli`, `shopify:<shop domain>`
    contact_sha256: str
    requested_at: datetime
    done_at: datetime | None = None
    contact_id: str | None = None
    counts: dict[str, Any] = msgspec.field(default_factory=dict)


class PrivacyRequestList(msgspec.Struct):
    requests: list[PrivacyRequest]
    next_before: datetime | None = None
