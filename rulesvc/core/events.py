"""The event contract: decoding and validating what shops post, with an error path for every problem."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated, Any

import msgspec

from rulesvc.core.catalog import catalog_problems
from rulesvc.core.ids import Id

# Events without a contact: they describe the catalog and fan out to interested contacts.
CATALOG_EVENT_TYPES = frozenset({"price_changed", "stock_changed"})

# The outcome events that the channels feed back; rules branch on them.
MESSAGE_EVENT_TYPES = frozenset(
    {
        "message_delivered",
        "message_opened",
        "message_clicked",
        "message_bounced",
        "message_blocked",
        "message_replied",
    }
)

# The types the shipped rulesets use; any other matching the pattern is accepted as a custom event.
KNOWN_EVENT_TYPES = frozenset(
    {
        "product_viewed",
        "category_viewed",
        "page_viewed",
        "cart_updated",
        "checkout_started",
        "purchased",
        "session_ended",
        "wishlist_added",
        "delivery_status_changed",
        "social_shared",
        "address_changed",
        "subscribed",
    }
    | CATALOG_EVENT_TYPES
    | MESSAGE_EVENT_TYPES
)

# Ids follow the one id rule (rulesvc/core/ids.py); it also keeps the service's own event ids out of reach.
EventId = Annotated[Id, msgspec.Meta(description="unique per event; a re-post is a duplicate")]
EventType = Annotated[
    str,
    msgspec.Meta(
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z][A-Za-z0-9_.:-]*$",
        description="e.g. cart_updated; unknown types are accepted as custom events",
    ),
]
ContactId = Id
EventAttributes = Annotated[
    dict[str, Any],
    msgspec.Meta(
        description=(
            "Free-form JSON object. The catalog events have a contract (docs/rulesets.md, Catalog events):"
            " `price_changed` needs `product_id` (string or integer) and `price` (number >= 0), optionally"
            " `previous_price` (number > 0), `currency` (ISO 4217, e.g. EUR), `name`, `url`, `image_url`"
            " (strings); `stock_changed` needs `product_id` and `in_stock` (boolean), optionally `quantity`"
            " (integer >= 0) and the same strings. Other attributes are kept; a broken contract is a 422."
        )
    ),
]
EventTime = Annotated[datetime, msgspec.Meta(tz=True, description="RFC 3339 with offset; default: now")]


class Event(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """One customer or catalog event as posted to `POST /v1/events`."""

    id: EventId
    type: EventType
    contact_id: ContactId | None = None
    time: EventTime | None = None
    attributes: EventAttributes = msgspec.field(default_factory=dict)


class EventError(msgspec.Struct):
    index: int
    path: str
    message: str


class EventsAccepted(msgspec.Struct, omit_defaults=True):
    """`erased`: events of an erased contact older than its erasure, acknowledged and not stored
    (RULESVC_ERASURE_TOMBSTONE); left out when none."""

    accepted: int
    duplicates: int
    erased: int = 0


class EventsRejected(msgspec.Struct):
    error: str
    errors: list[EventError]


class MalformedBody(Exception):
    """The body is not JSON (or one NDJSON line is not); the message says where it broke."""

    def __init__(self, message: str, index: int | None = None) -> None:
        super().__init__(message)
        self.index = index


class TooManyEvents(Exception):
    pass


_AT_PATH = re.compile(r"^(?P<msg>.*?)(?: - at (?P<key>`key` in )?`(?P<path>[^`]*)`)?$", re.S)


def split_validation_error(exc: msgspec.ValidationError) -> tuple[str, str]:
    """msgspec says 'Expected `int`, got `str` - at `$.a`'; the API reports path and message apart."""
    match = _AT_PATH.match(str(exc))
    assert match is not None
    message = match.group("msg")
    if match.group("key"):
        message = f"invalid key: {message}"
    return match.group("path") or "$", message


MAX_ATTRIBUTE_DEPTH = 8
MAX_KEYS = 256  # per object, at any depth
MAX_ITEMS = 1000  # per list
MAX_STRING = 16_384  # characters in one string value
_INT64 = (-(2**63), 2**63 - 1)

# Times the engine can compute with (it adds delays of up to a year or so, and converts to local time):
# anything outside is a client's mistake, refused at the door instead of breaking evaluation later.
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(2200, 1, 1, tzinfo=UTC)
TIME_RANGE = "between 1970-01-01 and 2200-01-01"


def time_in_range(value: datetime) -> bool:
    """False for a time outside the range, including one whose UTC conversion would overflow."""
    if not EARLIEST.year <= value.year < LATEST.year:
        return False
    try:
        return EARLIEST <= value.astimezone(UTC) < LATEST
    except OverflowError:
        return False


def read_time(value: Any) -> datetime | None:
    """An RFC 3339 string or Unix seconds as an aware datetime (a time without offset is UTC); None if
    the value is no time at all. Raises OverflowError for a number beyond any datetime."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return datetime.fromtimestamp(value, UTC)
        except (ValueError, OverflowError, OSError) as exc:
            raise OverflowError(f"{value} seconds is beyond any time") from exc
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None  # not a time: rules read it as text
        return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return None


