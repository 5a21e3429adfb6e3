"""The live service and `POST /v1/simulate` decide the same, at scale, in a real `rulesvc serve`.

A seeded corpus (200 contacts with varied consent, zones, addresses and bad news; over 2,000 events of
every type the shipped rulesets use, catalog events included) goes to a running service with the
shipped rulesets' delays cut to seconds, quiet hours around now in some zones, caps that bite, email
to a real SMTP server and push / web push rewritten to the `log` channel. Once every message due in the
test's window is decided, the same corpus goes to `POST /v1/simulate` of that service: every message
(contact, ruleset, rule, channel, status, reason, detail, due time) must be the same on both sides.

Lag is the one thing a simulation cannot know: live, an immediate send is due when the inbox took its
event, simulated when the event happened. The corpus keeps per-contact events and per-product catalog
changes seconds apart, and starts the catalog's phase once the contacts' is decided, so that lag never
reorders two decisions; an immediate send's due time (and a cancellation's) may be late by the lag, any
other due time (a delay, a postponement) must match within a second.
"""

from __future__ import annotations

import json
import random
import shutil
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any, cast
from zoneinfo import ZoneInfo

import msgspec
from aiosmtpd.controller import Controller

from rulesvc.channels import Delivery
from rulesvc.config import Settings
from rulesvc.core.engine import ContactView, Decisions, Engine, EngineEvent
from rulesvc.core.sendpolicy import QUIET_REASON
from rulesvc.replay.simulate import SimulateRequest, simulate
from rulesvc.store.mongod import free_port
from rulesvc.web.app import create_app
from tests.helpers import Provider, eventually, go, load, registry, send, settled, setup, wait_for
from tests.service import ServiceProcess
from tests.smtp_server import Mailbox

SHIPPED = Path(__file__).resolve().parent.parent / "rulesets"
# The shipped delays, cut to seconds; the logic (what waits for what, what cancels what) is kept.
DELAYS = {"5m": "3s", "20m": "4s", "30m": "5s", "2h": "6s", "12h": "8s", "24h": "7s", "48h": "9s",
          "90d": "10s", "3d": "60s", "5d": "60s", "7d": "60s"}  # fmt: skip
TO_LOG = {"push", "webpush"}  # channels rewritten to `log`; email goes to SMTP, sms stays not configured
CAPS = "email=2,log=2"
LAG = 15.0  # seconds an immediate send may come due late live (the inbox's lag on a loaded machine)
# Several offsets, half and three-quarter hours among them; quiet hours are around now in the first one
# whose day does not end during the test (and in its neighbour, 15 minutes on).
ZONES = ["Asia/Kolkata", "Asia/Kathmandu", "Australia/Adelaide", "America/St_Johns", "Europe/Berlin",
         "America/New_York", "UTC", "Asia/Tokyo", "Pacific/Chatham"]  # fmt: skip


def shortened(folder: Path) -> Path:
    """The shipped rulesets in `folder`, with short delays, push and web push on `log`, and templates
    that always render (the simulator does not render: a template error is a difference it cannot see)."""
    rulesets = folder / "rulesets"
    shutil.copytree(SHIPPED, rulesets)

    def rewrite(node: Any) -> Any:
        if isinstance(node, list):
            return [rewrite(n) for n in node]
        if not isinstance(node, dict):
            return node
        out = {k: rewrite(v) for k, v in node.items()}
        for key in ("after", "within"):
            if isinstance(out.get(key), str):
                out[key] = DELAYS[out[key]]
        if isinstance(out.get("channel"), str) and "template" in out:
            out["channel"] = "log" if out["channel"] in TO_LOG else out["channel"]
            fallback = ["log" if c in TO_LOG else c for c in out.get("fallback", [])]
            out["fallback"] = [c for c in dict.fromkeys(fallback) if c != out["channel"]]
        return out

    names: set[str] = set()
    for path in rulesets.glob("*.json"):
        if path.name == "schema.json":
            continue
        doc = rewrite(json.loads(path.read_text()))
        path.write_text(json.dumps(doc, indent=1))
        names.update(_templates(doc))
    shutil.rmtree(rulesets / "templates")
    for name in names:
        (rulesets / "templates" / name).parent.mkdir(parents=True, exist_ok=True)
        for part, text in (("subject", "Hi"), ("text", "Hello"), ("title", "Hi"), ("body", "Hello")):
            (rulesets / "templates" / f"{name}.{part}").write_text(text)
    return rulesets


