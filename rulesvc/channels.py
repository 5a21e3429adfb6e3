"""What a channel is: the interface plugins implement, and the registry of the channels loaded.

A channel receives a message that already passed consent, reachability, suppression, caps and quiet
hours, rendered from its template, and says what became of it. Channel objects have `async` methods;
pluggy only registers them (its hooks are synchronous).
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Annotated, Any, ClassVar, Literal, Protocol, TypeVar, runtime_checkable

import aiohttp
import msgspec
from aiohttp import web

# Ads audiences are not a channel: the `audience` action queues changes, and a plugin job syncs them.
STANDARD_CHANNELS = ("email", "sms", "push", "webpush", "inapp", "webhook")

# What a plugin registers, as `rulesvc plugins` and `GET /v1/channels` name it.
MESSAGE_CHANNEL = "message channel"
AUDIENCE_SYNC = "audience sync"
JOB = "job"


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds from a provider's Retry-After header, given as seconds or as an HTTP date."""
    value = headers.get("Retry-After")
    if not value:
        return None
    if value.strip().isdigit():
        return float(value)
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (moment - datetime.now(UTC)).total_seconds())


# Settings every channel takes besides its own: read by the dispatcher, not the plugin.
COMMON_SETTINGS = frozenset({"quiet_hours"})
_SECRET_WORDS = ("password", "token", "secret", "key")
_FLAGS = {
    "true": True,
    "yes": True,
    "on": True,
    "1": True,
    "false": False,
    "no": False,
    "off": False,
    "0": False,
}


def as_flag(value: Any) -> bool | None:
    """A yes-or-no setting as TOML (a boolean) or the environment (`true`, `yes`, `on`, `1`, ...) gives
    it; None if it is neither. The one reading of switches, for plugins' settings and the dispatcher's."""
    if isinstance(value, bool):
        return value
    return _FLAGS.get(value.strip().lower()) if isinstance(value, str) else None


class PluginSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A plugin's settings: one field per setting, described in `Annotated[T, msgspec.Meta(description=...)]`
    so the reference in docs/ is generated from it and cannot drift. `required` names the settings a section
    must have once it is given at all (a tuple: any one of them); a section left out is no error, the plugin
    is just not configured. A value whose name says secret (password, token, secret, key), or marked with
    `Meta(extra={"secret": True})`, is never echoed in an error."""

    required: ClassVar[tuple[str | tuple[str, ...], ...]] = ()


class ChannelSettings(PluginSettings):
    """A message channel's settings: its own, plus `quiet_hours`."""

    quiet_hours: Annotated[
        bool | None,
        msgspec.Meta(
            description="whether marketing messages wait for the end of quiet hours; default: yes for "
            "email, sms, push and webpush, no for the others"
        ),
    ] = None


S = TypeVar("S", bound=PluginSettings)


class ChannelSettingsError(ValueError):
    """Every problem of one `[channels.NAME]` section, each a line `channels.NAME.KEY: what is expected`.
    `owner` is the channel or job class that read them, so its placeholder keeps its name and kind."""

    def __init__(self, channel: str, problems: list[str], owner: type | None = None) -> None:
        super().__init__("; ".join(problems))
        self.channel = channel
        self.problems = problems
        self.owner = owner


def _unwrap(tp: Any) -> tuple[Any, list[msgspec.Meta]]:
    if typing.get_origin(tp) is Annotated:
        base, *extras = typing.get_args(tp)
        return base, [m for m in extras if isinstance(m, msgspec.Meta)]
    return tp, []


def _options(tp: Any) -> list[Any]:
    """A union's members (None left out), or the type itself."""
    base, _ = _unwrap(tp)
    if typing.get_origin(base) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(base) if a is not type(None)]
    return [base]


_NAMES: dict[Any, tuple[str, str]] = {
    int: ("an integer", "integer"),
    float: ("a number", "number"),
    bool: ("true or false", "true/false"),
    str: ("a string", "string"),
}