def attribute_time_error(value: Any) -> str | None:
    """The problem with a `*_at` attribute, which rules may schedule by (`send.at`); None if usable."""
    try:
        moment = read_time(value)
        if moment is None or time_in_range(moment):
            return None
    except OverflowError:
        pass  # a number beyond any time: out of range like the others
    kind = "Unix seconds" if isinstance(value, int | float) else "time"
    return f"{kind} must be {TIME_RANGE}"


def document_errors(value: Any, path: str, depth: int = 0) -> list[tuple[str, str]]:
    """What MongoDB would refuse (or a rule could not use) in free-form attributes, as field errors."""
    if isinstance(value, dict):
        if depth >= MAX_ATTRIBUTE_DEPTH:
            return [(path, f"nested deeper than {MAX_ATTRIBUTE_DEPTH} levels")]
        if len(value) > MAX_KEYS:
            return [(path, f"more than {MAX_KEYS} keys")]
        errors: list[tuple[str, str]] = []
        for key, item in value.items():
            if not key or key.startswith("$") or "\x00" in key or "." in key:
                errors.append((path, f"invalid key {key!r}: keys must be non-empty, without `.`, `$` or NUL"))
            else:
                errors.extend(document_errors(item, f"{path}.{key}", depth + 1))
        return errors
    if isinstance(value, list):
        if depth >= MAX_ATTRIBUTE_DEPTH:
            return [(path, f"nested deeper than {MAX_ATTRIBUTE_DEPTH} levels")]
        if len(value) > MAX_ITEMS:
            return [(path, f"more than {MAX_ITEMS} items")]
        return [e for i, item in enumerate(value) for e in document_errors(item, f"{path}[{i}]", depth + 1)]
    if isinstance(value, str) and len(value) > MAX_STRING:
        return [(path, f"string longer than {MAX_STRING} characters")]
    if isinstance(value, int) and not isinstance(value, bool) and not _INT64[0] <= value <= _INT64[1]:
        return [(path, "integer out of the 64-bit range")]
    if isinstance(value, float) and not math.isfinite(value):
        return [(path, "number out of range (not finite)")]
    return []


def event_problems(event: Event, fuzzy: bool = True) -> list[tuple[str, str]]:
    """What ingest refuses in a decoded event, as (path, message): the API and the simulator share it.
    `fuzzy`: a catalog event's hints name typos too, the costly part (core/catalog.py FUZZY_KEYS)."""
    if event.time is not None and not time_in_range(event.time):
        return [("$.time", f"must be {TIME_RANGE}")]
    if event.attributes:
        errors = document_errors(event.attributes, "$.attributes")
        errors += [
            (f"$.attributes.{key}", problem)
            for key, value in event.attributes.items()
            if key.endswith("_at") and (problem := attribute_time_error(value)) is not None
        ]
        if errors:
            return errors
    if event.type in MESSAGE_EVENT_TYPES:
        message_id = event.attributes.get("message_id")
        if message_id is not None and not isinstance(message_id, str):
            return [("$.attributes.message_id", "must be a string, the id of the message")]
    if event.type in CATALOG_EVENT_TYPES:
        if event.contact_id is not None:  # the fan-out names the contacts; a shop cannot pick one
            return [("$.contact_id", f"must be absent for the catalog event type `{event.type}`")]
        return catalog_problems(event.type, event.attributes, fuzzy)
    if event.contact_id is None:
        return [("$.contact_id", f"required for event type `{event.type}`")]
    return []


