"""Backtest: weeks of stored events replayed through two ruleset versions, side by side, before a change
goes live. Nothing is sent and nothing is written.

Each contact's events of the window are read in time order (one contact in memory at a time, so memory
does not grow with the window) and simulated twice, through the baseline (by default the live rulesets)
and the candidate, by the same `Simulation` as `POST /v1/simulate`: the same engine and the same send
rules (`core.sendpolicy`: consent, reachability, fallback, guards, quiet hours, caps). A catalog event
reaches the contacts whose own events in the window showed interest, as the live fan-out copies it.

What a replay cannot know, it assumes, and the report says so (`notes`):
- profiles are today's (addresses, consent, time zone, attributes);
- each contact's state (`once`, counters, flags, waits) starts empty at the window's start; product
  interest (views, wishlists, subscriptions) counts from up to 90 days before it, as the live fan-out's;
- bounces and blocks are those of the window's outcome events; providers never fail.

The baseline's replay is also held against the messages the service recorded in the window: a difference
is a finding to show (a ruleset edited meanwhile, a profile changed since, state from before the window).
"""

from __future__ import annotations

import bisect
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import msgspec

from rulesvc.core.assign import message_group
from rulesvc.core.catalog import catalog_change, interest_fields
from rulesvc.core.durations import parse_duration
from rulesvc.core.engine import CompiledRuleset, Engine, RuleIndex
from rulesvc.core.events import Event
from rulesvc.core.sendpolicy import ChannelFacts, SendPolicy, ask
from rulesvc.replay.simulate import SendRules, SimAction, SimContact, Simulation, sim_profile
from rulesvc.store.backtests import BacktestReads

if TYPE_CHECKING:
    from rulesvc.channels import ChannelRegistry
    from rulesvc.store.db import Doc, Store

DEFAULT_SINCE = "14d"
BATCH_CONTACTS = 500  # contacts whose profiles and recorded messages are read in one query each
PROGRESS_EVERY = 0.5  # seconds between progress reports
# How far before the window a product view or wishlist entry still counts as interest (a view counts for
# 30 days, a wishlist entry for good: as far back as events are kept by default).
INTEREST_LOOKBACK = timedelta(days=90)

NOTES = [
    "Profiles are today's: addresses, consent, time zone and attributes as stored now.",
    "Each contact's state (once, counters, flags, waits) starts empty at the window's start; product "
    "interest counts from up to 90 days before it, and each product's price and stock are those its "
    "last catalog events before the window set, as far as events are kept.",
    "An event is judged by its own time: one that arrived late (sent hours after it happened) can start "
    "a flow here that the live service ignored as stale.",
    "Provider reports (delivered, opened, clicked, bounced, blocked) are those of the window: one about "
    "a message the candidate does not send is skipped in its replay, and the candidate's new messages "
    "get none. Providers never fail in a replay.",
    "Events the service set aside (quarantined) or an operator dropped are not replayed.",
    "A message still due at the window's end counts as scheduled.",
]
EXAMPLE_ITEMS = 50  # events and messages shown per example contact (the latest, around the change)


# --- what a backtest is asked -----------------------------------------------------------------------------


class Window(msgspec.Struct, frozen=True):
    start: datetime  # inclusive
    end: datetime  # exclusive


def window_of(since: str | None, start: datetime | None, until: datetime | None, now: datetime) -> Window:
    """`since` (a duration back from `until` or now) or `start`; raises ValueError with a sentence."""
    if since is not None and start is not None:
        raise ValueError("give either a duration (since) or a start time (from), not both")
    end = (until or now).astimezone(UTC)
    if start is None:
        try:
            length = parse_duration(since or DEFAULT_SINCE)
        except ValueError as exc:
            raise ValueError(f"since: {exc}") from exc
        begin = end - length
    else:
        begin = start.astimezone(UTC)
    if begin >= end:
        raise ValueError("the window is empty: its start is not before its end")
    return Window(begin, end)


@dataclass
class Version:
    """One set of rulesets to replay: the live ones, or a candidate folder."""

    label: str
    rulesets: list[CompiledRuleset]


