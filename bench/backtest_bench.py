"""The backtest benchmark: a stored two-week history replayed through the live and a candidate version.

    make bench-backtest   # or: .venv/bin/python bench/backtest_bench.py [--events N --contacts N]

Starts its own mongod (embedded, temporary), writes a seeded history straight into it in the shape the
service stores (events decided: as received, none in the inbox's queue; catalog events with their
per-contact copies, contacts with profiles), and measures in one run:
1. the engine alone: the same events through `Engine.evaluate` per contact in time order, with the
   shipped rulesets, no send rules and no MongoDB (the baseline);
2. the backtest: `run_backtest` over the window with the shipped rulesets as baseline and, as
   candidate, the same with the cart push reminder after 45 minutes instead of 20, in a child process;
   its rate per ruleset version is 2 x events / seconds (every event is replayed through both);
3. memory: the peak RSS (VmHWM) of that child, of a child that only imports and compiles both
   versions, and of a backtest over the first quarter of the window (bounded: the same, not 4x less).
Prints a summary and a JSON line, and writes bench/results/backtest.json.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import itertools
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rulesvc.core.catalog import catalog_change, interest_fields, interested  # noqa: E402
from rulesvc.core.ids import fanout_copy_id  # noqa: E402

Doc = dict[str, Any]
BATCH = 5000  # documents per insert_many
DAY = 86400.0
# What the candidate changes: the cart push reminder (rulesets/cart_abandon.json, rule `remind`).
CANDIDATE_RULESET, CANDIDATE_RULE, CANDIDATE_DELAY = "cart_abandon", "remind", "45m"
# Where a contact's sessions start (UTC hour), a shop's day: quiet at night, busy in the evening.
HOUR_WEIGHTS = [1, 1, 1, 1, 1, 2, 3, 5, 6, 6, 6, 6, 7, 7, 6, 6, 7, 8, 9, 10, 10, 8, 5, 2]
TIMEZONES = (
    ["Europe/Berlin"] * 5 + ["Europe/Warsaw"] * 2 + ["Europe/London", "America/New_York", "Asia/Tokyo"]
)
# Inside a session, after a view / category / page, the next event (weights).
BROWSE_NEXT = (
    ("product_viewed", 42),
    ("category_viewed", 12),
    ("page_viewed", 12),
    ("cart_updated", 16),
    ("wishlist_added", 4),
    ("checkout_started", 7),
    ("purchased", 4),
    ("subscribed", 1),
    ("social_shared", 1),
)
# Now and then, outside sessions: what a contact does or what its messages report back.
OCCASIONAL = (
    ("message_delivered", 40),
    ("message_opened", 22),
    ("message_clicked", 10),
    ("message_bounced", 2),
    ("message_replied", 2),
    ("address_changed", 3),
    ("voucher_issued", 6),
    ("social_shared", 8),
)


def weighted(pairs: tuple[tuple[str, int], ...]) -> tuple[list[str], list[int]]:
    names = [name for name, _ in pairs]
    return names, list(itertools.accumulate(w for _, w in pairs))


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


def at(ts: float) -> datetime:
    # Milliseconds, as BSON stores them: the generated time is the stored time.
    return datetime.fromtimestamp(round(ts, 3), UTC)


# --- the history -------------------------------------------------------------------------------------


@dataclass
class CatalogEvent:
    id: str
    type: str
    product: str
    ts: float
    attributes: Doc
    change: Doc  # what the fan-out adds to each copy (catalog_change with the product as it was)


@dataclass
class Catalog:
    """The products, their popularity, and the price and stock changes over the window."""

    products: int
    price: list[float]
    stock: dict[str, tuple[list[float], list[bool]]]  # per product: change times and in-stock after them
    events: list[CatalogEvent]
    by_product: dict[str, list[CatalogEvent]] = field(default_factory=dict)
    cum_weights: list[float] = field(default_factory=list)

    def in_stock(self, product: str, ts: float) -> bool:
        times, states = self.stock.get(product, ([], []))
        i = bisect.bisect_right(times, ts)
        return states[i - 1] if i else self.stock_at_start(product)

    def stock_at_start(self, product: str) -> bool:
        return int(product[1:]) % 10 != 3  # one product in ten starts out of stock


class History:
    """A reproducible shop history: `events` contact events (exactly) over `contacts` contacts, between
    `start` and `end`; plus catalog events and the copies the fan-out made of them for interested
    contacts. Each contact's events come from its own seeded random stream, so the history can be
    generated again contact by contact (the engine-alone measurement does) without holding it."""

    def __init__(self, events: int, contacts: int, start: datetime, end: datetime, seed: int = 7) -> None:
        if events < contacts:
            raise ValueError("at least one event per contact")
        self.events, self.contacts, self.seed = events, contacts, seed
        self.start, self.end = start.timestamp(), end.timestamp()
        rng = random.Random(seed)
        # Most contacts have a handful of events, a few have hundreds: lognormal, scaled to the total.
        weights = [rng.lognormvariate(0.0, 1.1) for _ in range(contacts)]
        spare, total = events - contacts, sum(weights)
        shares = [w / total * spare for w in weights]
        self.counts = [1 + int(s) for s in shares]
        left = events - sum(self.counts)
        for i in sorted(range(contacts), key=lambda i: int(shares[i]) - shares[i])[:left]:
            self.counts[i] += 1
        self.catalog = self._catalog(rng)
        self._browse = weighted(BROWSE_NEXT)
        self._occasional = weighted(OCCASIONAL)

    def _catalog(self, rng: random.Random) -> Catalog:
        products = max(200, self.contacts // 20)
        price = [float(rng.randrange(5, 400)) + 0.99 for _ in range(products)]
        cum = list(itertools.accumulate(1.0 / (i + 1) ** 0.8 for i in range(products)))
        catalog = Catalog(products, price, {}, [], cum_weights=cum)
        n = max(10, self.events // 2000)
        times = sorted(rng.uniform(self.start, self.end - 60) for _ in range(n))
        current: dict[str, Doc] = {}
        for k, ts in enumerate(times):
            product = f"p{rng.randrange(products)}"
            before = current.setdefault(
                product, {"price": price[int(product[1:])], "in_stock": catalog.stock_at_start(product)}
            )
            attributes: Doc
            if rng.random() < 0.7:
                kind = "price_changed"
                new = round(before["price"] * rng.choice([0.7, 0.8, 0.85, 0.9, 0.95, 1.05, 1.1, 1.2]), 2)
                attributes = {"product_id": product, "price": new, "previous_price": before["price"],
                              "currency": "EUR", "name": f"Product {product}"}  # fmt: skip
            else:
                kind = "stock_changed"
                in_stock = not before["in_stock"] if rng.random() < 0.8 else before["in_stock"]
                quantity = 0 if not in_stock else rng.choice([2, 3, 4, 12, 40, 100])
                attributes = {"product_id": product, "in_stock": in_stock, "quantity": quantity,
                              "name": f"Product {product}"}  # fmt: skip
                times_, states = catalog.stock.setdefault(product, ([], []))
                times_.append(ts)
                states.append(in_stock)
            fields, change = catalog_change(kind, attributes, before)
            before.update(fields)
            event = CatalogEvent(f"cat{k}", kind, product, ts, attributes, change)
            catalog.events.append(event)
            catalog.by_product.setdefault(product, []).append(event)
        return catalog

    def catalog_docs(self) -> list[Doc]:
        """The catalog events as the service stores them once fanned out: no contact, `done`."""
        return [self._stored(e.id, e.type, None, e.ts, e.attributes) for e in self.catalog.events]

    def _stored(self, event_id: str, kind: str, contact_id: str | None, ts: float, attributes: Doc) -> Doc:
        received = ts + 0.05 + (zlib.crc32(event_id.encode()) % 1000) / 1000  # reproducible, unlike hash()
        return {"_id": event_id, "type": kind, "contact_id": contact_id, "time": at(ts),
                "attributes": attributes, "received_at": at(received)}  # fmt: skip

    def contact_doc(self, i: int) -> Doc:
        rng = random.Random(self.seed * 1_000_003 + i)
        consent = {"email": rng.random() < 0.85, "sms": rng.random() < 0.4, "push": rng.random() < 0.6,
                   "webpush": rng.random() < 0.2}  # fmt: skip
        created = at(self.start - rng.uniform(DAY, 400 * DAY))
        return {
            "_id": f"c{i}",
            "email": f"c{i}@mail.example" if rng.random() < 0.95 else None,
            "phone": f"+4915{i:09d}" if rng.random() < 0.5 else None,
            "push_tokens": [f"tok-{i}"] if rng.random() < 0.55 else [],
            "webpush_subscriptions": [
                {"endpoint": f"https://push.example/{i}", "keys": {"p256dh": "BPk", "auth": "aGk"}}
            ]
            if rng.random() < 0.15
            else [],
            "consent": consent,
            "timezone": rng.choice(TIMEZONES),
            "attributes": {"tier": "gold" if rng.random() < 0.1 else "basic"},
            "email_invalid": rng.random() < 0.02,
            "created_at": created,
            "updated_at": created,
        }

    def contact_events(self, i: int) -> list[Doc]:
        """Contact `i`'s stored events in time order: its own (exactly `counts[i]`), then the copies of
        the catalog events it was interested in when they happened, merged in."""
        rng = random.Random(self.seed * 1_000_003 + i + 500_000_009)
        cid, n = f"c{i}", self.counts[i]
        raw: list[tuple[float, str, Doc]] = []
        orders = 0
        while len(raw) < n:
            # A session: a burst of events seconds to minutes apart, often ending in `session_ended`.
            day = rng.randrange(int((self.end - self.start) // DAY) or 1)
            hour = rng.choices(range(24), cum_weights=_HOURS)[0]
            ts = self.start + day * DAY + hour * 3600 + rng.uniform(0, 3600)
            if rng.random() < 0.08 and raw:
                kind = rng.choices(self._occasional[0], cum_weights=self._occasional[1])[0]
                raw.append((ts, kind, self._occasional_attributes(rng, kind, ts, i, len(raw))))
                continue
            cart: list[Doc] = []
            length = min(n - len(raw), 1 + int(rng.expovariate(1 / 5)))
            kind = "product_viewed"
            for _ in range(length):
                attributes = self._session_attributes(rng, kind, ts, cart, f"o{i}-{orders}")
                raw.append((ts, kind, attributes))
                if kind == "purchased":
                    raw.extend(self._deliveries(rng, ts, f"o{i}-{orders}"))
                    orders += 1
                    cart = []
                ts += 5 + rng.expovariate(1 / 50)
                kind = rng.choices(self._browse[0], cum_weights=self._browse[1])[0]
                if kind == "checkout_started" and not cart:
                    kind = "cart_updated"
            if rng.random() < 0.4:
                raw.append((ts + 120, "session_ended", {}))
        raw = sorted((r for r in raw if r[0] < self.end - 1), key=lambda r: r[0])[:n]
        while len(raw) < n:  # deliveries after the window's end were dropped: views instead
            ts = rng.uniform(self.start, self.end - 60)
            raw.append((ts, "page_viewed", {"page": "home"}))
            raw.sort(key=lambda r: r[0])
        docs = [self._stored(f"e{i}-{k}", kind, cid, ts, attrs) for k, (ts, kind, attrs) in enumerate(raw)]
        copies = self._copies(cid, docs)
        if copies:
            docs = sorted(docs + copies, key=lambda d: d["time"])
        return docs

    def _copies(self, cid: str, docs: list[Doc]) -> list[Doc]:
        interests: dict[str, list[tuple[datetime, Doc]]] = {}
        for doc in docs:
            fields = interest_fields(doc)
            if fields:
                interests.setdefault(str(doc["attributes"]["product_id"]), []).append((doc["time"], fields))
        copies = []
        for product, seen in interests.items():
            for event in self.catalog.by_product.get(product, ()):
                moment = at(event.ts)
                interest: Doc = {}
                for when, fields in seen:
                    if when < moment:
                        interest.update(fields)
                if not interest or not interested(event.type, interest, moment):
                    continue
                attributes = {**event.attributes, **event.change}
                attributes["interest"] = {
                    k: interest[f"{k}_at"].isoformat()
                    for k in ("viewed", "wishlisted", "wanted_oos")
                    if f"{k}_at" in interest
                }
                copy = self._stored(fanout_copy_id(event.id, cid), event.type, cid, event.ts, attributes)
                copy["fanout_of"] = event.id
                copies.append(copy)
        return copies

    def _product(self, rng: random.Random) -> str:
        return f"p{rng.choices(range(self.catalog.products), cum_weights=self.catalog.cum_weights)[0]}"

    def _session_attributes(
        self, rng: random.Random, kind: str, ts: float, cart: list[Doc], order: str
    ) -> Doc:
        if kind in ("product_viewed", "wishlist_added", "subscribed"):
            product = self._product(rng)
            attributes: Doc = {"product_id": product, "price": self.catalog.price[int(product[1:])]}
            if kind == "product_viewed":
                attributes["in_stock"] = self.catalog.in_stock(product, ts)
            return attributes
        if kind == "category_viewed":
            return {"category": f"cat{rng.randrange(40)}"}
        if kind == "page_viewed":
            return {"page": rng.choices(["home", "paywall", "faq", "sale", "account"], [5, 2, 1, 2, 1])[0]}
        if kind == "social_shared":
            return {"network": rng.choice(["instagram", "facebook", "x"])}
        if kind == "cart_updated":
            if cart and rng.random() < 0.08:
                cart.clear()  # emptied
            else:
                product = self._product(rng)
                price = self.catalog.price[int(product[1:])]
                cart.append({"sku": product, "name": f"Product {product}", "qty": rng.randrange(1, 3),
                             "price": price})  # fmt: skip
        value = round(sum(item["price"] * item["qty"] for item in cart), 2)
        attributes = {"value": value, "currency": "EUR", "items": [dict(item) for item in cart]}
        if kind == "purchased":
            attributes["order_id"] = order
            if rng.random() < 0.15:
                attributes["promo_code"] = "SPRING10"
            if rng.random() < 0.1:
                attributes |= {"points_used": rng.randrange(50, 500), "points_left": rng.randrange(0, 900)}
        return attributes

    def _deliveries(self, rng: random.Random, ts: float, order: str) -> list[tuple[float, str, Doc]]:
        shipped = ts + rng.uniform(2 * 3600, DAY)
        arrives = shipped + rng.choice([1, 1, 2, 3]) * DAY
        expected = datetime.fromtimestamp(arrives, UTC).date().isoformat()
        kind = "delivery_status_changed"
        tracking = f"https://track.example/{order}"
        shipping = {"order_id": order, "status": "shipped", "carrier": "DHL", "tracking_url": tracking,
                    "expected_delivery_date": expected}  # fmt: skip
        out = [(shipped, kind, shipping)]
        if rng.random() < 0.1:
            delayed = {"order_id": order, "status": "delayed", "expected_delivery_date": expected}
            out.append((shipped + DAY / 2, kind, delayed))
        out.append(
            (arrives - 5 * 3600, "delivery_status_changed", {"order_id": order, "status": "out_for_delivery"})
        )
        out.append((arrives, "delivery_status_changed", {"order_id": order, "status": "delivered"}))
        return out

    def _occasional_attributes(self, rng: random.Random, kind: str, ts: float, i: int, k: int) -> Doc:
        if kind.startswith("message_"):
            channel = rng.choices(["email", "push", "sms"], [6, 3, 1])[0]
            ruleset = rng.choice(["cart_abandon", "browse_abandon", "checkout_abandon", "price_drop"])
            return {"message_id": f"m{i}-{k}", "channel": channel, "ruleset": ruleset}
        if kind == "voucher_issued":
            return {
                "voucher_code": f"V{i}-{k}",
                "expires_at": iso(ts + rng.uniform(4, 20) * DAY),
                "value": 10,
            }
        if kind == "address_changed":
            return {"city": rng.choice(["Berlin", "Hamburg", "Warszawa", "Wien"]), "country": "DE"}
        return {"network": rng.choice(["instagram", "facebook", "x"])}

    def per_contact(self, first: int = 0, stop: int | None = None) -> Iterator[tuple[Doc, list[Doc]]]:
        for i in range(first, self.contacts if stop is None else stop):
            yield self.contact_doc(i), self.contact_events(i)


_HOURS = list(itertools.accumulate(HOUR_WEIGHTS))


# --- into MongoDB --------------------------------------------------------------------------------------


async def store_history(history: History, uri: str, database: str) -> Doc:
    """Bulk inserts, unordered, w=1 (a benchmark's setup, not the service's durable path); then the
    service's own indexes (`ensure_schema`), built once over the stored data as a restart would."""
    from pymongo import AsyncMongoClient
    from pymongo.write_concern import WriteConcern

    from rulesvc.store.db import Store

    client: AsyncMongoClient[Doc] = AsyncMongoClient(uri, tz_aware=True)
    db = client.get_database(database, write_concern=WriteConcern(w=1))
    in_flight: list[asyncio.Task[Any]] = []

    async def insert(collection: str, docs: list[Doc]) -> None:
        in_flight.append(asyncio.create_task(db[collection].insert_many(docs, ordered=False)))
        await asyncio.sleep(0)  # sent: mongod writes on its core while the next batch is generated here
        while len(in_flight) > 2:
            await in_flight.pop(0)

    t0 = time.perf_counter()
    own = copies = 0
    events: list[Doc] = history.catalog_docs()
    contacts: list[Doc] = []
    interests: list[Doc] = []
    for contact, docs in history.per_contact():
        contacts.append(contact)
        events.extend(docs)
        interests.extend(interest_docs(contact["_id"], docs))
        copies += sum("fanout_of" in d for d in docs)
        own += sum("fanout_of" not in d for d in docs)
        for name, pending in (("events", events), ("contacts", contacts), ("interests", interests)):
            if len(pending) >= BATCH:
                await insert(name, pending[:])
                pending.clear()
    for name, pending in (("events", events), ("contacts", contacts), ("interests", interests)):
        if pending:
            await insert(name, pending)
    for task in in_flight:
        await task
    inserted = time.perf_counter() - t0
    t0 = time.perf_counter()
    await Store(
        client, database, timedelta(days=365)
    ).ensure_schema()  # a TTL past the window: nothing expires
    indexed = time.perf_counter() - t0
    # Counted in the database, not taken from the generator: what a replay of the window must see.
    window = {"time": {"$gte": at(history.start), "$lt": at(history.end)}}
    own_query = {**window, "contact_id": {"$ne": None}, "fanout_of": {"$exists": False}}
    stored = {
        "contact_events": await db.events.count_documents(own_query),
        "catalog_copies": await db.events.count_documents({**window, "fanout_of": {"$exists": True}}),
        "catalog_events": await db.events.count_documents({**window, "contact_id": None}),
        "contacts": await db.contacts.count_documents({}),
        "contacts_with_events": len(await db.events.distinct("contact_id", own_query)),
        "interests": await db.interests.count_documents({}),
    }
    # What a replay of the window reads: each contact's own events and each catalog event once (the
    # copies are the service's own, and the replay makes them again).
    stored["replayable_events"] = stored["contact_events"] + stored["catalog_events"]
    assert (stored["contact_events"], stored["catalog_copies"]) == (own, copies), "stored != generated"
    await client.close()
    total = sum(
        stored[k] for k in ("contact_events", "catalog_copies", "catalog_events", "contacts", "interests")
    )
    return {
        "stored": stored,
        "insert_seconds": inserted,
        "docs_per_s": total / inserted,
        "index_seconds": indexed,
    }


