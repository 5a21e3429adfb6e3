"""Quiet hours hold back only channels that interrupt (email, SMS, push, web push); an in-app entry or a
log line disturbs nobody and goes out at once. Each channel can be switched with `quiet_hours`."""

from __future__ import annotations

import zoneinfo
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from rulesvc.config import ConfigError, Settings, load_settings
from rulesvc.web.app import create_app
from tests.helpers import PROFILE, Provider, eventually, go, history, registry, send, setup

QUIET_REASON = "quiet_hours"


def quiet_now(settings: Settings, **changes: Any) -> Settings:
    """A quiet window around now in the contact's zone, and one marketing send per channel."""
    local = datetime.now(UTC).astimezone(zoneinfo.ZoneInfo("Asia/Kolkata"))
    window = f"{(local - timedelta(hours=1)):%H:%M}-{(local + timedelta(hours=2)):%H:%M}"
    return setup(settings, [send("push"), send("inapp"), send("log")], quiet_hours=window, **changes)


async def outcomes(client: Any) -> dict[str, tuple[str, str | None]]:
    async def decided() -> bool:
        msgs = await history(client)
        return len(msgs) == 3 and all(m["status"] != "scheduled" or m.get("reason") for m in msgs)

    await eventually(decided)
    return {m["channel"]: (m["status"], m.get("reason")) for m in await history(client)}


async def test_only_interrupting_channels_wait_for_the_end_of_quiet_hours(
    make_client: Any, settings: Settings
) -> None:
    push = Provider("push", needs="push_tokens")
    client = await make_client(create_app(quiet_now(settings), registry(push)))
    await client.put(
        "/v1/contacts/c1", json={**PROFILE, "consent": {"push": True}, "timezone": "Asia/Kolkata"}
    )
    await go(client)
    assert await outcomes(client) == {
        "push": ("scheduled", QUIET_REASON),  # postponed to the end of the window
        "inapp": ("sent", None),
        "log": ("sent", None),
    }
    assert push.delivered == []


async def test_quiet_hours_can_be_switched_per_channel(make_client: Any, settings: Settings) -> None:
    push = Provider("push", needs="push_tokens")
    channels = {"push": {"quiet_hours": False}, "inapp": {"quiet_hours": "true"}}
    client = await make_client(create_app(quiet_now(settings, channels=channels), registry(push)))
    await client.put(
        "/v1/contacts/c1", json={**PROFILE, "consent": {"push": True}, "timezone": "Asia/Kolkata"}
    )
    await go(client)
    assert await outcomes(client) == {
        "push": ("sent", None),
        "inapp": ("scheduled", QUIET_REASON),
        "log": ("sent", None),
    }


def test_a_quiet_hours_switch_must_be_yes_or_no() -> None:
    """A typo fails at start-up, not silently as "quiet hours on" at 3 a.m."""
    load_settings(environ={"RULESVC_CHANNEL_SMS_QUIET_HOURS": "false"})
    with pytest.raises(
        ConfigError, match=r"channels\.sms\.quiet_hours must be true or false, got 'sometimes'"
    ):
        load_settings(environ={"RULESVC_CHANNEL_SMS_QUIET_HOURS": "sometimes"})