class Options(msgspec.Struct, frozen=True):
    window: Window
    contacts: list[str] | None = None  # only these (None: every contact with events in the window)
    examples: int = 5  # contacts shown each way, and recorded mismatches


class Progress(msgspec.Struct):
    replayed: int  # events replayed so far (each through both versions)
    total: int  # events in the window
    contacts: int  # contacts done
    elapsed_seconds: float
    eta_seconds: float | None  # None until there is a rate


# --- what it answers --------------------------------------------------------------------------------------


class Side(msgspec.Struct):
    label: str
    rulesets: dict[str, str]  # name -> version


class Tally(msgspec.Struct):
    """The messages of one rule and channel in one version, each counted once by what became of it;
    `postponed` counts those held back by quiet hours at least once, whatever came after."""

    decided: int = 0
    sent: int = 0
    suppressed: dict[str, int] = msgspec.field(default_factory=dict)  # by reason code
    cancelled: int = 0
    failed: int = 0
    scheduled: int = 0
    postponed: int = 0
    held_out: int = 0  # decided as sent to a contact of the ruleset's holdout group: not sent

    def add(self, message: ReplayedMessage) -> None:
        self.decided += 1
        if message.status == "suppressed":
            reason = message.reason or "unknown"
            self.suppressed[reason] = self.suppressed.get(reason, 0) + 1
        elif message.status in ("sent", "cancelled", "failed", "scheduled", "held_out"):
            setattr(self, message.status, getattr(self, message.status) + 1)
        self.postponed += bool(message.postponed)


class Row(msgspec.Struct):
    ruleset: str
    rule: str
    # For a sent message the channel used (a fallback); for one suppressed after a channel was chosen (a
    # cap, a guard, quiet hours) that channel; else the rule's own.
    channel: str | None
    baseline: Tally
    candidate: Tally
    sent_change: int  # candidate sent minus baseline sent
    variant: str | None = None  # the A/B arm, `holdout`, or None (no test in the ruleset)


class ReplayedMessage(msgspec.Struct, omit_defaults=True):
    message_id: str
    at: datetime  # when it was sent, suppressed or cancelled; for `scheduled`, when it is due
    ruleset: str
    rule: str
    channel: str | None
    template: str | None
    status: str  # sent, suppressed, cancelled, failed, scheduled, held_out
    reason: str | None = None
    detail: str | None = None
    postponed: int = 0  # times quiet hours held it back
    variant: str | None = None  # the contact's A/B arm, or `holdout`

    def outcome(self) -> tuple[Any, ...]:
        return (self.status, self.reason, self.channel, self.at)


class TimelineEvent(msgspec.Struct):
    at: datetime
    event_id: str
    type: str


class ContactExample(msgspec.Struct):
    """One contact whose messages change: the events, and what each version decided from them."""

    contact_id: str
    gained: list[ReplayedMessage]  # sent by the candidate, not by the baseline
    lost: list[ReplayedMessage]  # sent by the baseline, not by the candidate
    events: list[TimelineEvent]
    baseline: list[ReplayedMessage]
    candidate: list[ReplayedMessage]
    # Events and messages left out: each list keeps at most 50, around the first change (a contact with
    # thousands of events would make the report too large to store).
    omitted: int = 0


class ContactChanges(msgspec.Struct):
    changed: int = 0  # contacts with any difference (a message gained, lost, retimed, or another fate)
    gaining: int = 0  # contacts that get a message from the candidate that the baseline does not send
    losing: int = 0
    both: int = 0  # of the above, contacts that gain one message and lose another
    # contacts with the same messages sent: one sent at another time or on another channel, or one not
    # sent stopped another way (e.g. cancelled instead of suppressed)
    same_sent: int = 0
    gained_messages: int = 0
    lost_messages: int = 0
    gained_examples: list[ContactExample] = msgspec.field(default_factory=list)
    lost_examples: list[ContactExample] = msgspec.field(default_factory=list)