def interest_docs(contact_id: str, docs: list[Doc]) -> list[Doc]:
    """The interest index as the inbox leaves it after these events (runtime.fanout.interest_updates)."""
    found: dict[str, Doc] = {}
    for doc in docs:
        fields = interest_fields(doc)
        if fields and "fanout_of" not in doc:
            product = str(doc["attributes"]["product_id"])
            entry = found.setdefault(product, {"_id": f"{contact_id}|{product}", "contact_id": contact_id,
                                               "product_id": product})  # fmt: skip
            for name, moment in fields.items():
                entry[name] = max(moment, entry.get(name, moment))
    return list(found.values())


# --- the engine alone ---------------------------------------------------------------------------------


def compile_folder(folder: Path, channels: frozenset[str]) -> list[Any]:
    """Every ruleset of a folder, compiled as the service loads them."""
    from rulesvc import logs
    from rulesvc.runtime.rulesets import Rulesets

    logs.configure("console", "warning")
    rulesets = Rulesets(folder, channels)
    rulesets.reload()
    if rulesets.errors():
        raise SystemExit(f"{folder}: {rulesets.errors()}")
    return list(rulesets.live.values())


def engine_alone(history: History, channels: frozenset[str], chunk: int = 2000) -> Doc:
    """`Engine.evaluate` for every contact event of the history, per contact in time order, each
    contact's state starting empty (as the backtest's does), evaluated at the event's own time. Only
    the evaluations are timed: the history is generated again a chunk of contacts at a time, untimed."""
    from rulesvc.core.contacts import PROFILE_FIELDS
    from rulesvc.core.engine import ContactView, Engine, EngineEvent, RuleIndex

    engine = Engine(RuleIndex(compile_folder(ROOT / "rulesets", channels)))
    seconds, cpu, events, fired, scheduled = 0.0, 0.0, 0, 0, 0
    for first in range(0, history.contacts, chunk):
        work = []
        for contact, docs in history.per_contact(first, min(first + chunk, history.contacts)):
            profile = {k: contact[k] for k in PROFILE_FIELDS} | {"email_invalid": contact["email_invalid"]}
            view = ContactView(contact["_id"], profile, {})
            work.append((view, [EngineEvent(d["_id"], d["type"], d["contact_id"], d["time"], d["attributes"])
                                for d in docs]))  # fmt: skip
        t0, c0 = time.perf_counter(), time.process_time()
        for view, evs in work:
            for event in evs:
                decisions = engine.evaluate(event, view, event.time)
                fired += len(decisions.fired)
                scheduled += len(decisions.schedule)
        seconds += time.perf_counter() - t0
        cpu += time.process_time() - c0
        events += sum(len(evs) for _, evs in work)
    return {"events": events, "seconds": seconds, "events_per_s": events / seconds, "cpu_seconds": cpu,
            "events_per_cpu_s": events / cpu, "rules_fired": fired,
            "entries_scheduled": scheduled}  # fmt: skip