def _templates(node: Any) -> Iterator[str]:
    if isinstance(node, list):
        for n in node:
            yield from _templates(n)
    elif isinstance(node, dict):
        if isinstance(node.get("template"), str):
            yield node["template"]
        for v in node.values():
            yield from _templates(v)


def quiet_window(now: datetime) -> str:
    """Quiet from an hour before to an hour after now in the first zone used (and in any zone within an
    hour of it); the window ends at least 15 minutes after the test in every zone, so no postponement
    ends while lag could reorder it."""
    local = now.astimezone(ZoneInfo(zones_without_midnight(now)[0]))
    return f"{local - timedelta(hours=1):%H:%M}-{local + timedelta(hours=1):%H:%M}"


def zones_without_midnight(now: datetime) -> list[str]:
    """A cap counts per local day: no zone whose day ends while the test runs."""
    kept = []
    for zone in ZONES:
        local = now.astimezone(ZoneInfo(zone))
        if timedelta(minutes=5) < timedelta(hours=local.hour, minutes=local.minute) < timedelta(hours=23):
            kept.append(zone)
    return kept


@dataclass
class Corpus:
    contacts: list[dict[str, Any]]
    events: list[tuple[float, dict[str, Any]]]  # (seconds after the start, event without its time)
    catalog: list[tuple[float, dict[str, Any]]] = field(default_factory=list)  # after the contacts' phase


POSTED_LATE = 0.6  # how late an event may reach the service after its time (a loaded machine)
AFTER_END = 1.0  # how late the service may act on a due send or a wait's end


