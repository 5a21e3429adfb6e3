"""Contact search and a contact's state: the bodies of `GET /v1/contacts?q=` and
`GET /v1/contacts/{contact_id}/state`, what the console's contact page and an on-call engineer read to
tell why a contact got (or did not get) a message."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec

SearchTerm = Annotated[
    str,
    msgspec.Meta(
        min_length=1,
        max_length=254,
        description="a contact id (exact), an email address (any letter case) or a phone number (E.164)",
    ),
]


class ContactSearchQuery(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    q: SearchTerm
    limit: Annotated[int, msgspec.Meta(ge=1, le=50, description="most contacts to return")] = 20


class ContactSummary(msgspec.Struct):
    """One search result. `matched`: what the term was taken as; `stored` false: the id has events but no
    stored contact yet (nothing was decided for it)."""

    contact_id: str
    matched: Literal["id", "email", "phone"]
    stored: bool = True
    email: str | None = None
    phone: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None


class ContactSearchResult(msgspec.Struct):
    contacts: list[ContactSummary]


class ChannelState(msgspec.Struct):
    """Whether a marketing message on this channel may reach the contact now, decided as the dispatcher
    decides (core.sendpolicy.choose): `blocked_by` is the reason code that stops it and `why` the sentence,
    both null when nothing does. Transactional messages skip the consent check only."""

    channel: str
    configured: bool
    consent: bool | None  # the contact's consent for the channel; null: never given
    consent_needed: bool  # marketing messages on it need consent (not: log, inapp)
    suppressed: bool
    reachable: bool
    unreachable: str | None  # why the channel cannot reach the contact (no address, bounced)
    cap: int | None  # marketing messages a day on it (RULESVC_FREQUENCY_CAPS); null: no cap
    sent_today: int | None  # marketing messages sent on it since the contact's local midnight (capped only)
    blocked_by: str | None
    why: str | None


class Suppression(msgspec.Struct):
    """A channel the rules (`suppress`) or the provider (`blocked`) closed for the contact."""

    channel: str
    active: bool
    since: datetime | None = None
    until: datetime | None = None  # null: for good
    reason: str | None = None


class FlagState(msgspec.Struct):
    name: str
    active: bool
    until: datetime | None = None  # null: until cleared


class CounterState(msgspec.Struct):
    """`value` as a rule's condition reads it now (within its window); `per_key`: counts distinct keys."""

    name: str
    value: int
    window: str | None = None  # a duration, `session`, or null (all time)
    per_key: bool = False


class RememberedValue(msgspec.Struct):
    name: str
    active: bool
    value: Any = None
    until: datetime | None = None


class AudienceMembership(msgspec.Struct):
    name: str
    since: datetime | None = None


class SessionState(msgspec.Struct):
    number: int
    started_at: datetime | None
    last_at: datetime | None
    ended: bool


class EventSeen(msgspec.Struct):
    """An event type a ruleset's rules listen to, and the contact's stored events of it (within the
    event retention): `count` 0 and `last_at` null when the contact never did it."""

    type: str
    count: int
    last_at: datetime | None = None


class OnceMark(msgspec.Struct):
    """A rule with `once` fired for the contact: it fires again only as its `once.per` allows."""

    rule: str
    key: str
    at: datetime | None


class RulesetState(msgspec.Struct):
    """The contact in one loaded ruleset. `group`: `holdout`, its A/B arm, or "" (no test); a held-out
    contact's messages are decided and recorded, never sent. `entered_at`/`journey_until`: an open entry
    whose goal may still convert (rulesets with a goal)."""

    ruleset: str
    group: str
    held_out: bool
    holdout: str | None  # the ruleset's holdout share, e.g. `5%`; null: none
    listens_to: list[EventSeen]
    once: list[OnceMark]
    entered_at: datetime | None = None
    journey_until: datetime | None = None
    entry_rule: str | None = None
    timeout: str | None = None  # the ruleset's: an event older than it when it arrives starts nothing


class ContactState(msgspec.Struct):
    """What the service keeps about a contact besides its profile and history. Flags, counters and
    remembered values are the contact's, shared by every ruleset that names them."""

    contact_id: str
    stored: bool  # false: only events so far (no decision stored for the contact yet)
    email_invalid: bool
    consent: dict[str, bool]
    channels: list[ChannelState]
    suppressions: list[Suppression]
    flags: list[FlagState]
    counters: list[CounterState]
    values: list[RememberedValue]
    audiences: list[AudienceMembership]
    session: SessionState | None
    rulesets: list[RulesetState]
    at: datetime  # the moment the windows and expiries were judged at