# --- child processes: the backtest, and what importing and compiling alone costs ----------------------


def memory_mb() -> tuple[float, float]:
    """This process's (peak, current) resident memory: VmHWM and VmRSS."""
    fields = dict(
        line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line
    )
    return int(fields["VmHWM"].split()[0]) / 1024, int(fields["VmRSS"].split()[0]) / 1024


def candidate_folder(into: Path) -> Path:
    """The shipped rulesets with one delay changed: the cart push reminder after 45 minutes, not 20."""
    folder = into / "candidate"
    shutil.copytree(ROOT / "rulesets", folder)
    path = folder / f"{CANDIDATE_RULESET}.json"
    source = json.loads(path.read_text())
    rule = next(r for r in source["rules"] if r["name"] == CANDIDATE_RULE)
    push = next(a["send"] for a in rule["then"] if "send" in a and a["send"]["channel"] == "push")
    push["after"] = CANDIDATE_DELAY
    path.write_text(json.dumps(source, indent=2))
    return folder


def versions(args: argparse.Namespace) -> tuple[Any, Any, Any, Any]:
    from rulesvc.config import load_settings
    from rulesvc.replay.backtest import Version
    from rulesvc.web.lifecycle import load_channels, send_policy

    settings = load_settings(args.config, environ={})
    channels = load_channels(settings)[0]
    live = ROOT / "rulesets"
    baseline = Version(f"live rulesets ({live})", compile_folder(live, channels.names()))
    candidate = Version(str(args.candidate), compile_folder(Path(args.candidate), channels.names()))
    return baseline, candidate, channels, send_policy(settings)