def corpus(seed: int, count: int, zones: list[str], span: float) -> Corpus:
    """`count` contacts, each with a handful of scripted visits within `span` seconds, then the catalog
    changes of the products they looked at."""
    rng = random.Random(seed)
    contacts: list[dict[str, Any]] = []
    events: list[tuple[float, dict[str, Any]]] = []
    products = [f"p{i}" for i in range(12)]
    for i in range(count):
        cid = f"c{i:03d}"
        profile: dict[str, Any] = {
            "contact_id": cid,
            "timezone": zones[i % len(zones)],
            "consent": {c: rng.random() < 0.7 for c in ("email", "sms", "push")},
        }
        if rng.random() < 0.8:
            profile["email"] = f"{cid}@example.com"
        if rng.random() < 0.4:
            profile["phone"] = f"+49151{i:08d}"
        if rng.random() < 0.5:
            profile["push_tokens"] = [f"tok-{cid}"]
        contacts.append(profile)
        mine: list[tuple[str, dict[str, Any]]] = []
        n = 0

        def add(kind: str, contact_id: str = cid, into: list[Any] = mine, **attributes: Any) -> str:
            nonlocal n
            eid = f"{contact_id}-{n}"
            n += 1
            into.append((eid, {"id": eid, "type": kind, "contact_id": contact_id, "attributes": attributes}))
            return eid

        for _ in range(rng.randint(3, 5)):
            scene = rng.choice(["browse", "binge", "cart", "checkout", "buy", "delivery", "voucher",
                                "social", "paywall", "news", "wish"])  # fmt: skip
            if scene == "browse":
                for _ in range(rng.randint(1, 3)):
                    add("product_viewed", product_id=rng.choice(products), in_stock=rng.random() < 0.7)
            elif scene == "binge":  # ten products and no cart: browse abandonment
                for p in rng.sample(products, 10):
                    add("product_viewed", product_id=p, in_stock=True)
                if rng.random() < 0.5:
                    add("session_ended")
            elif scene == "cart":
                eid = add("cart_updated", value=rng.choice([0, 35.5, 120, 250]), currency="EUR",
                          items=[{"product_id": rng.choice(products), "qty": 1}])  # fmt: skip
                if rng.random() < 0.3:  # a report naming a reminder not sent yet: it changes nothing
                    add("message_opened", message_id=f"{eid}/cart_abandon/remind/2")
                if rng.random() < 0.3:
                    add("purchased", order_id=f"o-{cid}-{n}", value=50)
            elif scene == "checkout":
                add("checkout_started", value=80, currency="EUR")
            elif scene == "buy":
                extra: dict[str, Any] = {}
                if rng.random() < 0.3:
                    extra["promo_code"] = "SAVE5"
                if rng.random() < 0.3:
                    extra["points_used"] = 100
                order = f"o-{cid}-{n}"
                eid = add("purchased", order_id=order, value=60, **extra)
                confirmation = f"{eid}/confirmations/order/0"
                news = rng.choice(["delivered", "opened", "clicked", "bounced", "blocked", None])
                if news is not None:
                    add(f"message_{news}", message_id=confirmation)
            elif scene == "delivery":
                order = f"o-{cid}-{n}"
                for status in rng.sample(["shipped", "delayed", "out_for_delivery", "delivered"], 2):
                    add("delivery_status_changed", order_id=order, status=status)
            elif scene == "voucher":
                code = f"V{cid}{n}"
                add("voucher_issued", voucher_code=code, expires_at="EXPIRES")
                if rng.random() < 0.4:
                    add("voucher_redeemed", voucher_code=code)
            elif scene == "social":
                for _ in range(rng.randint(1, 3)):
                    add("social_shared", network="x")
                if rng.random() < 0.5:
                    add("address_changed", city="Berlin")
            elif scene == "paywall":
                for _ in range(rng.randint(3, 5)):
                    add("page_viewed", page="paywall")
                if rng.random() < 0.3:
                    add("subscribed", product_id=rng.choice(products))
            elif scene == "news":
                kind = rng.choice(["bounced", "blocked", "delivered", "clicked", "replied"])
                add(f"message_{kind}", channel=rng.choice(["email", "log", "sms"]))
            else:
                add("wishlist_added", product_id=rng.choice(products))
        # Seconds apart: the inbox's lag never reorders one contact's decisions.
        at = rng.uniform(0, 2)
        step = max(0.5, (span - at) / max(len(mine), 1))
        for _, event in mine:
            events.append((at, event))
            at += rng.uniform(step * 0.8, step) if step > 0.5 else step
    catalog: list[tuple[float, dict[str, Any]]] = []
    for j, p in enumerate(products):
        base = rng.uniform(0, 2)  # sends at once within 4-6 s, the drops' messages due within 7-9 s
        price = rng.choice([40.0, 80.0, 120.0])
        steps = [
            ("stock_changed", {"in_stock": False, "quantity": 0}),
            ("price_changed", {"price": price * 0.8, "previous_price": price, "currency": "EUR"}),
            ("stock_changed", {"in_stock": True, "quantity": rng.choice([2, 3, 20])}),
        ]
        if j % 3 == 0:  # the price goes up again before the drop's message is due: its guard fails
            steps.append(("price_changed", {"price": price * 1.1, "currency": "EUR"}))
        if j % 4 == 1:  # out of stock again before ... nothing: back in stock is sent at once
            steps.append(("stock_changed", {"in_stock": False, "quantity": 0}))
        for k, (kind, attributes) in enumerate(steps):
            eid = f"cat-{p}-{k}"
            catalog.append((base + 2.0 * k, {"id": eid, "type": kind, "attributes": {"product_id": p,
                            "name": f"Product {p}", **attributes}}))  # fmt: skip
        for cid in rng.sample([c["contact_id"] for c in contacts], 8):  # reports on the drop's messages
            mid = f"cat-{p}-1/{cid}/price_drop/notify/0"  # a fan-out copy's message (if it was interested)
            report = {"id": f"rep-{p}-{cid}", "type": rng.choice(["message_opened", "message_blocked"]),
                      "contact_id": cid, "attributes": {"message_id": mid}}  # fmt: skip
            catalog.append((12.5, report))  # after every drop's message came due: lag reorders nothing
    events.sort(key=lambda t: t[0])
    catalog.sort(key=lambda t: t[0])
    return Corpus(contacts, events, catalog)