def _describe(tp: Any, short: bool = False) -> str:
    """`an integer >= 1`, `one of `starttls`, `tls`, `none``: what a setting takes, in words."""
    parts = []
    for option in _options(tp):
        if typing.get_origin(option) is Literal:
            values = [f"`{v}`" for v in typing.get_args(option)]
            parts.append(" \\| ".join(values) if short else "one of " + ", ".join(values))
        else:
            words = _NAMES.get(option, (getattr(option, "__name__", str(option)),) * 2)
            parts.append(words[1] if short else words[0])
    text = " or ".join(parts)
    for meta in _unwrap(tp)[1]:
        if meta.ge is not None and meta.le is not None:
            text += f" from {meta.ge} to {meta.le}"
            continue
        for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if getattr(meta, attr, None) is not None:
                text += f" {sign} {getattr(meta, attr)}"
    return text


def _description(tp: Any) -> str:
    return " ".join(m.description for m in _unwrap(tp)[1] if m.description)


def is_secret(key: str, tp: Any = None) -> bool:
    """A value never echoed: its name says so, or its field is marked `extra={"secret": True}`."""
    marked = any((m.extra or {}).get("secret") for m in _unwrap(tp)[1]) if tp is not None else False
    return marked or any(word in key.lower() for word in _SECRET_WORDS)


def _shown(key: str, value: Any, tp: Any = None) -> str:
    if is_secret(key, tp):
        kinds = {str: "a string", bool: "true or false", int: "a number", float: "a number"}
        return kinds.get(type(value), "a " + type(value).__name__.replace("dict", "table"))
    text = msgspec.json.encode(value).decode() if isinstance(value, str | int | float | bool) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _suggestion(key: str, known: list[str]) -> str:
    """`smtp_prot` -> `port`: the closest known name, also by the last word of a prefixed name."""
    for candidate in (key, key.rpartition("_")[2]):
        close = difflib.get_close_matches(candidate.lower(), known, n=1, cutoff=0.6)
        if close:
            return f"; did you mean `{close[0]}`?"
    return ""


def _given(value: Any) -> bool:
    return value is not None and value != ""


def read_settings(
    channel: str, raw: Mapping[str, Any] | S, settings_type: type[S], owner: type | None = None
) -> S:
    """`[channels.CHANNEL]` as `settings_type`, or ChannelSettingsError with every problem at once:
    unknown keys (with the closest known one), values of the wrong type (environment strings such as
    "587" or "true" are converted), required settings missing from a section that is given."""
    if isinstance(raw, settings_type):
        return raw
    assert isinstance(raw, Mapping)
    prefix = f"channels.{channel}"
    fields = {f.encode_name: f for f in msgspec.structs.fields(settings_type)}
    known = sorted(fields)
    problems: list[str] = []
    values: dict[str, Any] = {}
    for key, value in raw.items():
        info = fields.get(key)
        if info is None:
            problems.append(
                f"{prefix}.{key}: unknown setting{_suggestion(key, known)} (known: {', '.join(known)})"
            )
            continue
        if isinstance(value, str) and bool in _options(info.type):
            flag = as_flag(value)
            value = value if flag is None else flag
        try:
            values[info.name] = msgspec.convert(value, info.type, strict=False)
        except msgspec.ValidationError:
            problems.append(
                f"{prefix}.{key}: expected {_describe(info.type)}, got {_shown(key, value, info.type)}"
            )
    if any(key not in COMMON_SETTINGS for key in raw):
        for need in settings_type.required:
            names = (need,) if isinstance(need, str) else need
            if not any(_given(raw.get(n)) for n in names):
                alternatives = "".join(f" or `{n}`" for n in names[1:])
                why = _description(fields[names[0]].type)
                problems.append(f"{prefix}.{names[0]}: required{alternatives}" + (f" ({why})" if why else ""))
    if problems:
        raise ChannelSettingsError(channel, problems, owner)
    return settings_type(**values)


def settings_table(channel: str, settings_type: type[PluginSettings]) -> str:
    """The Markdown table of a plugin's settings: setting, type, default, variable, description."""
    required: dict[str, list[str]] = {}  # each required setting, with the ones that may stand for it
    for need in settings_type.required:
        names = (need,) if isinstance(need, str) else need
        required.update({n: [m for m in names if m != n] for n in names})
    rows = [
        "| setting | type | default | environment variable | description |",
        "|---|---|---|---|---|",
    ]
    fields = msgspec.structs.fields(settings_type)
    for info in sorted(fields, key=lambda f: f.encode_name in COMMON_SETTINGS):  # its own settings first
        key = info.encode_name
        if key in required:
            default = "required" + "".join(f", or `{n}`" for n in required[key])
        elif info.default in (None, "", msgspec.NODEFAULT):
            default = "-"
        else:
            default = f"`{msgspec.json.encode(info.default).decode()}`"
        env = f"`RULESVC_CHANNEL_{channel.upper()}_{key.upper()}`"
        kind = _describe(info.type, short=True)
        rows.append(f"| `{key}` | {kind} | {default} | {env} | {_description(info.type)} |")
    return "\n".join(rows)


