"""Ads audiences: the `audience` action queues changes; this job sends them in batches, hourly.

Settings ([channels.ads] or RULESVC_CHANNEL_ADS_*): see `AdsSettings`.

Each run collapses the queued changes (the last change of a contact in an audience wins), and sends
`POST {base_url}/audiences/{audience}/members` with `{"add": [...], "remove": [...]}`, each member as
SHA-256 hex digests of identifiers normalised the way the `platform` setting's ad platform matches them
(a digest of any other spelling never matches): email trimmed and lower-cased everywhere; phone as E.164
(`+` and digits) for Google Customer Match and `generic`, digits only with the country code for Meta.
No plain identifier leaves the service. Changes stay queued when the provider fails and go with the
next run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar

import aiohttp
import structlog
from msgspec import Meta

from rulesvc import hookimpl
from rulesvc.channels import AUDIENCE_SYNC, Job, PluginSettings, read_settings
from rulesvc.core.audiences import Platform, hashed_identifiers, member_for
from rulesvc.store.jobs import JobData

log = structlog.get_logger(__name__)


def member(contact: dict[str, Any], platform: Platform = "generic") -> dict[str, str] | None:
    identifiers = hashed_identifiers(
        contact.get("email"), contact.get("phone"), bool(contact.get("email_invalid"))
    )
    return member_for(identifiers, platform)


class AdsSettings(PluginSettings):
    """Queued audience changes sent in batches, each member as SHA-256 digests of email and phone."""

    required: ClassVar[tuple[str | tuple[str, ...], ...]] = ("base_url", "token")

    base_url: Annotated[
        str, Meta(description="the provider's API; changes go to `{base_url}/audiences/{audience}/members`")
    ] = ""
    token: Annotated[str, Meta(description="the bearer token the provider gave")] = ""
    interval: Annotated[float, Meta(gt=0, description="seconds between syncs")] = 3600.0
    batch_size: Annotated[int, Meta(ge=1, description="members per request")] = 10_000
    timeout: Annotated[float, Meta(gt=0, description="seconds a sync's requests may take in all")] = 60.0
    platform: Annotated[
        Platform,
        Meta(
            description="whose matching rules the hashed phone numbers follow: `meta` (digits with the "
            "country code, no `+`), `google` (E.164: `+` and digits), `generic` (E.164); email is trimmed "
            "and lower-cased for all"
        ),
    ] = "generic"


class AudienceSync:
    name = "ads-audience-sync"
    kind = AUDIENCE_SYNC
    settings_name = "ads"
    settings_type = AdsSettings

    def __init__(self, config: Mapping[str, Any] | AdsSettings) -> None:
        settings = read_settings("ads", config, AdsSettings, type(self))
        self.base_url = settings.base_url.rstrip("/")
        self.token = settings.token
        self.interval = settings.interval
        self.batch_size = settings.batch_size
        self.timeout = settings.timeout
        self.platform = settings.platform
        self.synced_members = 0

    def configured(self) -> bool:
        return bool(self.base_url and self.token)

    def status(self) -> tuple[bool, str]:
        missing = [k for k in ("base_url", "token") if not getattr(self, k)]
        if missing:
            return False, f"missing setting(s): {', '.join(missing)}"
        return True, f"syncs to {self.base_url} every {self.interval:g} s ({self.platform} matching)"

    async def run(self, data: JobData) -> None:
        if not self.configured():
            return
        changes = await data.unsynced_audience_changes(100_000)
        if not changes:
            return
        latest: dict[tuple[str, str], dict[str, Any]] = {}
        for change in changes:  # in time order: the last change per audience and contact wins
            latest[(change["audience"], change["contact_id"])] = change
        ids = list({c["contact_id"] for c in changes})
        contacts = await data.contacts(ids)
        plan: dict[str, dict[str, list[dict[str, str]]]] = {}
        for (audience, contact_id), change in latest.items():
            entry = member(contacts.get(contact_id, {}), self.platform)
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


@hookimpl
def register_jobs(register: Callable[[Job], None], config: Callable[[str], dict[str, Any]]) -> None:
    """The hourly audience sync, configured from [channels.ads]."""
    register(AudienceSync(config("ads")))