def timed(offset: float, event: dict[str, Any], start: datetime) -> dict[str, Any]:
    at = start + timedelta(seconds=offset)
    attributes = dict(event["attributes"])
    if attributes.get("expires_at") == "EXPIRES":  # reminded 3 days before: due 5 s after the event
        attributes["expires_at"] = (at + timedelta(days=3, seconds=5)).isoformat()
    return {**event, "time": at.isoformat(), "attributes": attributes}


class DuesOf:
    """The engine, noting the due time of every delayed send and wait it arms, per contact, and the event
    that armed it, unless an event cancelled it well before (one cancelled near its due time is a race
    too; a simulation reports it at its cancellation)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.armed: dict[str, tuple[str, datetime, str]] = {}  # entry id -> contact, due, event id
        self.cancelled: dict[str, datetime] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def evaluate(self, event: EngineEvent, contact: ContactView, now: datetime) -> Decisions:
        decisions = self.engine.evaluate(event, contact, now)
        for entry in decisions.schedule:
            if entry.due_at > entry.created_at:
                self.armed[entry.entry_id] = (entry.contact_id, entry.due_at, event.id)
        for cancel in decisions.cancel:
            self.cancelled.setdefault(cancel.entry_id, now)
        return decisions

    def dues(self, start: datetime) -> dict[str, list[tuple[float, str]]]:
        """Per contact, in seconds after `start`, in order, each with the event that armed it."""
        found: dict[str, list[tuple[float, str]]] = {}
        for entry_id, (contact, due, armed_by) in self.armed.items():
            cancelled = self.cancelled.get(entry_id)
            if cancelled is None or cancelled >= due - timedelta(seconds=POSTED_LATE):
                found.setdefault(contact, []).append(((due - start).total_seconds(), armed_by))
        return {contact: sorted(dues) for contact, dues in found.items()}


def apart(dues: list[tuple[float, str]], order: dict[str, int]) -> dict[str, float]:
    """How much later each event must come so that no two of a contact's dues armed by different events
    are within AFTER_END of each other. Live, a wait's `else` sends when the service acts on the wait's
    end, late by the lag, so a send due just after it goes first there; the simulation sends the `else`
    at the wait's end. Of two such dues, the event posted later moves: moving the other would move both."""
    moves: dict[str, float] = {}
    for (first, by_first), (second, by_second) in pairwise(dues):
        if by_first == by_second or second - first >= AFTER_END:
            continue
        if order[by_second] > order[by_first]:
            moves[by_second] = max(moves.get(by_second, 0.0), first + AFTER_END - second)
        else:
            moves[by_first] = max(moves.get(by_first, 0.0), second + AFTER_END - first)
    return moves


def clear_of_dues(data: Corpus, start: datetime, rulesets: Path) -> Corpus:
    """The corpus with each contact's events moved clear of the moments its sends and waits come due (from
    POSTED_LATE before one to AFTER_END after it), and its later events with them, and its dues apart
    (`apart`). Live, an event reaches the service a little after its time and a due send or a wait's end
    is acted on a little after its time: which comes first there is a race, which a simulation, knowing
    neither lag, always decides one way. An event moved moves what it arms, so this simulates again until
    nothing moves."""
    engine = load(rulesets).engine()
    events = data.events
    for _ in range(20):
        timed_events = [timed(offset, event, start) for offset, event in events]
        request = msgspec.convert({"events": timed_events, "contacts": data.contacts}, SimulateRequest)
        noted = DuesOf(engine)
        simulate(cast(Engine, noted), request)
        dues = noted.dues(start)
        order = {event["id"]: i for i, (_, event) in enumerate(events)}
        moves = {eid: by for contact_dues in dues.values() for eid, by in apart(contact_dues, order).items()}
        shifts: dict[str, float] = {}
        moved: list[tuple[float, dict[str, Any]]] = []
        for offset, event in events:  # in time order
            contact = event["contact_id"]
            at = offset + shifts.get(contact, 0.0) + moves.get(event["id"], 0.0)
            for due, _ in dues.get(contact, []):
                if due - POSTED_LATE <= at <= due + AFTER_END:
                    at = due + AFTER_END
            shifts[contact] = at - offset
            moved.append((at, event))
        moved.sort(key=lambda t: t[0])
        if moved == events:
            return Corpus(data.contacts, events, data.catalog)
        events = moved
    raise AssertionError("the corpus's events never came clear of their contacts' due times")


