"""Events planted in the stored shape (rulesvc.store.event_queue), written past the API, and their state
read back the same way: the tests' own reading of the schema, not the store's code."""

from __future__ import annotations

from typing import Any

from rulesvc.store.migrations import SCHEMA_VERSION

Doc = dict[str, Any]

# What an undecided event's queue document holds besides its order (contact, time, arrival).
QUEUE_FIELDS = ("state", "attempts", "error", "stage", "quarantined_at", "retried_at", "fanout")


def split(doc: Doc) -> tuple[Doc, Doc | None]:
    """An event given with a `state` (`pending`, `quarantined`, `done`, `dropped`, as the API shows it)
    as its stored document and queue document (None once decided or dropped)."""
    state = doc.get("state", "pending")
    event = {k: v for k, v in doc.items() if k not in QUEUE_FIELDS or (state == "dropped" and k != "fanout")}
    if state in ("quarantined", "dropped"):
        event["state"] = state
    if state not in ("pending", "quarantined"):
        return event, None
    queued = {"_id": doc["_id"], "contact_id": doc.get("contact_id"), "time": doc["time"],
              "received_at": doc["received_at"], "state": state,
              **{k: doc[k] for k in QUEUE_FIELDS if k in doc and k != "state"}}  # fmt: skip
    return event, queued


async def plant(db: Any, docs: list[Doc]) -> None:
    """Stores these events as the service would have (an async database), in a database of this release's
    schema version (as one the service set up says)."""
    await db.meta.update_one({"_id": "schema"}, {"$max": {"version": SCHEMA_VERSION}}, upsert=True)
    pairs = [split(d) for d in docs]
    await db.events.insert_many([e for e, _ in pairs])
    queued = [q for _, q in pairs if q is not None]
    if queued:
        await db.inbox.insert_many(queued)


async def event_states(db: Any, ids: list[str]) -> dict[str, str]:
    """Each stored event's state: its queue document's, else `dropped` if it says so, else `done`."""
    queued = {d["_id"]: d["state"] async for d in db.inbox.find({"_id": {"$in": ids}})}
    return {
        d["_id"]: queued.get(d["_id"], "dropped" if d.get("state") == "dropped" else "done")
        async for d in db.events.find({"_id": {"$in": ids}})
    }


def plant_sync(db: Any, docs: list[Doc]) -> None:
    """`plant`, for a synchronous database."""
    pairs = [split(d) for d in docs]
    db.events.insert_many([e for e, _ in pairs])
    queued = [q for _, q in pairs if q is not None]
    if queued:
        db.inbox.insert_many(queued)
