"""Ads audiences: the `audience` action queues changes; this job sends them in batches, hourly.

Settings ([channels.ads] or RULESVC_CHANNEL_ADS_*): see `AdsSettings`.

Each run collapses the queued changes (the last change of a contact in an audience wins) and sends them
in one of two modes. `webhook` (the default): `POST {base_url}/audiences/{audience}/members` with
`{"add": [...], "remove": [...]}`, each member as SHA-256 hex digests of identifiers normalised the way
the `platform` setting's ad platform matches them (a digest of any other spelling never matches): email
trimmed and lower-cased everywhere; phone as E.164 (`+` and digits) for Google Customer Match and
`generic`, digits only with the country code for Meta. `meta`: Meta's Marketing API (`_run_meta`).
No plain identifier leaves the service. Changes stay queued when the provider fails and go with the
next run. A change queued by an erasure carries the erased contact's digests (`identifiers`), since its
profile is gone: those are sent instead of the profile's.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

import aiohttp
import msgspec
import structlog
from msgspec import Meta

from rulesvc import hookimpl
from rulesvc.channels import (
    AUDIENCE_SYNC,
    COMMON_SETTINGS,
    ChannelSettingsError,
    Job,
    PluginSettings,
    read_settings,
)
from rulesvc.core.audiences import Platform, hashed_identifiers, member_for
from rulesvc.store.jobs import JobData

log = structlog.get_logger(__name__)

Mode = Literal["webhook", "meta"]
META_MAX_USERS = 10_000  # per request: "a maximum of 10000 at a time" (Custom Audience Users reference)
META_SCHEMA = ["EMAIL", "PHONE"]  # multi-key: each row [email digest, phone digest], "" for a missing one
# Graph API error codes (Marketing API error reference and rate limiting guide).
TOKEN_ERRORS = frozenset({102, 190, 463, 467})  # OAuthException: the access token is not valid (any more)
RATE_LIMITS = frozenset({4, 17, 32, 613, 80003, 80004})
TRANSIENT = frozenset({1, 2})  # unknown error, service temporarily unavailable
MAX_BACKOFF_RUNS = 32  # runs skipped at most after failures in a row
READ_LIMIT = 100_000  # queued changes read at a time


def member(contact: dict[str, Any], platform: Platform = "generic") -> dict[str, str] | None:
    identifiers = hashed_identifiers(
        contact.get("email"), contact.get("phone"), bool(contact.get("email_invalid"))
    )
    return member_for(identifiers, platform)


def change_member(
    change: dict[str, Any], contacts: Mapping[str, Any], platform: Platform
) -> dict[str, str] | None:
    """The member a change is about: an erased contact's kept digests, else the stored profile's."""
    identifiers = change.get("identifiers")
    if isinstance(identifiers, dict):
        return member_for(identifiers, platform)
    return member(contacts.get(change["contact_id"], {}), platform)


class AdsSettings(PluginSettings):
    """Audience changes sent in batches as SHA-256 digests of email and phone: to a webhook or to Meta."""

    mode: Annotated[
        Mode,
        Meta(
            description="`webhook`: to `{base_url}` (needs `base_url` and `token`); `meta`: Meta's Marketing "
            "API, `POST`/`DELETE {graph_url}/{api_version}/{custom_audience_id}/users` (needs `access_token` "
            "and `audiences`)"
        ),
    ] = "webhook"
    base_url: Annotated[
        str, Meta(description="the provider's API; changes go to `{base_url}/audiences/{audience}/members`")
    ] = ""
    token: Annotated[str, Meta(description="the bearer token the provider gave")] = ""
    interval: Annotated[float, Meta(gt=0, description="seconds between syncs")] = 3600.0
    batch_size: Annotated[
        int, Meta(ge=1, description="members per request (at most 10000 in `meta` mode, Meta's limit)")
    ] = 10_000
    timeout: Annotated[float, Meta(gt=0, description="seconds a sync's requests may take in all")] = 60.0
    platform: Annotated[
        Platform,
        Meta(
            description="whose matching rules the hashed phone numbers follow: `meta` (digits with the "
            "country code, no `+`), `google` (E.164: `+` and digits), `generic` (E.164); email is trimmed "
            "and lower-cased for all; `meta` mode always hashes as `meta`"
        ),
    ] = "generic"
    graph_url: Annotated[str, Meta(description="`meta` mode: the Graph API's address")] = (
        "https://graph.facebook.com"
    )
    api_version: Annotated[str, Meta(description="`meta` mode: the Graph API version, `vNN.N`")] = "v26.0"
    access_token: Annotated[
        str,
        Meta(
            description="`meta` mode: a system user's access token with `ads_management` on the ad "
            "account that owns the audiences (best as an environment variable)"
        ),
    ] = ""
    audiences: Annotated[
        dict[str, str],
        Meta(
            description="`meta` mode: each audience name of the rulesets to the id of a Meta custom audience "
            "(a TOML table, or `name=id,name=id` in the variable); changes of an audience not in it stay "
            "queued and `rulesvc plugins` names it"
        ),
    ] = {}


def _mapping(raw: Any) -> Any:
    """`audiences` from the environment (`a=1,b=2`) or TOML (ids as numbers too) as a table of strings."""
    if isinstance(raw, str):
        pairs = [p.partition("=") for p in raw.split(",") if p.strip()]
        if all(sep for _, sep, _ in pairs):
            return {k.strip(): v.strip() for k, _, v in pairs}
    if isinstance(raw, dict):
        return {k: str(v) if isinstance(v, int) and not isinstance(v, bool) else v for k, v in raw.items()}
    return raw


NEEDED: dict[str, dict[str, str]] = {
    "webhook": {
        "base_url": "the provider's API; changes go to `{base_url}/audiences/{audience}/members`",
        "token": "the bearer token the provider gave",
    },
    "meta": {"access_token": "a Meta access token with `ads_management` on the audiences' ad account"},
}


def _mode_problems(raw: Mapping[str, Any]) -> list[str]:
    """What the chosen mode needs and `read_settings` cannot see: its required settings, the version's
    form, the audiences' ids."""
    if not any(key not in COMMON_SETTINGS for key in raw):
        return []  # no section: not configured, no error
    mode = raw.get("mode", "webhook")
    problems = [
        f"channels.ads.{name}: required in `{mode}` mode ({why})"
        for name, why in NEEDED.get(mode, {}).items()
        if raw.get(name) in (None, "")
    ]
    version = raw.get("api_version")
    if isinstance(version, str) and not re.fullmatch(r"v\d+\.\d+", version):
        problems.append(f"channels.ads.api_version: expected `vNN.N` (e.g. `v26.0`), got {version!r}")
    audiences = raw.get("audiences")
    for name, audience_id in audiences.items() if isinstance(audiences, dict) else ():
        if isinstance(audience_id, str) and not re.fullmatch(r"\d+", audience_id):
            problems.append(
                f"channels.ads.audiences.{name}: expected a custom audience's numeric id, got {audience_id!r}"
            )
    return problems