@dataclass
class OutboundMessage:
    message_id: str  # stable across retries: the idempotency key for providers that honour one
    contact_id: str
    channel: str
    template: str
    content: dict[str, str]  # rendered template blocks: subject, text, html, title, body, ...
    params: dict[str, Any]
    transactional: bool
    contact: dict[str, Any]  # the profile: email, phone, push_tokens, webpush_subscriptions, timezone, ...
    attempt: int = 1


@dataclass
class Delivery:
    """`retry` is for timeouts, 5xx and 429; `failed` is permanent (the provider said no); `blocked` is a
    refusal of the recipient (opted out, the carrier blocks us): as a callback's `blocked` outcome, the
    channel is then suppressed for the contact."""

    status: Literal["sent", "failed", "retry", "blocked"]
    reason: str | None = None  # the detail; may start with a reason code and ": " (`template_error: ...`)
    retry_after: float | None = None  # seconds, from the provider's Retry-After
    provider_id: str | None = None
    # Addresses the provider called dead: removed from the contact (e.g. ("push_tokens", token)).
    unreachable: list[tuple[str, Any]] = field(default_factory=list)
    record: dict[str, Any] = field(
        default_factory=dict
    )  # kept on the message (e.g. in-app content, segments)


@dataclass
class Outcome:
    """What a provider reported later about a message (callbacks)."""

    status: Literal["delivered", "opened", "clicked", "bounced", "blocked", "replied", "failed"]
    message_id: str | None = None
    provider_id: str | None = None
    reason: str | None = None
    attributes: dict[str, Any] = field(default_factory=dict)


class Channel(Protocol):
    """A channel plugin. Besides these members a channel may set `local = True` when a send never leaves
    the service (the in-app inbox, the log): it needs no `sending` mark and a re-run is harmless. It
    may set `timeout` (seconds): a send is cut at the lower of it and two thirds of the lease. It may
    set `html = True` when its title and body are shown in web pages (the in-app inbox): template
    params in them are then HTML-escaped. `settings_type` (a `ChannelSettings` struct, read with
    `read_settings`) documents its settings and makes wrong ones errors with their path; `kind` names
    what it is in listings (default `message channel`)."""

    name: str
    # The receiver ignores a repeat of a message id it has already seen (the webhook's Idempotency-Key).
    # A send a crash may have interrupted is then made once more with the same key; on any other
    # channel such a message is marked `uncertain` and not sent again, since it may have arrived.
    deduplicates: bool

    def status(self) -> tuple[bool, str]:
        """(configured, detail): a misconfigured channel is reported and skipped, never fatal."""
        ...

    def reachable(self, contact: dict[str, Any]) -> str | None:
        """None if the contact can be reached on this channel, else why not."""
        ...

    async def send(self, message: OutboundMessage) -> Delivery: ...


def is_local(channel: Channel) -> bool:
    """The send never leaves the service: no `sending` mark, repeated freely after a crash."""
    return bool(getattr(channel, "local", False))


def deduplicates(channel: Channel) -> bool:
    """The channel's `deduplicates` flag; plugins written before it said `idempotent`."""
    flag = getattr(channel, "deduplicates", None)
    if flag is None:
        flag = getattr(channel, "idempotent", False)
    return bool(flag)


@runtime_checkable
class CallbackChannel(Protocol):
    async def callback(self, request: web.Request) -> list[Outcome]:
        """Authenticate the provider's request as the provider signs it; raise HTTPUnauthorized if not."""
        ...