class Mismatch(msgspec.Struct, omit_defaults=True):
    message_id: str
    contact_id: str
    ruleset: str
    rule: str
    recorded: str | None = None  # e.g. "sent on email", "suppressed: no_consent"; None: not recorded
    replayed: str | None = None  # None: the replay decided no such message


class RecordedComparison(msgspec.Struct):
    """The baseline's replay against the messages the service recorded in the window, by message id."""

    recorded: int = 0
    replayed: int = 0
    same: int = 0
    different: int = 0  # the same message, another fate
    only_recorded: int = 0
    only_replayed: int = 0
    examples: list[Mismatch] = msgspec.field(default_factory=list)


class Skipped(msgspec.Struct):
    """An event (or a wait's `else` it armed) the engine could not evaluate in one version: skipped,
    as the live inbox would set it aside."""

    event_id: str
    contact_id: str
    version: str  # baseline or candidate
    error: str


class Report(msgspec.Struct):
    window: Window
    baseline: Side
    candidate: Side
    events: int
    contacts: int
    rows: list[Row]
    changes: ContactChanges
    recorded: RecordedComparison
    skipped: int  # events skipped in either version
    skipped_examples: list[Skipped]
    notes: list[str]
    seconds: float
    # Stored profiles that no longer decode (written by hand, or by an older version): replayed as
    # contacts without a profile, so their marketing sends show up as `no_consent`.
    unreadable_profiles: int = 0


# --- one contact through one version -----------------------------------------------------------------------


def replayed_messages(actions: Iterable[SimAction], pending: Iterable[Any]) -> dict[str, ReplayedMessage]:
    """What became of each message, from a simulation's actions in order; `pending`: schedule entries
    still due at the end (when: the end of the quiet hours that postponed one, else its due time)."""
    found: dict[str, ReplayedMessage] = {}
    postponed: Counter[str] = Counter()
    postponed_to: dict[str, datetime] = {}
    for a in actions:
        if a.message_id is None or a.status == "fired" or a.template is None:
            continue  # a wait's entry: not a message
        if a.status == "postponed":
            postponed[a.message_id] += 1
            if a.postponed_to is not None:
                postponed_to[a.message_id] = a.postponed_to
            continue
        found[a.message_id] = ReplayedMessage(a.message_id, a.at, a.ruleset, a.rule, a.channel, a.template,
                                              a.status, a.reason, a.detail, variant=a.variant)  # fmt: skip
    for entry in pending:
        if entry.message is not None:
            message, due = entry.message, postponed_to.get(entry.entry_id, entry.due_at)
            found[entry.entry_id] = ReplayedMessage(
                entry.entry_id, due, entry.ruleset, entry.rule, message.get("channel"),
                message.get("template"), "scheduled", variant=message_group(message),
            )  # fmt: skip
    for message_id, times in postponed.items():
        if message_id in found:
            found[message_id].postponed = times
    return found


class _Reach:
    """What each channel says about each contact, asked once per contact (and once for contacts not
    stored) and shared between both versions."""

    def __init__(self, channels: ChannelRegistry, policy: SendPolicy) -> None:
        self.channels = channels
        self.rules = SendRules(policy, [], {})
        self._index: dict[tuple[tuple[str, ChannelFacts], ...], int] = {}
        self.rules.reach[""] = self._both(sim_profile(None))

    def _answer(self, profile: dict[str, Any]) -> int:
        facts = {c.name: ask(c, profile) for c in self.channels.all()}
        key = tuple(sorted(facts.items()))
        if key not in self._index:
            self._index[key] = len(self.rules.answers)
            self.rules.answers.append(facts)
        return self._index[key]

    def _both(self, profile: dict[str, Any]) -> tuple[int, int]:
        return self._answer(profile), self._answer({**profile, "email_invalid": True})

    def enter(self, contact: SimContact | None) -> None:
        if contact is not None:
            self.rules.reach[contact.contact_id] = self._both(sim_profile(contact))

    def leave(self, contact_id: str) -> None:
        self.rules.reach.pop(contact_id, None)