@dataclass
class Row:
    """One member as Meta gets it, and the queued changes it settles."""

    values: list[str]
    change_ids: list[Any]


@dataclass
class MetaState:
    """What the last run in this process learned, for `status()`: a refused token, audiences without a
    Meta id, per-audience refusals, the backoff after transient failures, the last run's counts."""

    token_refused: str | None = None
    unmapped: dict[str, int] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    failures: int = 0
    skip_runs: int = 0
    resume_at: datetime | None = None
    waiting: str | None = None
    received: int = 0
    invalid: int = 0


class Stop(Exception):
    """The run ends here (token refused, rate limited, Meta unavailable); `why` goes to the status."""

    def __init__(self, why: str, kind: Literal["token", "transient"], wait_minutes: float = 0.0) -> None:
        super().__init__(why)
        self.why = why
        self.kind = kind
        self.wait_minutes = wait_minutes


class AdsSyncIncomplete(Exception):
    """A run that left changes queued: its message is the job's last error in `rulesvc plugins` and
    `GET /v1/channels`, whichever process ran it."""


class AudienceRefused(Exception):
    """Meta refused this audience's request (wrong id, no permission, a flagged audience)."""


class AudienceSync:
    name = "ads-audience-sync"
    kind = AUDIENCE_SYNC
    settings_name = "ads"
    settings_type = AdsSettings

    def __init__(self, config: Mapping[str, Any] | AdsSettings) -> None:
        if isinstance(config, Mapping) and "audiences" in config:
            config = {**config, "audiences": _mapping(config["audiences"])}
        problems = _mode_problems(config) if isinstance(config, Mapping) else []
        try:
            settings = read_settings("ads", config, AdsSettings, type(self))
        except ChannelSettingsError as exc:
            raise ChannelSettingsError("ads", exc.problems + problems, type(self)) from None
        if problems:
            raise ChannelSettingsError("ads", problems, type(self))
        self.mode = settings.mode
        self.base_url = settings.base_url.rstrip("/")
        self.token = settings.token
        self.interval = settings.interval
        self.batch_size = settings.batch_size
        self.timeout = settings.timeout
        self.platform: Platform = "meta" if settings.mode == "meta" else settings.platform
        self.graph_url = settings.graph_url.rstrip("/")
        self.api_version = settings.api_version
        self.access_token = settings.access_token
        self.audiences = dict(settings.audiences)
        self.synced_members = 0
        self.meta = MetaState()
        self.read_limit = READ_LIMIT

    def configured(self) -> bool:
        if self.mode == "meta":
            return bool(self.access_token)
        return bool(self.base_url and self.token)

    def status(self) -> tuple[bool, str]:
        if self.mode == "meta":
            return self._meta_status()
        missing = [k for k in ("base_url", "token") if not getattr(self, k)]
        if missing:
            return False, f"missing setting(s): {', '.join(missing)}"
        return True, f"syncs to {self.base_url} every {self.interval:g} s ({self.platform} matching)"

    def _meta_status(self) -> tuple[bool, str]:
        if not self.access_token:
            return False, "missing setting(s): access_token"
        mapped = ", ".join(f"{k} → {v}" for k, v in sorted(self.audiences.items())) or "none"
        parts = [
            f"syncs to Meta Custom Audiences ({self.graph_url}/{self.api_version}) every "
            f"{self.interval:g} s; audiences: {mapped}"
        ]
        parts += self._problems()
        state = self.meta
        if state.received:
            parts.append(f"last run: {state.received} received by Meta, {state.invalid} invalid")
        return True, "; ".join(parts)

    async def run(self, data: JobData) -> None:
        if not self.configured():
            return
        if self.mode == "meta":
            await self._run_meta(data)
            return
        changes = await data.unsynced_audience_changes(self.read_limit)
        if not changes:
            return
        latest: dict[tuple[str, str], dict[str, Any]] = {}
        for change in changes:  # in time order: the last change per audience and contact wins
            latest[(change["audience"], change["contact_id"])] = change
        contacts = await data.contacts(list({c["contact_id"] for c in changes}))
        plan: dict[str, dict[str, list[dict[str, str]]]] = {}
        for (audience, _), change in latest.items():
            entry = change_member(change, contacts, self.platform)
            if entry is not None:
                plan.setdefault(audience, {"add": [], "remove": []})[change["op"]].append(entry)
        done: list[Any] = [c["_id"] for c in changes if c["audience"] not in plan]
        headers = {"Authorization": f"Bearer {self.token}"}
        async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout), headers=headers
        ) as http:
            for audience, members in plan.items():
                if await self._push(http, audience, members):
                    done.extend(c["_id"] for c in changes if c["audience"] == audience)
        if done:
            await data.mark_audience_changes_synced(done, datetime.now(UTC))

    async def _push(self, http: aiohttp.ClientSession, audience: str, members: dict[str, list[Any]]) -> bool:
        url = f"{self.base_url}/audiences/{audience}/members"
        for op in ("add", "remove"):
            items = members[op]
            for start in range(0, len(items), self.batch_size):
                body = {"add": [], "remove": []} | {op: items[start : start + self.batch_size]}
                try:
                    async with http.post(url, json=body) as resp:
                        if resp.status >= 300:
                            log.warning("ads.sync_failed", audience=audience, status=resp.status)
                            return False
                except (aiohttp.ClientError, TimeoutError) as exc:
                    log.warning("ads.sync_failed", audience=audience, error=type(exc).__name__)
                    return False
                self.synced_members += len(body[op])
        return True

    # Meta's Custom Audiences API

    async def _run_meta(self, data: JobData) -> None:
        """Every mapped audience's adds (`POST`) and removals (`DELETE`) of `/{audience_id}/users`, each
        list as one upload session of batches of at most 10,000 rows. A batch Meta took is marked synced at
        once, so a failure later in the run sends only the rest next time. A refused token, a rate limit or
        Meta unavailable ends the run; after failures in a row the next runs are skipped, doubling."""
        state = self.meta
        now = datetime.now(UTC)
        if state.skip_runs > 0 or (state.resume_at is not None and now < state.resume_at):
            state.skip_runs = max(0, state.skip_runs - 1)
            log.info("ads.meta_backoff", failures=state.failures)
            return
        state.resume_at = None
        state.unmapped = await data.unsynced_audience_counts(sorted(self.audiences))
        if state.unmapped:
            log.warning(
                "ads.meta_unmapped", audiences=sorted(state.unmapped), changes=sum(state.unmapped.values())
            )
        state.received = state.invalid = 0
        refused: dict[str, str] = {}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout)) as http:
            try:
                while await self._meta_page(http, data, refused, now):
                    pass
            except Stop as stop:
                state.refused = refused
                self._stopped(stop)
            else:
                state.refused = refused
                state.token_refused = state.waiting = None
                state.failures = 0
        if problems := self._problems():  # recorded as the job's last error, which every process lists
            raise AdsSyncIncomplete("; ".join(problems))

    async def _meta_page(
        self, http: aiohttp.ClientSession, data: JobData, refused: dict[str, str], now: datetime
    ) -> bool:
        """Reads and sends up to `read_limit` queued changes of the audiences that can be sent (mapped,
        not refused in this run), oldest first: the changes left queued (unmapped, refused) are not read,
        so however many pile up they never crowd out the others. True when there may be more to send."""
        sendable = sorted(a for a in self.audiences if a not in refused)
        if not sendable:
            return False
        changes = await data.unsynced_audience_changes(self.read_limit, sendable)
        plan, nothing_to_send = await self._meta_plan(data, changes)
        if nothing_to_send:
            await data.mark_audience_changes_synced(nothing_to_send, now)
        for audience, ops in plan.items():
            try:
                for op in ("add", "remove"):
                    if ops[op]:
                        await self._upload(http, data, audience, op, ops[op])
            except AudienceRefused as exc:
                refused[audience] = str(exc)
        # A full page is all synced or its audience refused now (a failure stops the run): the next page
        # reads further.
        return len(changes) >= self.read_limit

    async def _meta_plan(
        self, data: JobData, changes: list[dict[str, Any]]
    ) -> tuple[dict[str, dict[str, list[Row]]], list[Any]]:
        """Rows per audience and op (the last change per contact wins; the earlier ones go with it), and
        the changes with nothing to match on (no email or phone), which are done as they are."""
        latest: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for change in changes:
            key = (change["audience"], change["contact_id"])
            latest[key] = [*latest.get(key, []), change]
        contacts = await data.contacts(list({c["contact_id"] for c in changes if "identifiers" not in c}))
        plan: dict[str, dict[str, list[Row]]] = {}
        nothing: list[Any] = []
        for (audience, _), group in latest.items():
            last = group[-1]
            entry = change_member(last, contacts, "meta")
            ids = [c["_id"] for c in group]
            if entry is None:
                nothing.extend(ids)
                continue
            row = Row([entry.get("email_sha256", ""), entry.get("phone_sha256", "")], ids)
            plan.setdefault(audience, {"add": [], "remove": []})[last["op"]].append(row)
        return plan, nothing

    async def _upload(
        self, http: aiohttp.ClientSession, data: JobData, audience: str, op: str, rows: list[Row]
    ) -> None:
        audience_id = self.audiences[audience]
        url = f"{self.graph_url}/{self.api_version}/{audience_id}/users"
        size = min(self.batch_size, META_MAX_USERS)
        batches = [rows[i : i + size] for i in range(0, len(rows), size)]
        session_id = secrets.randbits(62) + 1
        for seq, batch in enumerate(batches, start=1):
            session = {"session_id": session_id, "batch_seq": seq, "last_batch_flag": seq == len(batches),
                       "estimated_num_total": len(rows)}  # fmt: skip
            form = {
                "payload": msgspec.json.encode(
                    {"schema": META_SCHEMA, "data": [r.values for r in batch]}
                ).decode(),
                "session": msgspec.json.encode(session).decode(),
                "access_token": self.access_token,
            }
            method = "POST" if op == "add" else "DELETE"
            answer = await self._call(http, method, url, form, audience)
            received, invalid = _count(answer.get("num_received")), _count(answer.get("num_invalid_entries"))
            self.meta.received += received
            self.meta.invalid += invalid
            self.synced_members += len(batch)
            log.info("ads.meta_batch", audience=audience, op=op, batch_seq=seq, batches=len(batches),
                     rows=len(batch), received=received, invalid=invalid)  # fmt: skip
            await data.mark_audience_changes_synced(
                [i for r in batch for i in r.change_ids], datetime.now(UTC)
            )

    async def _call(
        self, http: aiohttp.ClientSession, method: str, url: str, form: dict[str, str], audience: str
    ) -> dict[str, Any]:
        """Meta's answer to one batch; Stop or AudienceRefused when it did not take it."""
        try:
            async with http.request(method, url, data=form) as resp:
                status = resp.status
                usage = resp.headers.get("X-Business-Use-Case-Usage", "")
                try:
                    body = await resp.json(content_type=None)
                except ValueError:
                    body = None
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("ads.meta_failed", audience=audience, error=type(exc).__name__)
            raise Stop(f"Meta did not answer ({type(exc).__name__})", "transient") from exc
        if status < 300 and isinstance(body, dict) and "error" not in body:
            return body
        error = body.get("error") if isinstance(body, dict) else None
        error = error if isinstance(error, dict) else {}
        code, subcode = error.get("code"), error.get("error_subcode")
        said = f"code {code}" + (f", subcode {subcode}" if subcode else "")
        log.warning("ads.meta_failed", audience=audience, status=status, code=code, subcode=subcode)
        if code in TOKEN_ERRORS:
            raise Stop(f"{error.get('type', 'OAuthException')} {said}", "token")
        if code in RATE_LIMITS:
            raise Stop(f"rate limited by Meta ({said})", "transient", _regain_minutes(usage))
        if status >= 500 or status == 429 or error.get("is_transient") is True or code in TRANSIENT:
            raise Stop(f"Meta unavailable (HTTP {status}, {said})", "transient")
        message = str(error.get("error_user_msg") or error.get("message") or "")[:200]
        raise AudienceRefused(f"HTTP {status}, {said}" + (f": {message}" if message else ""))

    def _problems(self) -> list[str]:
        """What the last run left queued, and why: no identifiers, no token."""
        state = self.meta
        problems = []
        if state.token_refused:
            problems.append(f"access token refused by Meta ({state.token_refused}): changes kept queued")
        if state.unmapped:
            names = ", ".join(f"{k} ({n} queued)" for k, n in sorted(state.unmapped.items()))
            problems.append(f"no Meta custom audience id in channels.ads.audiences for: {names}")
        for audience, why in sorted(state.refused.items()):
            problems.append(f"Meta refused audience {audience}: {why}; its changes kept queued")
        if state.waiting:
            problems.append(state.waiting)
        return problems

    def _stopped(self, stop: Stop) -> None:
        state = self.meta
        if stop.kind == "token":
            state.token_refused = stop.why
            return
        state.failures += 1
        state.skip_runs = min(2 ** (state.failures - 1) - 1, MAX_BACKOFF_RUNS)
        if stop.wait_minutes > 0:
            state.resume_at = datetime.now(UTC) + timedelta(minutes=stop.wait_minutes)
        state.waiting = (
            f"{stop.why}: {state.failures} failed run(s) in a row, "
            f"{state.skip_runs} next run(s) skipped; changes kept queued"
        )


def _count(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _regain_minutes(header: str) -> float:
    """Meta's `estimated_time_to_regain_access` (minutes) from `X-Business-Use-Case-Usage`, 0 if none."""
    try:
        usage = msgspec.json.decode(header) if header else {}
    except msgspec.DecodeError:
        return 0.0
    minutes = [
        float(entry.get("estimated_time_to_regain_access") or 0)
        for entries in (usage.values() if isinstance(usage, dict) else [])
        if isinstance(entries, list)
        for entry in entries
        if isinstance(entry, dict)
    ]
    return max(minutes, default=0.0)


@hookimpl
def register_jobs(register: Callable[[Job], None], config: Callable[[str], dict[str, Any]]) -> None:
    """The hourly audience sync, configured from [channels.ads]."""
    register(AudienceSync(config("ads")))
