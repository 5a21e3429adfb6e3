"""Replay events against rulesets on a virtual clock: what would go out, and when. Nothing is stored.

The same engine decides as in the live service; only time and storage are simulated. Due entries fire
before any event that comes later than them; a wait's `else` runs as the same internal timer event the
live scheduler produces.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import msgspec

from rulesvc.catalog import catalog_change, guard_fails, interest_fields, interested
from rulesvc.contacts import ContactIn
from rulesvc.engine import ContactView, Engine, EngineEvent, ScheduleEntry, timer_event
from rulesvc.events import Event, event_time
from rulesvc.ids import fanout_copy_id

# Without `until`, pending entries run out at most this long after the last event.
DEFAULT_HORIZON = timedelta(days=90)


class SimContact(ContactIn, kw_only=True):
    contact_id: str


class SimulateRequest(msgspec.Struct, forbid_unknown_fields=True):
    events: list[Event]
    contacts: list[SimContact] = msgspec.field(default_factory=list)
    until: datetime | None = None


class SimAction(msgspec.Struct, omit_defaults=True):
    at: datetime
    contact_id: str
    ruleset: str
    rule: str
    channel: str | None
    template: str | None
    status: Literal["sent", "cancelled", "failed", "suppressed", "fired"]
    reason: str | None = None
    message_id: str | None = None
    params: dict[str, Any] | None = None


class SimulateResult(msgspec.Struct):
    actions: list[SimAction]


@dataclass(order=True)
class _Due:
    due_at: datetime
    seq: int
    entry: ScheduleEntry


class Simulation:
    def __init__(self, engine: Engine, contacts: list[SimContact]) -> None:
        self.engine = engine
        self.contacts: dict[str, ContactView] = {}
        for c in contacts:
            profile = msgspec.to_builtins(c)
            profile.pop("contact_id")
            profile["email_invalid"] = False
            self.contacts[c.contact_id] = ContactView(c.contact_id, profile, {})
        self.queue: list[_Due] = []
        self.entries: dict[str, ScheduleEntry] = {}
        self.actions: list[SimAction] = []
        self._seq = itertools.count()
        self.interests: dict[tuple[str, str], dict[str, Any]] = {}  # as the live interest index
        self.products: dict[str, dict[str, Any]] = {}  # as the live catalog

    def _contact(self, contact_id: str) -> ContactView:
        if contact_id not in self.contacts:
            self.contacts[contact_id] = ContactView(contact_id, {"email_invalid": False}, {})
        return self.contacts[contact_id]

    def run(self, events: list[Event], until: datetime | None) -> list[SimAction]:
        start = datetime.now(UTC)
        timed = sorted(
            ((event_time(e, start), i, e) for i, e in enumerate(events)), key=lambda t: (t[0], t[1])
        )
        for at, _, event in timed:
            self._fire_until(at, inclusive=False)
            if event.contact_id is None:
                self._fan_out(event, at)
                continue
            engine_event = EngineEvent(event.id, event.type, event.contact_id, at, event.attributes)
            fields = interest_fields({"type": event.type, "time": at, "attributes": event.attributes})
            if fields:
                key = (event.contact_id, str(event.attributes["product_id"]))
                self.interests.setdefault(key, {}).update(fields)
            self._evaluate(engine_event, at)
        end = until or ((timed[-1][0] if timed else start) + DEFAULT_HORIZON)
        self._fire_until(end, inclusive=True)
        return self.actions

    def _fan_out(self, event: Event, at: datetime) -> None:
        """A catalog event becomes each interested contact's own event, as the live fan-out does."""
        if event.attributes.get("product_id") is None:
            return
        product = str(event.attributes["product_id"])
        fields, change = catalog_change(event.type, event.attributes, self.products.get(product, {}))
        self.products.setdefault(product, {}).update(fields)
        for (contact_id, interest_product), interest in sorted(self.interests.items()):
            if interest_product == product and interested(event.type, interest, at):
                attributes = {**event.attributes, **change}
                attributes["interest"] = {k.removesuffix("_at"): v.isoformat() for k, v in interest.items()}
                copy = EngineEvent(
                    fanout_copy_id(event.id, contact_id), event.type, contact_id, at, attributes
                )
                self._evaluate(copy, at)

    def _evaluate(self, event: EngineEvent, now: datetime) -> None:
        assert event.contact_id is not None
        contact = self._contact(event.contact_id)
        decisions = self.engine.evaluate(event, contact, now)
        # As the live inbox commits: new entries first, then cancellations (which may hit them).
        for entry in decisions.schedule:
            self.entries[entry.entry_id] = entry
            heapq.heappush(self.queue, _Due(entry.due_at, next(self._seq), entry))
        for cancel in decisions.cancel:
            cancelled = self.entries.pop(cancel.entry_id, None)
            if cancelled is not None:
                self._record(cancelled, now, "cancelled", cancel.reason)

    def _fire_until(self, moment: datetime, inclusive: bool) -> None:
        while self.queue and (self.queue[0].due_at <= moment if inclusive else self.queue[0].due_at < moment):
            due = heapq.heappop(self.queue)
            entry = self.entries.pop(due.entry.entry_id, None)
            if entry is None:
                continue  # cancelled meanwhile
            contact = self._contact(entry.contact_id)
            contact.pending = [p for p in contact.pending if p.entry_id != entry.entry_id]
            if entry.message is not None:
                params = entry.message.get("params") or {}
                product = self.products.get(str(params.get("product_id")), {})
                stale = guard_fails(entry.message.get("guard"), params, product)
                self._record(entry, due.due_at, "suppressed" if stale else "sent", stale)
            else:
                self._record(entry, due.due_at, "fired", "waited in vain: running `else`")
                self._evaluate(timer_event(entry), due.due_at)

    def _record(self, entry: ScheduleEntry, at: datetime, status: Any, reason: str | None) -> None:
        message = entry.message or {}
        self.actions.append(
            SimAction(
                at=at,
                contact_id=entry.contact_id,
                ruleset=entry.ruleset,
                rule=entry.rule,
                channel=message.get("channel"),
                template=message.get("template"),
                status=status,
                reason=reason,
                message_id=entry.entry_id,
                params=message.get("params") or None,
            )
        )


def simulate(engine: Engine, request: SimulateRequest) -> SimulateResult:
    actions = Simulation(engine, request.contacts).run(request.events, request.until)
    actions.sort(key=lambda a: a.at)  # stable: same-moment actions keep their decision order
    return SimulateResult(actions)