def post_paced(
    service: ServiceProcess, batch: list[tuple[float, dict[str, Any]]], start: datetime
) -> list[dict[str, Any]]:
    """Each event posted once its time has come (never ahead of the service's clock), in time order."""
    posted: list[dict[str, Any]] = []
    i = 0
    while i < len(batch):
        now = (datetime.now(UTC) - start).total_seconds()
        ready = []
        while i < len(batch) and batch[i][0] <= now:
            ready.append(timed(*batch[i], start))
            i += 1
        for chunk in range(0, len(ready), 200):
            status, body = service.request("POST", "/v1/events", ready[chunk : chunk + 200])
            assert status == 202, body
        posted.extend(ready)
        if i < len(batch):
            time.sleep(max(0.0, min(0.25, batch[i][0] - now)))
    return posted


def history(service: ServiceProcess, contact_id: str) -> list[dict[str, Any]]:
    """Every message of a contact, all pages."""
    found: list[dict[str, Any]] = []
    query: dict[str, str] = {"limit": "100"}
    while True:
        status, body = service.request("GET", f"/v1/contacts/{contact_id}/messages?"
                                       + urllib.parse.urlencode(query))  # fmt: skip
        assert status == 200, body
        found.extend(body["messages"])
        if not body.get("next_before"):
            return found
        query = {"limit": "100", "before": body["next_before"], "before_id": body["next_before_id"]}


Key = tuple[str, str, str, str | None, str, str | None, str | None]  # message id .. detail


def live_fates(messages: list[dict[str, Any]]) -> dict[str, tuple[Key, datetime, bool]]:
    """Per message: what was decided, its due time, and whether it was an immediate send (due when the
    inbox took its event, so late by the lag). A postponed message stays `scheduled` with the end of
    quiet hours as its new due time: a simulation's `postponed` with `postponed_to`, not sent before the
    simulation's end."""
    fates = {}
    for m in messages:
        channel = m.get("sent_channel") or m["channel"]
        if m["status"] == "scheduled":
            assert m.get("reason") == "quiet_hours", m  # nothing else may still wait
            status, channel = "postponed", None  # live does not record the channel chosen then
        else:
            status = "sent" if m["status"] in ("sent", "delivered", "opened", "clicked", "bounced",
                                               "blocked", "replied") else m["status"]  # fmt: skip
        due = datetime.fromisoformat(m["due_at"])
        immediate = due == datetime.fromisoformat(m["created_at"])
        if m["status"] == "cancelled":  # when its event came: taken by the inbox, late by the lag
            due, immediate = datetime.fromisoformat(m["cancelled_at"]), True
        key = (m["message_id"], m["ruleset"], m["rule"], channel, status, m.get("reason"), m.get("detail"))
        fates[m["message_id"]] = (key, due, immediate)
    return fates


def simulated_fates(actions: list[dict[str, Any]]) -> dict[str, tuple[Key, datetime]]:
    """Per message, its last decision: a postponement that the simulation's end found still waiting
    is where it stands, as live."""
    fates: dict[str, tuple[Key, datetime]] = {}
    for a in actions:
        if a.get("template") is None:
            continue  # a wait's timer (`fired`, or `cancelled` by its event): no message
        channel = None if a["status"] == "postponed" else a["channel"]
        key = (a["message_id"], a["ruleset"], a["rule"], channel, a["status"], a.get("reason"),
               a.get("detail"))  # fmt: skip
        due = a.get("postponed_to") or a["at"]
        fates[a["message_id"]] = (key, datetime.fromisoformat(due))
    return fates


