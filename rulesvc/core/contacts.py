"""The contact profile: who a person is and how (and whether) they may be reached."""

from __future__ import annotations

import zoneinfo
from datetime import datetime
from typing import Annotated, Any, Final

import msgspec

from rulesvc.core.events import document_errors, split_validation_error

# The shapes of a contact's addresses: the profile's types below, and whatever else takes an address
# (a test send, a contact search) checks against the same ones.
EMAIL_PATTERN: Final = r"^[^@\s]{1,64}@[^@\s]+\.[^@\s]+$"
EMAIL_MAX: Final = 254
E164_PATTERN: Final = r"^\+[1-9][0-9]{6,14}$"
Email = Annotated[
    str, msgspec.Meta(max_length=EMAIL_MAX, pattern=EMAIL_PATTERN, description="an email address")
]
E164 = Annotated[str, msgspec.Meta(pattern=E164_PATTERN, description="E.164, e.g. +4915112345678")]
ChannelName = Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z0-9_]{0,31}$")]
PushToken = Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]
Base64Url = Annotated[str, msgspec.Meta(min_length=1, max_length=256, pattern=r"^[A-Za-z0-9_-]+=*$")]


class WebPushKeys(msgspec.Struct, forbid_unknown_fields=True):
    p256dh: Base64Url
    auth: Base64Url


class WebPushSubscription(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """As the browser's PushSubscription.toJSON() gives it."""

    endpoint: Annotated[str, msgspec.Meta(pattern=r"^https?://", max_length=2048)]
    keys: WebPushKeys
    expirationTime: int | None = None


# The profile as a channel and a template see it (the service's own fields, like state, excluded).
PROFILE_FIELDS = (
    "email",
    "phone",
    "push_tokens",
    "webpush_subscriptions",
    "consent",
    "timezone",
    "attributes",
)


class ContactIn(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """What `PUT /v1/contacts/{contact_id}` takes: the whole profile, replacing the previous one."""

    email: Email | None = None
    phone: E164 | None = None
    push_tokens: list[PushToken] = msgspec.field(default_factory=list)
    webpush_subscriptions: list[WebPushSubscription] = msgspec.field(default_factory=list)
    consent: dict[ChannelName, bool] = msgspec.field(default_factory=dict)
    timezone: Annotated[str, msgspec.Meta(description="IANA name, e.g. Europe/Berlin")] | None = None
    attributes: dict[str, Any] = msgspec.field(default_factory=dict)


class ContactPatch(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Part of a profile, from a source that knows only some fields (a Segment `identify`'s traits, a
    Shopify customer): a field given replaces the stored one, `consent` and `attributes` merge key by key,
    and what is absent stays as it was (unlike `ContactIn`, which replaces the whole profile)."""

    email: Email | None = None
    phone: E164 | None = None
    consent: dict[ChannelName, bool] = msgspec.field(default_factory=dict)
    timezone: Annotated[str, msgspec.Meta(description="IANA name, e.g. Europe/Berlin")] | None = None
    attributes: dict[str, Any] = msgspec.field(default_factory=dict)


class Contact(ContactIn, kw_only=True, omit_defaults=False):
    """A stored contact, as `GET /v1/contacts/{contact_id}` returns it."""

    contact_id: str
    email_invalid: bool = False
    created_at: datetime | None = None
    updated_at: datetime | None = None


class FieldError(msgspec.Struct):
    path: str
    message: str


class ContactRejected(msgspec.Struct):
    error: str
    errors: list[FieldError]


_CONTACT_DECODER = msgspec.json.Decoder(ContactIn)
# IANA names only. The system's zone folder also holds `localtime` (this machine's zone, whatever that
# is), `posixrules` and `Factory`: none names a place, and IANA names all begin with a capital letter.
IANA_ZONES = frozenset(z for z in zoneinfo.available_timezones() if z[:1].isupper() and z != "Factory")


def _timezone_ok(name: str) -> bool:
    return name in IANA_ZONES


def _consent_path(body: bytes) -> str:
    """msgspec names a bad dict value `[...]`; a user needs the channel it belongs to."""
    consent = msgspec.json.decode(body).get("consent", {})
    bad = next((k for k, v in consent.items() if not isinstance(v, bool)), None)
    return "$.consent" if bad is None else f"$.consent.{bad}"


def decode_contact(body: bytes) -> tuple[ContactIn | None, list[FieldError]]:
    """Raises msgspec.DecodeError for malformed JSON; returns field errors for invalid values."""
    try:
        contact = _CONTACT_DECODER.decode(body)
    except msgspec.ValidationError as exc:
        path, message = split_validation_error(exc)
        if path.startswith("$.consent[...]"):
            path = _consent_path(body)
        return None, [FieldError(path, message)]
    # The free-form parts get the same checks as event attributes: found by fuzzing, a NUL in a key
    # used to reach MongoDB and come back as a 500.
    errors: list[FieldError] = [
        FieldError(path, message)
        for path, message in document_errors(contact.attributes, "$.attributes")
        + document_errors(contact.push_tokens, "$.push_tokens")
        + document_errors(
            [msgspec.to_builtins(s) for s in contact.webpush_subscriptions], "$.webpush_subscriptions"
        )
    ]
    if contact.timezone is not None and not _timezone_ok(contact.timezone):
        errors.append(FieldError("$.timezone", f"unknown IANA time zone `{contact.timezone}`"))
    if len(set(contact.push_tokens)) != len(contact.push_tokens):
        errors.append(FieldError("$.push_tokens", "duplicate push token"))
    endpoints = [s.endpoint for s in contact.webpush_subscriptions]
    if len(set(endpoints)) != len(endpoints):
        errors.append(FieldError("$.webpush_subscriptions", "duplicate subscription endpoint"))
    return (None if errors else contact), errors