def child_compile(args: argparse.Namespace) -> Doc:
    """The floor under the backtest's memory: its imports, the channels and both versions compiled."""
    import pymongo  # noqa: F401

    import rulesvc.replay.backtest
    import rulesvc.store.db  # noqa: F401

    versions(args)
    peak, now = memory_mb()
    return {"peak_rss_mb": peak, "rss_mb": now}


async def child_backtest(args: argparse.Namespace) -> Doc:
    from pymongo import AsyncMongoClient

    from rulesvc.replay.backtest import Options, Progress, Window, run_backtest
    from rulesvc.store.db import Store

    baseline, candidate, channels, policy = versions(args)
    client: AsyncMongoClient[Doc] = AsyncMongoClient(args.uri, tz_aware=True)
    store = Store(client, args.database, timedelta(days=365))
    window = Window(datetime.fromisoformat(args.start), datetime.fromisoformat(args.end))
    samples: dict[str, float] = {}  # RSS as the replay goes: flat if memory is bounded
    elapsed: dict[str, float] = {}  # and when: a replay slowing down as it goes shows here
    marks = [0.25, 0.5, 0.75, 1.0]

    def progress(p: Progress) -> None:
        while marks and p.total and p.replayed >= marks[0] * p.total:
            mark = f"{marks.pop(0):.2f}"
            samples[mark], elapsed[mark] = memory_mb()[1], p.elapsed_seconds

    t0, c0 = time.perf_counter(), time.process_time()
    report = await run_backtest(store, baseline, candidate, channels, policy, Options(window), progress)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    await client.close()
    peak, now = memory_mb()
    # VmHWM lags the RSS counters by up to a few hundred kB (they are cached per thread): the peak is
    # the larger of it and the samples.
    peak = max([peak, *samples.values()])
    return {"events": report.events, "contacts": report.contacts, "seconds": seconds, "cpu_seconds": cpu,
            "report_seconds": report.seconds, "skipped": report.skipped, "summary": summary_of(report),
            "peak_rss_mb": peak, "rss_mb": now, "rss_mb_at_replayed": samples,
            "seconds_at_replayed": elapsed}  # fmt: skip


