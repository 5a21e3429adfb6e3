"""Segment's HTTP Tracking API (also RudderStack's, the same wire format) as our events and profile changes.

Pure: the view (rulesvc/web/views/segment.py) reads the body and stores what `translate` returns; the
mapping file (rulesvc/sources/segment_mapping.json, or RULESVC_SEGMENT_MAPPING) says which of our event
types and attributes a `track`, `page` or `screen` becomes, and `parse_mapping` is its one validator (the
service at start-up and `rulesvc check` both call it).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import msgspec

from rulesvc.core import jsoncheck, jsontext
from rulesvc.core.bodies import TOO_DEEP, utf8_problem
from rulesvc.core.carts import CartChange, CartOp
from rulesvc.core.contacts import E164_PATTERN, EMAIL_MAX, EMAIL_PATTERN, IANA_ZONES, ContactPatch, FieldError
from rulesvc.core.events import (
    CATALOG_EVENT_TYPES,
    TIME_RANGE,
    Event,
    EventType,
    document_errors,
    event_problems,
    split_validation_error,
    time_in_range,
)
from rulesvc.core.identity import anonymous_contact_id
from rulesvc.core.ids import id_problem
from rulesvc.core.ruleformat import RulesetError, locate_errors, located, parsed

# Segment's documented limits: 32 KB per call (each message of a batch), 500 KB per batch request.
MAX_MESSAGE_BYTES = 32 * 1024
MAX_BATCH_BYTES = 500 * 1024

Kind = Literal["batch", "track", "identify", "page", "screen", "alias", "group"]
MESSAGE_TYPES = ("track", "identify", "page", "screen", "alias", "group")

# --- the mapping file -------------------------------------------------------------------------------

SOURCE_PATTERN = r"^(?:(?:properties|context|traits)(?:\.[^.\s]+)*|name|category|event)$"
ATTRIBUTE_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"
PROPERTY_PATTERN = r"^[^.\s$][^.\s]{0,127}$"
Source = Annotated[str, msgspec.Meta(pattern=SOURCE_PATTERN)]
AttributeName = Annotated[str, msgspec.Meta(pattern=ATTRIBUTE_PATTERN)]
PropertyName = Annotated[str, msgspec.Meta(pattern=PROPERTY_PATTERN)]
_SOURCE = re.compile(SOURCE_PATTERN)
SENTENCES = {
    SOURCE_PATTERN: "a place in the Segment message such as `properties.price`, `context.page.url`, `name` "
    "or `category`",
    ATTRIBUTE_PATTERN: "an attribute name of letters, digits and `_`, not starting with a digit (at most 64)",
    PROPERTY_PATTERN: "a property name such as `product_id` (no `.` or spaces)",
    r"^[A-Za-z][A-Za-z0-9_.:-]*$": "an event type such as `cart_updated`: letters, digits, `_`, `.`, `:` and "
    "`-`, starting with a letter",
}


class ItemsMapping(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """The products of a message as a list of items: from the first `from` that holds a list (each of its
    objects one item) or an object (one item: a single product's own properties)."""

    from_: Annotated[list[Source], msgspec.Meta(min_length=1)] = msgspec.field(name="from")
    # item field <- the product's property (the first present of a list)
    fields: dict[AttributeName, PropertyName | Annotated[list[PropertyName], msgspec.Meta(min_length=1)]]
    to: AttributeName = "items"


class EventMapping(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    type: EventType
    description: str = ""
    # attribute <- a place in the message (the first present of a list); set over the kept properties
    # (plain strings here, their form checked apart: msgspec 0.22 crashes at exit on a union of a
    # patterned string and a list of it as a dict value)
    attributes: dict[AttributeName, str | Annotated[list[str], msgspec.Meta(min_length=1)]] = msgspec.field(
        default_factory=dict
    )
    items: ItemsMapping | None = None
    # the attribute that gets the items' sum of price x quantity when the message gave it no value
    items_total: AttributeName | None = None
    keep_properties: bool = True  # every property also as an attribute of its own name
    # how the message changes the contact's cart kept by the service (rulesvc/core/carts.py); the event
    # then holds the whole cart: its items (`items.to`) and value (`items_total`)
    cart: Literal["add", "remove", "replace", "clear"] | None = None


class IdentifyMapping(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    event: EventType | None = "identified"  # the event each identify is also stored as; null: none
    traits: dict[PropertyName, AttributeName] = msgspec.field(default_factory=dict)  # trait -> attribute


class SegmentMapping(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """The mapping file's format (docs/segment.md)."""

    track: dict[Annotated[str, msgspec.Meta(min_length=1, max_length=200)], EventMapping]
    page: EventMapping
    screen: EventMapping
    identify: IdentifyMapping = msgspec.field(default_factory=IdentifyMapping)
    unmapped_track: Literal["custom", "ignore"] = "custom"
    description: str = ""

    def for_track(self, name: str) -> EventMapping | None:
        """By name as the file writes it, or in any letter case and spacing (`product_viewed`)."""
        found = self.track.get(name)
        if found is None:
            key = snake_case(name)
            found = next((m for n, m in self.track.items() if snake_case(n) == key), None)
        return found


class InvalidMapping(Exception):
    def __init__(self, errors: list[RulesetError]) -> None:
        super().__init__("; ".join(map(str, errors)))
        self.errors = errors


_MAPPING_DECODER = msgspec.json.Decoder(SegmentMapping)
_MAPPING_TYPE = msgspec.inspect.type_info(SegmentMapping)


def parse_mapping(file: str, data: bytes) -> SegmentMapping:
    """The mapping, or InvalidMapping with every problem as `file:line:column: path: message`."""
    try:
        mapping = _MAPPING_DECODER.decode(data)
    except (msgspec.MsgspecError, UnicodeDecodeError, RecursionError) as exc:
        raise InvalidMapping(_every_error(file, data, exc)) from exc
    problems = _semantic_problems(mapping)
    if problems:
        raise InvalidMapping(locate_errors(file, data, problems))
    return mapping


def _semantic_problems(mapping: SegmentMapping) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    seen: dict[str, str] = {}
    places = [(jsontext.key_path("$.track", name), m) for name, m in mapping.track.items()]
    for where, m in [*places, ("$.page", mapping.page), ("$.screen", mapping.screen)]:
        if m.type in CATALOG_EVENT_TYPES:
            problems.append((f"{where}.type", f"`{m.type}` is a catalog event (no contact); a Segment "
                             "message always has one"))  # fmt: skip
        for name, sources in m.attributes.items():
            for k, source in enumerate([sources] if isinstance(sources, str) else sources):
                if not _SOURCE.match(source):
                    at = f"{where}.attributes.{name}" + ("" if isinstance(sources, str) else f"[{k}]")
                    problems.append((at, f"expected {SENTENCES[SOURCE_PATTERN]}, got {source!r}"))
        if m.cart not in (None, "clear") and (m.items is None or m.items_total is None):
            problems.append((f"{where}.cart", f"`{m.cart}` needs `items` and `items_total`: the event "
                             "gets the whole cart's items and value"))  # fmt: skip
    for name in mapping.track:
        key = snake_case(name)
        if key in seen:
            problems.append((jsontext.key_path("$.track", name), f"the same event as `{seen[key]}` (names "
                             "match in any letter case and spacing)"))  # fmt: skip
        seen.setdefault(key, name)
    return problems


def _every_error(file: str, data: bytes, refused: Exception) -> list[RulesetError]:
    document = parsed(file, data)
    if isinstance(document, list):
        return document
    found = [(p.path, p.message, p.pos) for p in jsoncheck.check(document.root, _MAPPING_TYPE, SENTENCES)]
    return located(file, document, found, refused)


# --- the wire format ----------------------------------------------------------------------------------

Identifier = str | int  # Segment's ids are strings; some senders post numbers, read as their digits


class Message(msgspec.Struct):
    """One call as Segment documents it. Fields of no use here (`integrations`, an SDK's own) are allowed
    and dropped."""

    type: str | None = None
    messageId: str | None = None
    userId: Identifier | None = None
    anonymousId: Identifier | None = None
    previousId: Identifier | None = None
    groupId: Identifier | None = None
    event: str | None = None
    name: str | None = None
    category: str | None = None
    timestamp: datetime | None = None
    originalTimestamp: datetime | None = None  # RudderStack's SDKs send the device's time under this name
    sentAt: datetime | None = None
    receivedAt: datetime | None = None  # set by Segment (or RudderStack) when it forwards the message
    context: dict[str, Any] | None = None
    properties: dict[str, Any] | None = None
    traits: dict[str, Any] | None = None


class Batch(msgspec.Struct):
    """`POST /v1/batch`: the messages, and what applies to all of them (`context`, `sentAt`)."""

    batch: list[msgspec.Raw]
    context: dict[str, Any] | None = None
    sentAt: datetime | None = None


class SegmentAccepted(msgspec.Struct, omit_defaults=True):
    """Segment's answer (`success`), and what became of the messages: stored as events, already stored
    (a retry: same `messageId`), accepted but not stored (group calls, track events the mapping ignores)."""

    success: bool
    accepted: int
    duplicates: int
    ignored: int
    # Messages of a batch left out for a problem (each listed with its path in `errors`); the others
    # were taken. Absent when none was.
    rejected: int = 0
    errors: list[FieldError] = msgspec.field(default_factory=list)


class SegmentRejected(msgspec.Struct):
    """Segment's error fields (`code`, `message`: what its client libraries read) and ours (`error`, and
    every problem with its JSON path); nothing of the request was stored."""

    success: bool
    code: str
    message: str
    error: str
    errors: list[FieldError]


def rejected(
    message: str, errors: list[FieldError] | None = None, code: str = "invalid_request"
) -> SegmentRejected:
    return SegmentRejected(False, code, message, message, errors or [])


class TooLarge(Exception):
    """Over Segment's limits: 32 KB per message, 500 KB per batch (413)."""


class Malformed(Exception):
    """Not JSON at all (400)."""


class Refused(Exception):
    """Every problem of the request's messages, each with its path (400)."""

    def __init__(self, errors: list[FieldError]) -> None:
        super().__init__(f"{len(errors)} problem(s)")
        self.errors = errors


@dataclass
class Translated:
    """What a request asks for, in the order of its messages. `anonymous`: contact ids of events and
    profile changes that came with an `anonymousId` only (the view resolves them to a linked contact)."""

    events: list[Event] = field(default_factory=list)
    patches: list[tuple[str, ContactPatch, datetime]] = field(default_factory=list)  # with its time
    # (anonymous contact, known contact, the message's time): identify, alias, and any call with both ids
    links: list[tuple[str, str, datetime]] = field(default_factory=list)
    anonymous: set[str] = field(default_factory=set)
    ignored: int = 0
    places: list[str] = field(default_factory=list)  # the JSON path of each event's message
    carts: list[CartChange] = field(default_factory=list)  # what cart events do to the kept carts, in order
    # The problems of the messages left out of a batch whose other messages are taken, and how many.
    errors: list[FieldError] = field(default_factory=list)
    rejected: int = 0

    def mark(self) -> tuple[int, int, int, int, int, int]:
        return (
            len(self.events),
            len(self.patches),
            len(self.links),
            len(self.places),
            len(self.carts),
            self.ignored,
        )

    def undo(self, mark: tuple[int, int, int, int, int, int], anonymous: set[str]) -> None:
        """Forget what a message that turned out invalid had added: a message is taken whole or not."""
        events, patches, links, places, carts, self.ignored = mark
        del self.events[events:], self.patches[patches:], self.links[links:], self.places[places:]
        del self.carts[carts:]
        self.anonymous = anonymous


_MESSAGE_DECODER = msgspec.json.Decoder(Message)
_BATCH_DECODER = msgspec.json.Decoder(Batch)
_ANY_DECODER = msgspec.json.Decoder()


def _refusal(exc: msgspec.ValidationError, where: str) -> FieldError:
    path, message = split_validation_error(exc)
    return FieldError(where + path[1:], message)


def translate(body: bytes, kind: Kind, mapping: SegmentMapping, received_at: datetime) -> Translated:
    """The body of `POST /v1/<kind>` as events, profile changes and links; raises TooLarge, Malformed, or
    Refused with every problem when nothing of the request can be taken (a single call with a problem, a
    batch whose every message has one)."""
    errors: list[FieldError] = []
    out = Translated()
    # Checked here, not left to the decoder: browsers post these as text/plain (no UTF-8 check on the way
    # in), and msgspec 0.23 began reporting bad UTF-8 as its own DecodeError with no byte position.
    problem = utf8_problem(body)
    if problem is not None:
        raise Malformed(problem)
    if kind == "batch":
        if len(body) > MAX_BATCH_BYTES:
            raise TooLarge(f"batch of {len(body)} bytes; the limit is {MAX_BATCH_BYTES} (500 KB)")
        try:
            batch = _BATCH_DECODER.decode(body)
        except msgspec.ValidationError as exc:
            raise Refused([_refusal(exc, "$")]) from exc
        except msgspec.DecodeError as exc:
            raise Malformed(f"malformed JSON: {exc}") from exc
        except RecursionError as exc:  # bad UTF-8 was refused above, before any decoder
            raise Malformed(TOO_DEEP) from exc
        if not batch.batch:
            raise Refused([FieldError("$.batch", "no messages in the batch")])
        items = [(f"$.batch[{i}]", bytes(raw)) for i, raw in enumerate(batch.batch)]
        shared, sent_at = batch.context or {}, batch.sentAt
    else:
        items, shared, sent_at = [("$", body)], {}, None
    for where, raw in items:
        if len(raw) > MAX_MESSAGE_BYTES:
            raise TooLarge(f"{where}: message of {len(raw)} bytes; the limit is {MAX_MESSAGE_BYTES} (32 KB)")
        try:
            message = _MESSAGE_DECODER.decode(raw)
        except msgspec.ValidationError as exc:
            errors.append(_refusal(exc, where))
            out.rejected += 1
            continue
        except msgspec.DecodeError as exc:
            raise Malformed(f"malformed JSON: {exc}") from exc
        except RecursionError as exc:  # bad UTF-8 was refused above, before any decoder
            raise Malformed(TOO_DEEP) from exc
        call = kind if kind != "batch" else message.type
        if call not in MESSAGE_TYPES:
            said = f"`{call}`" if isinstance(call, str) else "missing"
            errors.append(FieldError(f"{where}.type", f"{said}; one of {', '.join(MESSAGE_TYPES)}"))
            out.rejected += 1
            continue
        if shared:
            message.context = {**shared, **(message.context or {})}
        mark, anonymous = out.mark(), set(out.anonymous)
        problems = _translate(message, call, raw, where, sent_at, mapping, received_at, out)
        if problems:
            out.undo(mark, anonymous)
            errors.extend(problems)
            out.rejected += 1
    # One call with a problem is refused (400, as a library expects); a batch keeps its valid messages,
    # as Segment does: one bad message may not cost the others (the answer lists what was left out).
    if errors and (kind != "batch" or out.rejected == len(items)):
        raise Refused(errors)
    out.errors = errors
    return out


def _text(value: Identifier | None) -> str:
    return str(value) if value is not None else ""


def contact_of(message: Message, where: str) -> tuple[str, bool] | FieldError:
    """(contact id, only anonymous): `userId` as it is, else `anon:<anonymousId>`."""
    user, anonymous = _text(message.userId), _text(message.anonymousId)
    if user:
        problem = user_id_problem(user)
        return FieldError(f"{where}.userId", problem) if problem else (user, False)
    if anonymous:
        contact = anonymous_contact_id(anonymous)
        problem = id_problem(contact, f"the contact id `{contact[:40]}`")
        return FieldError(f"{where}.anonymousId", problem) if problem else (contact, True)
    return FieldError(where, "userId or anonymousId is required")


def user_id_problem(user: str) -> str | None:
    """The id rule, and not an anonymous contact's id: a `userId` names a known person."""
    if user.startswith(anonymous_contact_id("")):
        return f"userId may not begin with `{anonymous_contact_id('')}`, the prefix of anonymous contacts"
    return id_problem(user, "userId")


def event_time(message: Message, sent_at: datetime | None, received_at: datetime) -> datetime:
    """The device's time corrected for its clock as Segment does: `timestamp - sentAt + receivedAt`
    (both device times, so the device clock's error cancels out); without `sentAt`, `timestamp`; without
    either, when it was received. A message with `receivedAt` was forwarded by Segment or RudderStack
    (a webhook destination), whose `timestamp` is already corrected: taken as it is. Raises OverflowError
    for times beyond any calendar."""
    stamp = message.timestamp or message.originalTimestamp
    sent = message.sentAt or sent_at
    if stamp is None:
        return received_at
    stamp = stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)
    if sent is None or (message.receivedAt is not None and message.timestamp is not None):
        return stamp.astimezone(UTC)
    sent = sent if sent.tzinfo else sent.replace(tzinfo=UTC)
    return (stamp - sent + received_at).astimezone(UTC)


def message_id(message: Message, raw: bytes, where: str) -> str | FieldError:
    """`messageId`, the event's id (a retry with the same one is a duplicate). Without one: a digest of the
    message (less `sentAt`, which a retry changes), so a retried message is still the same event."""
    if message.messageId:
        problem = id_problem(message.messageId, "messageId")
        return FieldError(f"{where}.messageId", problem) if problem else message.messageId
    content = _ANY_DECODER.decode(raw)
    if isinstance(content, dict):
        content.pop("sentAt", None)
        content.pop("writeKey", None)
    return "segment-" + hashlib.sha256(msgspec.json.encode(content, order="sorted")).hexdigest()[:40]


def snake_case(name: str) -> str:
    """A Segment event name as an event type: `Order Refunded` -> `order_refunded`, `signedUp` ->
    `signed_up`, `Über uns` -> `uber_uns`; a name starting with no letter gets `event_` before it."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()  # `Über` -> `Uber`
    text = re.sub(r"([a-z])([A-Z])", r"\1_\2", ascii_name)
    text = re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower()
    if not text[:1].isalpha():
        text = f"event_{text}".rstrip("_")
    return text[:64].rstrip("_")


def _translate(
    message: Message,
    call: str,
    raw: bytes,
    where: str,
    sent_at: datetime | None,
    mapping: SegmentMapping,
    received_at: datetime,
    out: Translated,
) -> list[FieldError]:
    if call == "group":
        out.ignored += 1
        return []
    if call == "alias":
        try:
            when = event_time(message, sent_at, received_at)
        except OverflowError:
            when = received_at
        return _alias(message, where, out, when if time_in_range(when) else received_at)
    contact = contact_of(message, where)
    if isinstance(contact, FieldError):
        return [contact]
    contact_id, anonymous = contact
    event_id = message_id(message, raw, where)
    if isinstance(event_id, FieldError):
        return [event_id]
    try:
        time = event_time(message, sent_at, received_at)
    except OverflowError:
        time = None
    if time is None or not time_in_range(time):
        place = "timestamp" if message.timestamp else "originalTimestamp"
        return [FieldError(f"{where}.{place}", f"the time (corrected by sentAt) must be {TIME_RANGE}")]
    if anonymous:
        out.anonymous.add(contact_id)
    elif _text(message.anonymousId):  # both ids: the visitor is this contact (Segment's identity rule)
        linked = anonymous_contact_id(_text(message.anonymousId))
        if id_problem(linked) is None:
            out.links.append((linked, contact_id, time))
    if call == "identify":
        patch = traits_patch(message, where, mapping.identify)
        if isinstance(patch, list):
            return patch
        out.patches.append((contact_id, patch, time))
        if mapping.identify.event is None:
            return []
        attributes: dict[str, Any] = dict(patch.attributes)
        if patch.consent:
            attributes["consent"] = dict(patch.consent)
        return _add(out, Event(event_id, mapping.identify.event, contact_id, time, attributes), where)
    if call == "track":
        if not message.event:
            return [FieldError(f"{where}.event", "required for track: the event's name")]
        found = mapping.for_track(message.event)
        if found is None:
            if mapping.unmapped_track == "ignore":
                out.ignored += 1
                return []
            found = EventMapping(type=snake_case(message.event))
    else:
        found = mapping.page if call == "page" else mapping.screen
    event = Event(event_id, found.type, contact_id, time, mapped_attributes(message, found))
    errors = _add(out, event, where)
    if not errors and found.cart is not None:
        out.carts.append(cart_change(message, found, event))
    return errors


def _add(out: Translated, event: Event, where: str) -> list[FieldError]:
    """The event, or what ingest would refuse in it, said at the message's own fields."""
    problems = event_problems(event, fuzzy=False)
    if problems:
        return [FieldError(segment_path(path, where), message) for path, message in problems]
    out.events.append(event)
    out.places.append(where)
    return []


def segment_path(path: str, where: str) -> str:
    """Where in the message (at `where`) a problem of the event made of it lies."""
    if path.startswith("$.attributes"):
        return f"{where}.properties{path[len('$.attributes') :]}"
    if path == "$.time":
        return f"{where}.timestamp"
    return f"{where}.event"  # the type the event maps to refuses it (a catalog type has no contact)


def _alias(message: Message, where: str, out: Translated, time: datetime) -> list[FieldError]:
    """`previousId` (an anonymous id) becomes the contact `userId`: a link, made at the message's time
    (an erased contact's tombstone refuses a late retry of one sent before the erasure)."""
    previous, user = _text(message.previousId), _text(message.userId)
    errors = []
    if not previous:
        errors.append(FieldError(f"{where}.previousId", "required for alias"))
    if not user:
        errors.append(FieldError(f"{where}.userId", "required for alias"))
    if errors:
        return errors
    anonymous = anonymous_contact_id(previous)
    checks = [
        (".userId", user_id_problem(user)),
        (".previousId", id_problem(anonymous, f"the contact id `{anonymous[:40]}`")),
    ]
    for path, problem in checks:
        if problem:
            errors.append(FieldError(where + path, problem))
    if not errors and anonymous != user:
        out.links.append((anonymous, user, time))
    return errors


# --- properties to attributes ---------------------------------------------------------------------------


def _lookup(message: Message, source: str) -> Any:
    root, *keys = source.split(".")
    value: Any = {
        "properties": message.properties,
        "context": message.context,
        "traits": message.traits,
        "name": message.name,
        "category": message.category,
        "event": message.event,
    }[root]
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _first(found: dict[str, Any] | Message, sources: str | list[str]) -> Any:
    for source in [sources] if isinstance(sources, str) else sources:
        value = _lookup(found, source) if isinstance(found, Message) else found.get(source)
        if value is not None:
            return value
    return None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _items(message: Message, spec: ItemsMapping) -> list[dict[str, Any]] | None:
    return _products(message, spec)[0]


def _products(message: Message, spec: ItemsMapping) -> tuple[list[dict[str, Any]] | None, bool]:
    """The items, and whether they came from a list (a cart's `products`) rather than one product."""
    for source in spec.from_:
        value = _lookup(message, source)
        products = value if isinstance(value, list) else [value] if isinstance(value, dict) else None
        if products is None:
            continue
        items = []
        for product in products:
            if isinstance(product, dict):
                item = {k: v for k, names in spec.fields.items() if (v := _first(product, names)) is not None}
                if item:
                    items.append(item)
        return items, isinstance(value, list)
    return None, False


def cart_change(message: Message, spec: EventMapping, event: Event) -> CartChange:
    """What the message does to the kept cart: a message holding a list of products (the cart's
    `products`) says the whole cart, so it replaces it whatever the mapping's `cart`; a `replace` without
    one leaves the cart as it is."""
    cart_id = event.attributes.get("cart_id")
    named = str(cart_id) if isinstance(cart_id, str | int) and not isinstance(cart_id, bool) else None
    if spec.cart == "clear" or spec.items is None:
        return CartChange(event, "clear")
    items, whole = _products(message, spec.items)
    op: CartOp = spec.cart if spec.cart in ("add", "remove") and items is not None else "keep"
    if whole:
        op = "replace"
    return CartChange(event, op, named or None, items or [], spec.items.to, spec.items_total)


def items_total(items: list[dict[str, Any]]) -> float | None:
    """The sum of price x quantity (1 when not given), to the cent; None when no item has a price."""
    prices = [(_number(i.get("price")), _number(i.get("qty", i.get("quantity", 1)))) for i in items]
    priced = [p * (q if q is not None else 1) for p, q in prices if p is not None]
    return round(sum(priced), 2) if priced else None


def mapped_attributes(message: Message, spec: EventMapping) -> dict[str, Any]:
    """The event's attributes: the properties as they are (unless `keep_properties` is false), then what
    the mapping names, then the items and their total."""
    attributes: dict[str, Any] = dict(message.properties or {}) if spec.keep_properties else {}
    for name, sources in spec.attributes.items():
        value = _first(message, sources)
        if value is not None:
            attributes[name] = value
    if spec.items is not None:
        items = _items(message, spec.items)
        if items is not None:
            attributes[spec.items.to] = items
            total = items_total(items)
            if spec.items_total and _number(attributes.get(spec.items_total)) is None and total is not None:
                attributes[spec.items_total] = total
    return attributes


# --- identify's traits to the profile --------------------------------------------------------------------

_OPT_IN = re.compile(r"^([a-z][a-z0-9_]{0,31})_opt_in$")
_CHANNEL = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_EMAIL = re.compile(EMAIL_PATTERN)
_E164 = re.compile(E164_PATTERN)
_PHONE_SEPARATORS = re.compile(r"[\s().-]")


def identify_traits(message: Message, where: str) -> dict[str, tuple[Any, str]]:
    """trait -> (value, its path). The traits are at the top (Segment) or in `context.traits` (RudderStack's
    libraries put them there); a trait at the top wins."""
    found: dict[str, tuple[Any, str]] = {}
    nested = (message.context or {}).get("traits")
    for traits, at in ((nested, f"{where}.context.traits"), (message.traits, f"{where}.traits")):
        if isinstance(traits, dict):
            found.update({key: (value, at) for key, value in traits.items()})
    return found


def traits_patch(message: Message, where: str, spec: IdentifyMapping) -> ContactPatch | list[FieldError]:
    """The profile change an identify's traits make (conventions in docs/segment.md): `email`, `phone` in
    E.164 (another phone is kept as an attribute), consent from `<channel>_opt_in` and `consent`,
    `timezone` (or the context's), every other trait an attribute. Only the traits read here can be
    refused; the rest are kept as they came, as event attributes are."""
    errors: list[FieldError] = []
    email: str | None = None
    phone: str | None = None
    timezone: str | None = None
    consent: dict[str, bool] = {}
    attributes: dict[str, Any] = {}
    for key, (value, at) in identify_traits(message, where).items():
        if value is None and key in ("email", "timezone", "consent"):
            continue  # said as absent: nothing to change
        path = f"{at}.{key}"
        opt_in = _OPT_IN.match(key)
        if key == "email" and value is not None:
            if not isinstance(value, str) or len(value) > EMAIL_MAX or not _EMAIL.match(value.strip()):
                errors.append(FieldError(path, "not an email address"))
            else:
                email = value.strip()
        elif key == "phone" and isinstance(value, str) and _E164.match(_PHONE_SEPARATORS.sub("", value)):
            phone = _PHONE_SEPARATORS.sub("", value)
        elif opt_in and value is not None:
            if isinstance(value, bool):
                consent[opt_in.group(1)] = value
            else:
                errors.append(FieldError(path, "must be true or false"))
        elif key == "consent" and value is not None:
            if not isinstance(value, dict):
                errors.append(FieldError(path, "must be an object of channel: true or false"))
                continue
            for channel, given in value.items():
                if not _CHANNEL.match(channel) or not isinstance(given, bool):
                    errors.append(FieldError(f"{path}.{channel}", "must be a channel name such as `email` "
                                             "with true or false"))  # fmt: skip
                else:
                    consent[channel] = given
        elif key == "timezone" and value is not None:
            if isinstance(value, str) and value in IANA_ZONES:
                timezone = value
            else:
                errors.append(FieldError(path, "not an IANA time zone such as Europe/Berlin"))
        else:
            errors.extend(FieldError(p, m) for p, m in document_errors({key: value}, at))
            attributes[spec.traits.get(key, key)] = value
    context_zone = (message.context or {}).get("timezone")
    if timezone is None and isinstance(context_zone, str) and context_zone in IANA_ZONES:
        timezone = context_zone
    if errors:
        return errors
    return ContactPatch(email=email, phone=phone, consent=consent, timezone=timezone, attributes=attributes)
