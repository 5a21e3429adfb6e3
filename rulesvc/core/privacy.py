"""Privacy requests, the pure part: how an erased contact is named afterwards (a SHA-256 of its id, never
the id), which posted events a tombstone drops, and how a stored report loses an erased contact's rows."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any, Literal

TombstoneMode = Literal["old-events", "all", "off"]
TOMBSTONE_MODES: tuple[TombstoneMode, ...] = ("old-events", "all", "off")
ERASED_PREFIX = "erased/"  # an audience removal's contact: `erased/<hash>`, in the service's own id space


def contact_hash(contact_id: str) -> str:
    """What is kept of an erased contact's id (tombstone, request log): its SHA-256, hex."""
    return hashlib.sha256(contact_id.encode()).hexdigest()


def event_hash(event_id: str) -> str:
    """What is kept of an erased contact's event id (`erased_events`): its SHA-256, hex. An event posted
    without `time` gets the time it arrives, so only its id tells a late retry from a new event."""
    return hashlib.sha256(event_id.encode()).hexdigest()


def dropped_events(
    events: Iterable[tuple[str | None, datetime]],
    tombstones: Mapping[str, Mapping[str, Any]],
    mode: TombstoneMode,
) -> list[int]:
    """The positions of the events (contact id, time) a tombstone drops: `old-events`, an event from
    before its contact's erasure (a late retry); `all`, every event of an erased contact until a profile
    `PUT` re-creates it (then as `old-events`); `off`, none. `tombstones` by contact hash."""
    if mode == "off" or not tombstones:
        return []
    out = []
    for i, (contact_id, time) in enumerate(events):
        if contact_id is None:
            continue
        stone = tombstones.get(contact_hash(contact_id))
        if stone is None:
            continue
        erased_at = stone.get("erased_at")
        if (mode == "all" and stone.get("recreated_at") is None) or (
            isinstance(erased_at, datetime) and time < erased_at
        ):
            out.append(i)
    return out


def scrub(value: Any, ids: frozenset[str]) -> Any:
    """`value` without what names one of `ids`: a list item that is such an id or a row (a dict) whose
    `contact_id` is one, a dict entry keyed by one. A backtest report keeps its totals, loses the rows."""
    if isinstance(value, dict):
        return {k: scrub(v, ids) for k, v in value.items() if k not in ids}
    if isinstance(value, list):
        return [
            scrub(v, ids)
            for v in value
            if not (isinstance(v, str) and v in ids)
            and not (isinstance(v, dict) and _names(v.get("contact_id"), ids))
        ]
    return value


def _names(value: Any, ids: frozenset[str]) -> bool:
    return isinstance(value, str) and value in ids