def summary_of(report: Any) -> Doc:
    """What the candidate changed, in a few numbers: proof the replay decided something."""
    import msgspec

    rows = msgspec.to_builtins(report.rows)
    changes = report.changes
    return {
        "rows": len(rows),
        "sent": {side: sum(r[side]["sent"] for r in rows) for side in ("baseline", "candidate")},
        "decided": {side: sum(r[side]["decided"] for r in rows) for side in ("baseline", "candidate")},
        "contacts_changed": changes.changed,
        "gained_messages": changes.gained_messages,
        "lost_messages": changes.lost_messages,
    }


def run_child(kind: str, args: argparse.Namespace, extra: list[str]) -> Doc:
    """Runs a child to its end; it reports its own peak memory (VmHWM). Not `ru_maxrss` from here:
    Linux keeps the high-water mark of the memory a child had before its exec, which is this process's
    (a child that peaks at 85 MB reads 109 MB that way in the small run)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--config", args.config,
               "--candidate", args.candidate, *extra]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"the {kind} child failed ({run.returncode}):\n{run.stderr[-4000:]}")
    result: Doc = json.loads(run.stdout.strip().splitlines()[-1])
    return result


def write_config(into: Path) -> Path:
    """The service's defaults (quiet hours, frequency caps) with every message channel configured, as a
    shop runs it: a backtest asks each channel about each contact, and an unconfigured one would only
    suppress. Nothing is ever sent (no address here exists)."""
    import base64

    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1()).private_numbers().private_value.to_bytes(32, "big")
    account = {"project_id": "bench", "client_email": "bench@bench.iam.example", "private_key": "unused",
               "token_uri": "https://oauth2.example/token"}  # fmt: skip
    path = into / "rulesvc.toml"
    path.write_text(
        '[channels.email]\nhost = "smtp.shop.example"\nfrom = "shop@shop.example"\n'
        '[channels.sms]\naccount_sid = "AC00000000000000000000000000000000"\nauth_token = "bench"\n'
        'from = "+4915100000000"\n'
        f"[channels.push]\nservice_account_json = {json.dumps(json.dumps(account))}\n"
        f'[channels.webpush]\nvapid_private_key = "{base64.urlsafe_b64encode(key).decode().rstrip("=")}"\n'
        'subject = "mailto:ops@shop.example"\n'
    )
    return path


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


async def bench(args: argparse.Namespace) -> Doc:
    from rulesvc.store.mongod import EmbeddedMongod

    # The window ends at midnight UTC: the same history falls on the same clock times (quiet hours, local
    # days) in every run, so runs on different days decide the same messages.
    end = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    start = end - timedelta(days=args.days)
    history = History(args.events, args.contacts, start, end, args.seed)
    quarter_end = start + (end - start) / 4
    results: Doc = {
        "machine": {
            "python": platform.python_version(),
            "cpu": cpu_model(),
            "cpus": os.cpu_count(),
        },
        "sizes": {"events": args.events, "contacts": args.contacts, "days": args.days, "seed": args.seed},
        "window": {
            "start": start.isoformat(),
            "end": end.isoformat(),
            "quarter_end": quarter_end.isoformat(),
        },
        "candidate": f"{CANDIDATE_RULESET}/{CANDIDATE_RULE}: push after {CANDIDATE_DELAY} instead of 20m",
    }
    with tempfile.TemporaryDirectory() as tmp, EmbeddedMongod(tmp, cache_gb=args.cache_gb) as mongod:
        args.config = str(write_config(Path(tmp)))
        args.candidate = str(candidate_folder(Path(tmp)))
        database = "backtest_bench"
        results["generate"] = await store_history(history, mongod.uri, database)
        stored = results["generate"]["stored"]
        from rulesvc.config import load_settings
        from rulesvc.web.lifecycle import load_channels

        names = load_channels(load_settings(args.config, environ={}))[0].names()
        results["engine_alone"] = engine_alone(history, names)
        results["compile_only"] = run_child("compile", args, [])
        where = ["--uri", mongod.uri, "--database", database, "--start", start.isoformat()]
        results["backtest_quarter"] = run_child("backtest", args, [*where, "--end", quarter_end.isoformat()])
        profile = ["--profile", args.profile] if args.profile else []
        results["backtest"] = run_child("backtest", args, [*where, "--end", end.isoformat(), *profile])
    for key in ("backtest", "backtest_quarter"):
        b = results[key]
        # Every event goes through both versions: 2 x events evaluations in `seconds`.
        b["events_per_s_per_version"] = rate(2 * b["events"], b["seconds"])
        b["events_per_s_both_versions"] = rate(b["events"], b["seconds"])
        b["events_per_cpu_s_per_version"] = rate(2 * b["events"], b["cpu_seconds"])
    engine_rate = results["engine_alone"]["events_per_s"]
    results["ratios"] = {
        "backtest_per_version / engine_alone": results["backtest"]["events_per_s_per_version"] / engine_rate,
        # The same on CPU time (the replay's own process; the engine's loop): less moved by other
        # processes on a shared machine, and without the replay's waits for MongoDB.
        "backtest_per_version / engine_alone, CPU time": results["backtest"]["events_per_cpu_s_per_version"]
        / results["engine_alone"]["events_per_cpu_s"],
        "peak_rss backtest / quarter window": results["backtest"]["peak_rss_mb"]
        / results["backtest_quarter"]["peak_rss_mb"],
    }
    results["targets"] = {
        "backtest_per_version / engine_alone": ">= 0.5",
        "backtest peak RSS (MB)": "<= 500",
    }
    results["all_events_replayed"] = results["backtest"]["events"] == stored["replayable_events"]
    return results


def summary(r: Doc) -> str:
    g, e, b, q = r["generate"], r["engine_alone"], r["backtest"], r["backtest_quarter"]
    s = g["stored"]
    ratio = r["ratios"]["backtest_per_version / engine_alone"]
    cpu_ratio = r["ratios"]["backtest_per_version / engine_alone, CPU time"]
    sent = b["summary"]["sent"]
    during = ", ".join(f"{k}: {v:.0f}" for k, v in b["rss_mb_at_replayed"].items())
    rows = [
        ("history", f"{s['contact_events']:,} contact events + {s['catalog_events']:,} catalog events "
                    f"(and {s['catalog_copies']:,} fan-out copies), {s['contacts']:,} contacts, "
                    f"{r['sizes']['days']} days"),
        ("stored in", f"{g['insert_seconds']:.1f} s ({g['docs_per_s']:,.0f} docs/s), "
                      f"indexes {g['index_seconds']:.1f} s"),
        ("engine alone (events/s, one version)",
         f"{e['events_per_s']:,.0f}  ({e['events']:,} in {e['seconds']:.1f} s)"),
        ("backtest (events/s, both versions)",
         f"{b['events_per_s_both_versions']:,.0f}  ({b['events']:,} events of {b['contacts']:,} contacts "
         f"in {b['seconds']:.1f} s)"),
        ("backtest per version (2 x events / s)", f"{b['events_per_s_per_version']:,.0f}"),
        ("ratio: per version / engine alone", f"{ratio:.2f}  (target >= 0.5)"),
        ("the same on CPU time", f"{cpu_ratio:.2f}  (engine {e['events_per_cpu_s']:,.0f}/CPU s, backtest "
                                 f"{b['events_per_cpu_s_per_version']:,.0f}/CPU s per version)"),
        ("peak RSS: imports + both versions compiled", f"{r['compile_only']['peak_rss_mb']:.0f} MB"),
        ("peak RSS: backtest, first quarter", f"{q['peak_rss_mb']:.0f} MB  ({q['events']:,} events, "
                                             f"{q['events_per_s_per_version']:,.0f}/s per version)"),
        ("peak RSS: backtest, whole window", f"{b['peak_rss_mb']:.0f} MB  (target <= 500)"),
        ("RSS (MB) at replayed share", during),
        ("seconds at replayed share",
         ", ".join(f"{k}: {v:.1f}" for k, v in b["seconds_at_replayed"].items())),
        ("sent, baseline -> candidate", f"{sent['baseline']:,} -> {sent['candidate']:,} "
                                        f"({b['summary']['contacts_changed']:,} contacts changed)"),
        ("every stored event of the window replayed", "yes" if r["all_events_replayed"] else "NO"),
    ]  # fmt: skip
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=1_000_000, help="contact events stored (default 1M)")
    parser.add_argument("--contacts", type=int, default=100_000)
    parser.add_argument("--days", type=int, default=14, help="the window, ending at the last midnight UTC")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--cache-gb", type=float, default=2.0, help="the embedded mongod's WiredTiger cache")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "backtest.json"))
    parser.add_argument("--profile", metavar="FILE", help="cProfile the whole-window backtest into FILE")
    # The child processes' own arguments (the parent passes them).
    parser.add_argument("--child", choices=["compile", "backtest"], help=argparse.SUPPRESS)
    for name in ("--config", "--candidate", "--uri", "--database", "--start", "--end"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "compile":
        print(json.dumps(child_compile(args)))
        return
    if args.child == "backtest":
        if args.profile:  # the replay's own costs: `python -m pstats FILE`, then `sort cumtime`, `stats 30`
            import cProfile

            with cProfile.Profile() as profile:
                result = asyncio.run(child_backtest(args))
            profile.dump_stats(args.profile)
        else:
            result = asyncio.run(child_backtest(args))
        print(json.dumps(result))
        return
    results = asyncio.run(bench(args))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(summary(results))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