FUZZY_ERRORS = 50  # typos are looked for until a batch has this many errors: the rest get cheap hints


def _malformed(
    exc: msgspec.DecodeError, body: bytes | msgspec.Raw, index: int | None = None
) -> MalformedBody:
    message = str(exc)
    if "truncated" in message:
        message += f" (at byte {len(body)}, the end of the input)"
    return MalformedBody(message, index)


def _decode_items(items: Sequence[bytes | msgspec.Raw]) -> tuple[list[Event], list[EventError]]:
    events: list[Event] = []
    errors: list[EventError] = []
    for index, raw in enumerate(items):
        try:
            event = _EVENT_DECODER.decode(raw)
        except msgspec.ValidationError as exc:
            path, message = split_validation_error(exc)
            errors.append(EventError(index, path, message))
            continue
        except msgspec.DecodeError as exc:
            raise _malformed(exc, raw, index) from exc
        problems = event_problems(event, fuzzy=len(errors) < FUZZY_ERRORS)
        errors.extend(EventError(index, path, message) for path, message in problems)
        events.append(event)
    return events, errors


def _problems(events: list[Event]) -> list[EventError]:
    errors: list[EventError] = []
    for index, event in enumerate(events):
        problems = event_problems(event, fuzzy=len(errors) < FUZZY_ERRORS)
        errors.extend(EventError(index, path, message) for path, message in problems)
    return errors


_EVENT_DECODER = msgspec.json.Decoder(Event)
_BATCH_DECODER = msgspec.json.Decoder(Event | list[Event])
_RAW_LIST_DECODER = msgspec.json.Decoder(list[msgspec.Raw])


def decode_json_body(body: bytes, max_events: int) -> tuple[list[Event], list[EventError]]:
    """One event or an array. Fast path decodes all at once; on failure every item is checked alone."""
    try:
        decoded = _BATCH_DECODER.decode(body)
    except msgspec.ValidationError:
        pass
    except msgspec.DecodeError as exc:
        raise _malformed(exc, body) from exc
    else:
        events = decoded if isinstance(decoded, list) else [decoded]
        if len(events) > max_events:
            raise TooManyEvents(f"{len(events)} events in one request; the limit is {max_events}")
        return events, _problems(events)
    if body.lstrip()[:1] != b"[":
        return _decode_items([msgspec.Raw(body)])
    try:
        raw = _RAW_LIST_DECODER.decode(body)
    except msgspec.ValidationError as exc:
        path, message = split_validation_error(exc)
        return [], [EventError(0, path, f"{message}; expected an event object or an array of events")]
    except msgspec.DecodeError as exc:
        raise _malformed(exc, body) from exc
    if len(raw) > max_events:
        raise TooManyEvents(f"{len(raw)} events in one request; the limit is {max_events}")
    return _decode_items(raw)


def decode_ndjson_body(body: bytes, max_events: int) -> tuple[list[Event], list[EventError]]:
    """One event per line; blank lines are skipped, and an index counts events, not lines."""
    lines: list[bytes] = []
    line_numbers: list[int] = []
    for number, line in enumerate(body.split(b"\n"), start=1):
        if line.strip():
            lines.append(line)
            line_numbers.append(number)
    if len(lines) > max_events:
        raise TooManyEvents(f"{len(lines)} events in one request; the limit is {max_events}")
    try:
        return _decode_items(list(lines))
    except MalformedBody as exc:
        assert exc.index is not None
        raise MalformedBody(f"line {line_numbers[exc.index]}: {exc}") from exc


def event_time(event: Event, now: datetime | None = None) -> datetime:
    if event.time is None:
        return now or datetime.now(UTC)
    return event.time.astimezone(UTC)