def _sim_contact(contact_id: str, profile: Doc | None) -> SimContact | None:
    """A stored profile as the simulator takes it; one that no longer decodes counts as no profile."""
    if profile is None:
        return None
    try:
        fields = {k: v for k, v in profile.items() if v is not None}
        return msgspec.convert({**fields, "contact_id": contact_id}, SimContact)
    except msgspec.ValidationError:
        return None


def _event(doc: Doc) -> Event:
    return Event(id=str(doc["_id"]), type=doc["type"], contact_id=doc.get("contact_id"),
                 time=doc["time"].astimezone(UTC), attributes=doc.get("attributes") or {})  # fmt: skip


# --- the report, built as contacts are replayed -------------------------------------------------------------


def _recorded_outcome(doc: Doc) -> str:
    status = doc.get("status")
    if status == "scheduled":
        return "scheduled"
    if status == "suppressed":
        return f"suppressed: {doc.get('reason') or 'unknown'}"
    if status == "cancelled":
        return "cancelled"
    if status == "held_out":
        return f"held out on {doc.get('sent_channel') or doc.get('channel')}"
    # Sending, sent or with an outcome since, failed or dead: the rules decided to send it.
    return f"sent on {doc.get('sent_channel') or doc.get('channel')}"


def _replayed_outcome(message: ReplayedMessage) -> str:
    if message.status == "suppressed":
        return f"suppressed: {message.reason or 'unknown'}"
    if message.status in ("sent", "failed"):
        return f"sent on {message.channel}"
    if message.status == "held_out":
        return f"held out on {message.channel}"
    return message.status


class _Builder:
    def __init__(self, examples: int, window: Window) -> None:
        self.examples = examples
        self.window = window
        self.unreadable_profiles = 0
        self.tallies: dict[tuple[str, str, str | None, str | None], tuple[Tally, Tally]] = {}
        self.changes = ContactChanges()
        self.recorded = RecordedComparison()
        self.skipped: list[Skipped] = []
        self.skipped_count = 0
        self.contacts = 0

    def skip(self, contact_id: str, event_id: str, side: str, error: str) -> None:
        self.skipped_count += 1
        if len(self.skipped) < max(self.examples, 1):
            self.skipped.append(Skipped(event_id, contact_id, side, error))

    def contact(
        self,
        contact_id: str,
        events: list[Event],
        baseline: dict[str, ReplayedMessage],
        candidate: dict[str, ReplayedMessage],
        recorded: list[Doc],
    ) -> None:
        self.contacts += 1
        for side, messages in ((0, baseline), (1, candidate)):
            for m in messages.values():
                key = (m.ruleset, m.rule, m.channel, m.variant)
                if key not in self.tallies:
                    self.tallies[key] = (Tally(), Tally())
                self.tallies[key][side].add(m)
        self._compare(contact_id, events, baseline, candidate)
        self._against_recorded(contact_id, baseline, recorded)

    def _compare(
        self,
        contact_id: str,
        events: list[Event],
        baseline: dict[str, ReplayedMessage],
        candidate: dict[str, ReplayedMessage],
    ) -> None:
        def sent(
            messages: dict[str, ReplayedMessage], other: dict[str, ReplayedMessage]
        ) -> list[ReplayedMessage]:
            return [m for i, m in messages.items() if m.status == "sent" and
                    (i not in other or other[i].status != "sent")]  # fmt: skip

        gained, lost = sent(candidate, baseline), sent(baseline, candidate)
        changed = baseline.keys() != candidate.keys() or any(
            m.outcome() != candidate[i].outcome() for i, m in baseline.items()
        )
        if not changed:
            return
        c = self.changes
        c.changed += 1
        c.gaining += bool(gained)
        c.losing += bool(lost)
        c.both += bool(gained and lost)
        c.same_sent += not (gained or lost)
        c.gained_messages += len(gained)
        c.lost_messages += len(lost)
        for found, examples in ((gained, c.gained_examples), (lost, c.lost_examples)):
            if found and len(examples) < self.examples:
                examples.append(_example(contact_id, gained, lost, events, baseline, candidate))

    def _against_recorded(
        self, contact_id: str, baseline: dict[str, ReplayedMessage], recorded: list[Doc]
    ) -> None:
        r = self.recorded
        r.recorded += len(recorded)
        r.replayed += len(baseline)
        seen: set[str] = set()
        for doc in recorded:
            message_id = str(doc["_id"])
            seen.add(message_id)
            replay = baseline.get(message_id)
            was = _recorded_outcome(doc)
            now = _replayed_outcome(replay) if replay is not None else None
            if now == "scheduled" and self._due_after_window(doc):
                was = now  # due after the window: what became of it since is not the window's
            if now == was:
                r.same += 1
                continue
            if replay is None:
                r.only_recorded += 1
            else:
                r.different += 1
            self._mismatch(
                Mismatch(message_id, contact_id, str(doc.get("ruleset")), str(doc.get("rule")), was, now)
            )
        for message_id, m in baseline.items():
            if message_id not in seen:
                r.only_replayed += 1
                self._mismatch(
                    Mismatch(message_id, contact_id, m.ruleset, m.rule, None, _replayed_outcome(m))
                )

    def _due_after_window(self, doc: Doc) -> bool:
        due = doc.get("due_at")
        return doc.get("status") == "scheduled" or (isinstance(due, datetime) and due >= self.window.end)

    def _mismatch(self, mismatch: Mismatch) -> None:
        if len(self.recorded.examples) < self.examples:
            self.recorded.examples.append(mismatch)

    def rows(self) -> list[Row]:
        return [
            Row(ruleset, rule, channel, base, cand, cand.sent - base.sent, variant)
            for (ruleset, rule, channel, variant), (base, cand) in sorted(
                self.tallies.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] or "", kv[0][3] or "")
            )
        ]