def differences(
    live: dict[str, tuple[Key, datetime, bool]], simulated: dict[str, tuple[Key, datetime]]
) -> list[str]:
    found = []
    for mid in sorted(set(live) | set(simulated)):
        if mid not in simulated:
            found.append(f"live only:      {live[mid][0]} due {live[mid][1]:%H:%M:%S.%f}")
            continue
        if mid not in live:
            found.append(f"simulated only: {simulated[mid][0]} due {simulated[mid][1]:%H:%M:%S.%f}")
            continue
        (lkey, ldue, immediate), (skey, sdue) = live[mid], simulated[mid]
        late = (ldue - sdue).total_seconds()
        on_time = -1 <= late <= (LAG if immediate and lkey[4] != "postponed" else 1)
        if lkey != skey or not on_time:
            found.append(
                f"live:      {lkey} due {ldue:%H:%M:%S.%f}\n  simulated: {skey} due {sdue:%H:%M:%S.%f}"
            )
    return found


@contextmanager
def smtp() -> Iterator[tuple[Mailbox, int]]:
    box, port = Mailbox(), free_port()
    controller = Controller(box, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield box, port
    finally:
        controller.stop()


SEED = 2026
CONTACTS = 200
SPAN = 20.0  # seconds of contact activity
HORIZON = 12.0  # after the last event: every wait and delay of the shortened rulesets has run out


@dataclass
class Run:
    live: dict[str, tuple[Key, datetime, bool]]
    simulated: dict[str, tuple[Key, datetime]]
    mails: int  # what the SMTP server received

    def assert_same(self) -> None:
        found = differences(self.live, self.simulated)
        assert not found, f"{len(found)} of {len(self.live)} messages differ:\n" + "\n".join(found[:8])

    def keys(self) -> list[Key]:
        return [key for key, _, _ in self.live.values()]


def due_by(moment: datetime) -> dict[str, Any]:
    """The schedule entries still to run that came due by `moment`: one put back to wait for its
    contact's earlier events or sends is due later now, but was due by its `held_due`."""
    due = {"$or": [{"due_at": {"$lte": moment}}, {"held_due": {"$lte": moment}}]}
    return {"status": {"$in": ["pending", "running"]}, **due}


def run_both(
    tmp_path: Path, data: Corpus, start: datetime, caps: str = CAPS, horizon: float = HORIZON
) -> Run:
    """The corpus through a real service, its contacts' events from `start` on, the catalog's once
    those are decided; then through the same service's `POST /v1/simulate`, until everything due in
    the window is decided live."""
    with smtp() as (mailbox, port):
        service = ServiceProcess(tmp_path, env={
            "RULESVC_RULESETS_DIR": str(shortened(tmp_path)), "RULESVC_QUIET_HOURS": quiet_window(start),
            "RULESVC_FREQUENCY_CAPS": caps, "RULESVC_CHANNEL_LOG_QUIET_HOURS": "true",
            "RULESVC_CHANNEL_EMAIL_HOST": "127.0.0.1", "RULESVC_CHANNEL_EMAIL_PORT": str(port),
            "RULESVC_CHANNEL_EMAIL_SECURITY": "none", "RULESVC_CHANNEL_EMAIL_FROM": "Shop <shop@example.com>",
            "RULESVC_SIMULATE_BUDGET_SECONDS": "300",
        })  # fmt: skip
        try:
            service.start()
            for contact in data.contacts:
                profile = {k: v for k, v in contact.items() if k != "contact_id"}
                status, body = service.request("PUT", f"/v1/contacts/{contact['contact_id']}", profile)
                assert status == 201, body
            # A slow start leaves no event in the past: all move by the same seconds, and nothing in the
            # corpus hangs on the clock's exact time (quiet hours are an hour around it).
            start = max(start, datetime.now(UTC) + timedelta(seconds=1))
            posted = post_paced(service, data.events, start)
            with service.db() as db:

                def contacts_done() -> bool:
                    """Their events and what those armed (but quiet hours' postponements) decided: no
                    catalog send comes due next to one of theirs, which lag could put first."""
                    soon = datetime.now(UTC) + timedelta(minutes=10)
                    busy = due_by(soon)
                    return (db.inbox.count_documents({"state": "pending"}) == 0
                            and db.schedule.count_documents(busy) == 0)  # fmt: skip

                wait_for(contacts_done, timeout=120, what="the contacts' phase decided before the catalog's")
                posted += post_paced(service, data.catalog, datetime.now(UTC))
                until = datetime.fromisoformat(posted[-1]["time"]) + timedelta(seconds=horizon)
                while datetime.now(UTC) < until:
                    time.sleep(0.5)

                def all_decided() -> bool:
                    busy = due_by(until)
                    return (db.inbox.count_documents({"state": "pending"}) == 0
                            and db.schedule.count_documents(busy) == 0)  # fmt: skip

                wait_for(all_decided, timeout=120, what="every message due before the end decided")
            live: dict[str, tuple[Key, datetime, bool]] = {}
            for contact in data.contacts:
                live.update(live_fates(history(service, contact["contact_id"])))
            body = {"events": posted, "contacts": data.contacts, "until": until.isoformat()}
            status, answer = service.request("POST", "/v1/simulate", body)
            assert status == 200, answer
        finally:
            service.stop()
        return Run(live, simulated_fates(answer["actions"]), len(mailbox.messages))


def test_corpus_decides_the_same_live_and_simulated(tmp_path: Path) -> None:
    start = datetime.now(UTC) + timedelta(seconds=20)  # the service starts meanwhile
    data = corpus(SEED, CONTACTS, zones_without_midnight(start), SPAN)
    data = clear_of_dues(data, start, shortened(tmp_path / "plan"))
    assert len(data.events) + len(data.catalog) >= 2000 and len(data.contacts) >= 200
    run = run_both(tmp_path, data, start)
    run.assert_same()
    # The corpus reached what it is for: each send rule spoke, on each kind of channel.
    keys = run.keys()
    codes = {k[5] for k in keys}
    assert {
        "no_consent",
        "unreachable",
        "frequency_cap",
        "quiet_hours",
        "guard_failed",
        "cancelled_by_event",
        "rearmed",
        "suppression_list",
        "channel_not_configured",
    } <= codes, codes
    assert {k[3] for k in keys if k[4] == "sent"} >= {"email", "log", "inapp"}
    assert any(k[6] == QUIET_REASON for k in keys)
    assert run.mails == sum(1 for k in keys if k[4] == "sent" and k[3] == "email")  # fmt: skip


# The differences the corpus found, each in the fewest events that showed it (see each case).
FIXED_CONTACTS: list[dict[str, Any]] = [
    {"contact_id": "no-mail", "timezone": "UTC"},
    {"contact_id": "reader", "timezone": "UTC", "email": "reader@example.com", "consent": {"email": True}},
    {"contact_id": "twice", "timezone": "UTC", "email": "twice@example.com", "consent": {"email": True}},
    {"contact_id": "quick", "timezone": "UTC", "email": "quick@example.com", "consent": {"email": True}},
    {"contact_id": "tie", "timezone": "UTC", "email": "tie@example.com", "consent": {"email": True}},
]
FIXED_EVENTS: list[tuple[float, dict[str, Any]]] = [
    # Live, a report naming a message that was never sent (suppressed: no address) made it `opened`.
    (0.0, {"id": "nm-1", "type": "purchased", "contact_id": "no-mail", "attributes": {"order_id": "o1"}}),
    (2.0, {"id": "nm-2", "type": "message_opened", "contact_id": "no-mail",
           "attributes": {"message_id": "nm-1/confirmations/order/0"}}),
    # A report naming a reminder not due yet: live, it moved the reminder to `opened` (never sent
    # then); simulated, it named nothing (only decided messages were known), so `email_opened` of the
    # engagement ruleset never fired.
    (0.0, {"id": "rd-1", "type": "cart_updated", "contact_id": "reader",
           "attributes": {"value": 120, "currency": "EUR", "items": []}}),
    (2.0, {"id": "rd-2", "type": "message_opened", "contact_id": "reader",
           "attributes": {"message_id": "rd-1/cart_abandon/remind/2"}}),
    # Two reminders due at the same moment go to `log` in one scheduler batch: live, the cap (1 a day
    # here) counted neither, because a `log` send stays `scheduled` until the batch is written.
    (0.0, {"id": "tw-1", "type": "cart_updated", "contact_id": "twice",
           "attributes": {"value": 120, "currency": "EUR", "items": []}}),
    (0.0, {"id": "tw-2", "type": "checkout_started", "contact_id": "twice", "attributes": {"value": 120}}),
    # A report in the same inbox batch as the event whose message it names (posted together): live, the
    # message was looked up before the batch made it, so `email_opened` did not fire.
    (0.0, {"id": "qk-1", "type": "purchased", "contact_id": "quick", "attributes": {"order_id": "o2"}}),
    (0.0, {"id": "qk-2", "type": "message_opened", "contact_id": "quick",
           "attributes": {"message_id": "qk-1/confirmations/order/0"}}),
    # Two events of one moment, where the first wins (`once`): live takes them in id order, the
    # simulator took them in the request's order.
    (0.0, {"id": "tie-b", "type": "address_changed", "contact_id": "tie", "attributes": {}}),
    (0.0, {"id": "tie-a", "type": "address_changed", "contact_id": "tie", "attributes": {}}),
]  # fmt: skip


def test_fixed_cases_decide_the_same_live_and_simulated(tmp_path: Path) -> None:
    start = datetime.now(UTC) + timedelta(seconds=15)
    events = sorted(FIXED_EVENTS, key=lambda t: t[0])  # stable: the same moment's events as listed
    run = run_both(tmp_path, Corpus(FIXED_CONTACTS, events), start, "email=1,log=1", horizon=12)
    run.assert_same()
    fates = {mid: key[4:6] for mid, (key, _, _) in run.live.items()}
    assert fates["nm-1/confirmations/order/0"] == ("suppressed", "unreachable")
    assert fates["rd-2/engagement/email_opened/0"] == ("sent", None)
    assert fates["rd-1/cart_abandon/remind/2"] == ("suppressed", "frequency_cap")  # the nudge went first
    assert fates["qk-2/engagement/email_opened/0"] == ("sent", None)
    assert (
        fates["tie-a/lifecycle/new_address/0"] == ("sent", None)
        and "tie-b/lifecycle/new_address/0" not in fates
    )
    for cart, checkout in (("remind/1", "remind/0"), ("remind/2", "remind/1")):  # log, then email
        pair = [fates[f"tw-1/cart_abandon/{cart}"], fates[f"tw-2/checkout_abandon/{checkout}"]]
        assert sorted(pair) == [("sent", None), ("suppressed", "frequency_cap")]


async def test_an_event_during_a_send_that_is_retried_still_cancels_it(
    make_client: Any, settings: Settings
) -> None:
    """Found by the corpus as a postponement that outlived a purchase: an event that cancels a message,
    taken by the inbox while the scheduler held the message's entry (here: a provider call that ends in
    a retry), did not see the entry, and the retry sent it anyway. A simulation decides the due entry
    first, then the event, which cancels it: the live inbox now waits for the entry's decision too."""
    push = Provider("push", needs="push_tokens")
    push.hanging = True
    push.script = [Delivery("retry", "busy, try again")]
    quick = msgspec.structs.replace(settings, retry_base_seconds=4)
    app = create_app(setup(quick, [send("push", cancel_on=["stop"])]), registry(push))
    client = await make_client(app)
    await client.put("/v1/contacts/c1", json={"push_tokens": ["t"], "consent": {"push": True}})
    await go(client)

    async def calling() -> bool:
        return len(push.keys_seen) == 1

    await eventually(calling)
    events = [
        {"id": "stop-1", "type": "stop", "contact_id": "c1"},
        {"id": "x-1", "type": "x", "contact_id": "c2"},
    ]
    assert (await client.post("/v1/events", json=events)).status == 202

    async def state(contact: str, event_id: str) -> str:
        found = (await (await client.get(f"/v1/contacts/{contact}/events")).json())["events"]
        return str(next(e["state"] for e in found if e["id"] == event_id))

    async def other_decided() -> bool:
        return await state("c2", "x-1") == "done"

    await eventually(other_decided)  # the inbox went past the event ...
    assert await state("c1", "stop-1") == "pending"  # ... and left it for after the call
    push.hang.set()
    [message] = await settled(client)
    assert (message["status"], message.get("reason")) == ("cancelled", "cancelled_by_event"), message
    assert len(push.keys_seen) == 1  # the retry never called the provider again