@runtime_checkable
class ManagedChannel(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...


class LogChannel:
    """Delivers nothing: the message history is the whole delivery. For trying rules out."""

    local = True
    deduplicates = True

    def __init__(self, name: str = "log") -> None:
        self.name = name

    def status(self) -> tuple[bool, str]:
        return True, "records messages in the history only"

    def reachable(self, contact: dict[str, Any]) -> str | None:
        return None

    async def send(self, message: OutboundMessage) -> Delivery:
        return Delivery("sent")


class Unconfigured:
    """A standard channel no installed plugin provides: rulesets may use it; its sends are suppressed."""

    local = True
    deduplicates = True

    def __init__(self, name: str) -> None:
        self.name = name

    def status(self) -> tuple[bool, str]:
        return False, f"no plugin provides `{self.name}`: pip install the rulesvc-{self.name} plugin"

    def reachable(self, contact: dict[str, Any]) -> str | None:
        return None

    async def send(self, message: OutboundMessage) -> Delivery:
        return Delivery("failed", self.status()[1])


class Misconfigured:
    """A plugin's channel or job whose settings are wrong: listed under its own name and kind as not
    configured, with every problem; its sends are suppressed as on any channel not configured, and as a
    job it never runs."""

    local = True  # never sends: nothing to mark
    interval = 3600.0

    def __init__(
        self, name: str, problems: list[str], kind: str = MESSAGE_CHANNEL, deduplicates: bool = False
    ) -> None:
        self.name = name
        self.problems = problems
        self.kind = kind
        self.deduplicates = deduplicates  # the real channel's, for listings

    def status(self) -> tuple[bool, str]:
        return False, "settings: " + "; ".join(self.problems)

    def reachable(self, contact: dict[str, Any]) -> str | None:
        return None

    async def send(self, message: OutboundMessage) -> Delivery:
        return Delivery("failed", self.status()[1])

    async def run(self, data: Any) -> None:
        return None


@runtime_checkable
class Job(Protocol):
    """Runs every `interval` seconds; a lease keeps it to one process. `data` is a
    `rulesvc.store.jobs.JobData`: named queries (audience changes, contacts), not the collections.

    A job may set `kind` (`audience sync`; default `job`) and `settings_name` (its `[channels.NAME]`), and
    have `status() -> (configured, detail)` as channels do: a job not configured is listed, never run."""

    name: str
    interval: float

    async def run(self, data: Any) -> None: ...


def kind_of(thing: object, default: str) -> str:
    """What a registered channel or job is, for listings: its `kind`, else the hook's default."""
    kind = getattr(thing, "kind", None)
    return kind if isinstance(kind, str) and kind else default


def status_of(thing: object) -> tuple[bool, str]:
    """A channel's or job's `status()`; a job without one is configured. A status that raises is said."""
    status = getattr(thing, "status", None)
    if status is None:
        return True, f"runs every {getattr(thing, 'interval', '?')} s"
    try:
        configured, detail = status()
    except Exception as exc:
        return False, f"status check failed: {type(exc).__name__}: {exc}"
    return bool(configured), str(detail)


class HttpChannel:
    """For channels that call an HTTP API: one client session, opened and closed with the service.

    Set `timeout` (seconds); override `session_headers` for headers every request carries."""

    timeout: float = 10.0
    session: aiohttp.ClientSession | None = None

    def session_headers(self) -> dict[str, str]:
        return {}

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(
            headers=self.session_headers(), timeout=aiohttp.ClientTimeout(total=self.timeout)
        )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def http(self) -> aiohttp.ClientSession:
        """The session, started on first use if the service did not start it (e.g. in a script)."""
        if self.session is None:
            await self.start()
        assert self.session is not None
        return self.session


class ChannelRegistry:
    def __init__(self) -> None:
        self._channels: dict[str, Channel] = {}
        self.jobs: list[Job] = []
        # (channel, problem) for every wrong setting; warnings for settings no loaded plugin reads.
        self.settings_errors: list[tuple[str, str]] = []
        self.settings_warnings: list[tuple[str, str]] = []

    def register(self, channel: Channel) -> None:
        self._channels[channel.name] = channel

    def get(self, name: str) -> Channel | None:
        return self._channels.get(name)

    def names(self) -> frozenset[str]:
        return frozenset(self._channels)

    def all(self) -> list[Channel]:
        return [self._channels[n] for n in sorted(self._channels)]