def _around(items: list[Any], moments: list[datetime], pivot: datetime) -> tuple[list[Any], int]:
    """At most EXAMPLE_ITEMS of `items` (in time order): mostly those before `pivot`, some after."""
    if len(items) <= EXAMPLE_ITEMS:
        return items, 0
    at = bisect.bisect_left(moments, pivot)
    start = max(0, min(at - EXAMPLE_ITEMS * 4 // 5, len(items) - EXAMPLE_ITEMS))
    return items[start : start + EXAMPLE_ITEMS], len(items) - EXAMPLE_ITEMS


def _example(
    contact_id: str,
    gained: list[ReplayedMessage],
    lost: list[ReplayedMessage],
    events: list[Event],
    baseline: dict[str, ReplayedMessage],
    candidate: dict[str, ReplayedMessage],
) -> ContactExample:
    pivot = min(m.at for m in (*gained, *lost))
    moments = [e.time or pivot for e in events]
    kept_events, omitted = _around(events, moments, pivot)
    timeline = [TimelineEvent(e.time or pivot, e.id, e.type) for e in kept_events]
    sides: list[list[ReplayedMessage]] = []
    for messages in (_in_order(baseline), _in_order(candidate)):
        kept, left = _around(messages, [m.at for m in messages], pivot)
        sides.append(kept)
        omitted += left
    return ContactExample(contact_id, gained[:EXAMPLE_ITEMS], lost[:EXAMPLE_ITEMS], timeline, sides[0],
                          sides[1], omitted)  # fmt: skip


def _in_order(messages: dict[str, ReplayedMessage]) -> list[ReplayedMessage]:
    return sorted(messages.values(), key=lambda m: (m.at, m.message_id))


# --- the run ----------------------------------------------------------------------------------------------


def _engine(version: Version) -> Engine:
    return Engine(RuleIndex(version.rulesets))


def _side(version: Version) -> Side:
    return Side(version.label, {r.name: r.version for r in sorted(version.rulesets, key=lambda r: r.name)})


class _Replay:
    """Both versions over one contact at a time."""

    def __init__(self, baseline: Engine, candidate: Engine, reach: _Reach, catalog: list[Doc], window: Window,
                 builder: _Builder) -> None:  # fmt: skip
        self.engines = (baseline, candidate)
        self.products_before: dict[str, Doc] = {}  # the catalog as the window found it (`seed_catalog`)
        self.reach = reach
        self.window = window
        self.builder = builder
        # A catalog event is replayed for a contact whose events touched its product.
        self.catalog: dict[str, list[Event]] = {}
        for doc in catalog:
            product = (doc.get("attributes") or {}).get("product_id")
            if product is not None:
                self.catalog.setdefault(str(product), []).append(_event(doc))
        self.catalog_events = len(catalog)

    def seed_catalog(self, last_changes: list[Doc]) -> None:
        """Each product's price and stock before the window, from its last catalog events there, so that
        the first change in the window is measured against them as the live catalog measured it."""
        for doc in last_changes:
            attributes = doc.get("attributes") or {}
            if attributes.get("product_id") is None:
                continue
            product = self.products_before.setdefault(str(attributes["product_id"]), {})
            fields, _ = catalog_change(doc["type"], attributes, product)
            product.update(fields)

    def contact(
        self,
        contact_id: str,
        docs: list[Doc],
        profile: Doc | None,
        recorded: list[Doc],
        prior: dict[str, Doc] | None = None,
    ) -> None:
        """`prior`: the contact's interest per product from before the window."""
        docs.sort(key=lambda d: (d["time"], str(d["_id"])))
        events = [_event(d) for d in docs]
        prior = prior or {}
        products = {str(d["attributes"]["product_id"]) for d in docs if interest_fields(d)} | prior.keys()
        extra = [e for p in sorted(products) for e in self.catalog.get(p, ())]
        if not events and not extra:
            return  # in the interest index, but for products whose price and stock stayed put
        contact = _sim_contact(contact_id, profile)
        if profile is not None and contact is None:
            self.builder.unreadable_profiles += 1
        self.reach.enter(contact)
        # The window's end is not part of it: a message due exactly then is still due.
        until = self.window.end - timedelta(microseconds=1)
        try:
            found: list[dict[str, ReplayedMessage]] = []
            for side, engine in zip(("baseline", "candidate"), self.engines, strict=True):

                def skip(event_id: str, error: str, side: str = side) -> None:
                    self.builder.skip(contact_id, event_id, side, error)

                # The candidate hears of no outcome of a message of the baseline that it did not send.
                known = set(found[0]) if found else None
                sim = Simulation(engine, [contact] if contact else [], self.reach.rules, on_error=skip,
                                 known_messages=known)  # fmt: skip
                for product, fields in prior.items():
                    sim.interests[product] = {contact_id: dict(fields)}
                for product in products:
                    if product in self.products_before:
                        sim.products[product] = dict(self.products_before[product])
                actions = sim.run([*events, *extra], until)
                found.append(replayed_messages(actions, sim.entries.values()))
        finally:
            self.reach.leave(contact_id)
        self.builder.contact(contact_id, events, found[0], found[1], recorded)


async def run_backtest(
    store: Store,
    baseline: Version,
    candidate: Version,
    channels: ChannelRegistry,
    policy: SendPolicy,
    options: Options,
    progress: Callable[[Progress], None] | None = None,
) -> Report:
    """Replay the window through both versions. Never writes. CPU-bound between its reads: the service
    runs it in a process of its own."""
    started = time.monotonic()
    window = options.window
    reads = BacktestReads(store)
    total = await reads.count_events(window.start, window.end, options.contacts)
    catalog = await reads.catalog_events(window.start, window.end)
    builder = _Builder(options.examples, window)
    replay = _Replay(
        _engine(baseline), _engine(candidate), _Reach(channels, policy), catalog, window, builder
    )
    if replay.catalog:
        since = window.start - INTEREST_LOOKBACK
        replay.seed_catalog(await reads.catalog_before(sorted(replay.catalog), since, window.start))
    replayed = 0
    last_report = 0.0

    def report_progress(force: bool = False) -> None:
        nonlocal last_report
        elapsed = time.monotonic() - started
        if progress is None or (not force and elapsed - last_report < PROGRESS_EVERY):
            return
        last_report = elapsed
        rate = replayed / elapsed if elapsed > 0 and replayed else 0.0
        eta = max(total - replayed, 0) / rate if rate else None
        progress(Progress(replayed, total, builder.contacts, round(elapsed, 3), eta))

    async def flush(batch: dict[str, list[Doc]]) -> None:
        nonlocal replayed
        ids = list(batch)
        profiles = await reads.profiles(ids)
        recorded: dict[str, list[Doc]] = {}
        for doc in await reads.recorded_messages(ids, window.start, window.end):
            recorded.setdefault(doc["contact_id"], []).append(doc)
        prior: dict[str, dict[str, Doc]] = {}
        if replay.catalog:  # only a price or stock change in the window needs to know
            since = window.start - INTEREST_LOOKBACK
            for doc in await reads.prior_interest(ids, since, window.start):
                fields = interest_fields(doc)
                product = prior.setdefault(doc["contact_id"], {}).setdefault(
                    str(doc["attributes"]["product_id"]), {}
                )
                for name, at in fields.items():
                    product[name] = max(at, product.get(name, at))
        for contact_id, docs in batch.items():
            replay.contact(
                contact_id,
                docs,
                profiles.get(contact_id),
                recorded.get(contact_id, []),
                prior.get(contact_id),
            )
            replayed += len(docs)
            report_progress()

    report_progress(force=True)
    # Contacts interested in a product whose price or stock changed in the window, from their events
    # before it, are replayed even if they did nothing in the window: the live fan-out reached them.
    quiet = await reads.interested_contacts(sorted(replay.catalog)) if replay.catalog else set()
    if options.contacts is not None:
        quiet &= set(options.contacts)
    batch: dict[str, list[Doc]] = {}
    current: str | None = None
    async for doc in reads.contact_events(window.start, window.end, options.contacts):
        contact_id = doc["contact_id"]
        if contact_id != current and len(batch) >= BATCH_CONTACTS:
            await flush(batch)
            batch = {}
        current = contact_id
        quiet.discard(contact_id)
        batch.setdefault(contact_id, []).append(doc)
    for contact_id in sorted(quiet):
        if len(batch) >= BATCH_CONTACTS:
            await flush(batch)
            batch = {}
        batch[contact_id] = []
    if batch:
        await flush(batch)
    replayed += len(catalog)  # each one replayed for the contacts it reached
    report_progress(force=True)
    return Report(
        window=window,
        baseline=_side(baseline),
        candidate=_side(candidate),
        events=replayed,
        contacts=builder.contacts,
        rows=builder.rows(),
        changes=builder.changes,
        recorded=builder.recorded,
        skipped=builder.skipped_count,
        skipped_examples=builder.skipped,
        notes=NOTES,
        seconds=round(time.monotonic() - started, 3),
        unreadable_profiles=builder.unreadable_profiles,
    )


# --- for a person -----------------------------------------------------------------------------------------


def _when(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M")


def _outcomes(b: Tally, c: Tally) -> str:
    """Everything but `sent`, each as `name n`, or `name n->m` where the candidate differs."""
    parts = []
    for reason in sorted(b.suppressed.keys() | c.suppressed.keys()):
        parts.append((reason, b.suppressed.get(reason, 0), c.suppressed.get(reason, 0)))
    for name in ("held_out", "cancelled", "failed", "scheduled", "postponed"):
        parts.append((name, getattr(b, name), getattr(c, name)))
    return ", ".join(f"{name} {bv}" + (f"->{cv}" if cv != bv else "") for name, bv, cv in parts if bv or cv)


def _listed(items: list[str], most: int = 6) -> str:
    more = f" (+{len(items) - most} more)" if len(items) > most else ""
    return (", ".join(items[:most]) or "none") + more


def _fate(m: ReplayedMessage) -> str:
    why = f" ({m.reason})" if m.reason else ""
    return f"{_when(m.at)} {m.rule} {m.channel} {m.status}{why}"


def report_text(report: Report) -> str:
    """The table `rulesvc backtest` prints."""
    out: list[str] = []
    w = report.window
    out.append(f"Backtest {_when(w.start)} .. {_when(w.end)} UTC: {report.events} events, "
               f"{report.contacts} contacts, {report.seconds:.1f} s")  # fmt: skip
    out.append(f"  baseline:  {report.baseline.label}")
    out.append(f"  candidate: {report.candidate.label}")
    changed = sorted(
        name
        for name in report.baseline.rulesets.keys() | report.candidate.rulesets.keys()
        if report.baseline.rulesets.get(name) != report.candidate.rulesets.get(name)
    )
    out.append(f"  rulesets that differ: {', '.join(changed) or 'none'}")
    out.append("")
    header = ("", "", "sent by", "", "", "")
    header2 = ("ruleset/rule", "channel", "baseline", "candidate", "change",
               "not sent (suppressed by reason, cancelled, still due) and postponed")  # fmt: skip
    rows = [header, header2]
    for r in report.rows:
        b, c = r.baseline, r.candidate
        arm = f" [{r.variant}]" if r.variant else ""
        rows.append((f"{r.ruleset}/{r.rule}{arm}", r.channel or "-", str(b.sent), str(c.sent),
                     f"{r.sent_change:+d}", _outcomes(b, c)))  # fmt: skip
    total_b = sum(r.baseline.sent for r in report.rows)
    total_c = sum(r.candidate.sent for r in report.rows)
    rows.append(("total", "", str(total_b), str(total_c), f"{total_c - total_b:+d}", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for row in rows:
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
        cells += [row[i].rjust(widths[i]) for i in (2, 3, 4)]
        out.append("  ".join([*cells, row[5]]).rstrip())
    ch = report.changes
    out.append("")
    out.append(f"Contacts whose messages change (in time or fate): {ch.changed}; "
               f"{ch.gaining} get more ({ch.gained_messages} message(s) in all), "
               f"{ch.losing} get fewer ({ch.lost_messages} in all), {ch.same_sent} the same messages sent "
               "(one at another time or on another channel, or one not sent stopped otherwise)")  # fmt: skip
    for title, examples in (("gains", ch.gained_examples), ("loses", ch.lost_examples)):
        for ex in examples:
            which = ex.gained if title == "gains" else ex.lost
            names = ", ".join(f"{m.ruleset}/{m.rule} on {m.channel} at {_when(m.at)}" for m in which)
            out.append(f"  {ex.contact_id} {title}: {names}")
            out.append(f"    events:    {_listed([f'{_when(e.at)} {e.type}' for e in ex.events])}")
            for side, messages in (("baseline", ex.baseline), ("candidate", ex.candidate)):
                out.append(f"    {side + ':':<10} {_listed([_fate(m) for m in messages])}")
    rec = report.recorded
    out.append("")
    if rec.recorded == 0:
        out.append("The service recorded no message in this window: nothing to hold the baseline against.")
    else:
        out.append(f"The baseline's replay against the {rec.recorded} message(s) the service recorded for "
                   f"these contacts: "
                   f"{rec.same} the same, {rec.different} with another fate, {rec.only_recorded} only "
                   f"recorded, {rec.only_replayed} only replayed")  # fmt: skip
        for m in rec.examples:
            out.append(f"  {m.contact_id} {m.ruleset}/{m.rule}: recorded {m.recorded or 'nothing'}, "
                       f"replayed {m.replayed or 'nothing'}")  # fmt: skip
    if report.unreadable_profiles:
        out.append("")
        out.append(f"Stored profiles that no longer decode, replayed as contacts without a profile: "
                   f"{report.unreadable_profiles}")  # fmt: skip
    if report.skipped:
        out.append("")
        out.append(f"Events the engine could not evaluate (skipped): {report.skipped}")
        for s in report.skipped_examples:
            out.append(f"  {s.contact_id} {s.event_id} ({s.version}): {s.error}")
    out.append("")
    out.extend(f"Note: {n}" for n in report.notes)
    return "\n".join(out) + "\n"
