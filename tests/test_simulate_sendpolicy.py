"""`POST /v1/simulate` and `rulesvc simulate` apply the live send rules: consent, reachability,
suppression after a bounce or a block, quiet hours in the contact's zone, fallback and caps.

The app loads the real channel plugins, configured just enough to count as configured (a simulation
sends nothing), so the reasons are the plugins' own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec

from rulesvc.config import Settings
from rulesvc.web.app import create_app
from tests.helpers import at, send, setup

ACCOUNT = {"project_id": "shop", "client_email": "push@shop.example", "private_key": "unused in a simulation",
           "token_uri": "http://127.0.0.1:9/token"}  # fmt: skip
CHANNELS = {
    "push": {"service_account_json": json.dumps(ACCOUNT)},
    "email": {"host": "127.0.0.1", "from": "shop@example.com"},
}
ANN = {"contact_id": "ann", "email": "ann@example.com", "push_tokens": ["tok-1"],
       "consent": {"push": True, "email": True}, "timezone": "Europe/Berlin"}  # fmt: skip


def go(event_id: str, contact: str = "ann", time: str | None = None, **attributes: Any) -> dict[str, Any]:
    return {
        "id": event_id,
        "type": "go",
        "contact_id": contact,
        "time": time or at(),
        "attributes": attributes,
    }


def outcome(
    event_id: str, kind: str, minutes: float, contact: str = "ann", **attributes: Any
) -> dict[str, Any]:
    return {"id": event_id, "type": f"message_{kind}", "contact_id": contact, "time": at(minutes=minutes),
            "attributes": attributes}  # fmt: skip


async def simulate(
    make_client: Any,
    settings: Settings,
    sends: list[dict[str, Any]],
    events: list[dict[str, Any]],
    contacts: list[dict[str, Any]],
    **changes: Any,
) -> list[dict[str, Any]]:
    app = create_app(setup(settings, sends, channels=CHANNELS, **changes))
    client = await make_client(app)
    resp = await client.post("/v1/simulate", json={"events": events, "contacts": contacts})
    assert resp.status == 200, await resp.text()
    return list((await resp.json())["actions"])


def seen(actions: list[dict[str, Any]]) -> list[tuple[str, str, str, str | None]]:
    """Each action with its reason as `code: detail`, so both are checked."""
    return [(a["at"], a["channel"], a["status"], a.get("reason") and f"{a['reason']}: {a['detail']}")
            for a in actions]  # fmt: skip


async def test_marketing_push_without_push_consent_is_suppressed(
    make_client: Any, settings: Settings
) -> None:
    no_consent = {**ANN, "consent": {"email": True}}
    actions = await simulate(make_client, settings, [send("push")], [go("g")], [no_consent])
    assert seen(actions) == [(at(), "push", "suppressed", "no_consent: push: no marketing consent")]


async def test_push_without_a_token_is_suppressed(make_client: Any, settings: Settings) -> None:
    no_token = {**ANN, "push_tokens": []}
    actions = await simulate(make_client, settings, [send("push")], [go("g")], [no_token])
    assert seen(actions) == [(at(), "push", "suppressed", "unreachable: push: no push token")]


async def test_transactional_needs_no_marketing_consent(make_client: Any, settings: Settings) -> None:
    nobody = {**ANN, "consent": {}}
    actions = await simulate(make_client, settings, [send("push", transactional=True)], [go("g")], [nobody])
    assert seen(actions) == [(at(), "push", "sent", None)]


async def test_email_after_a_bounce_is_suppressed(make_client: Any, settings: Settings) -> None:
    first = await simulate(make_client, settings, [send("email")], [go("g1")], [ANN])
    assert seen(first) == [(at(), "email", "sent", None)]
    events = [
        go("g1"),
        outcome(
            "b", "bounced", 1, message_id=first[0]["message_id"]
        ),  # names the message, as a provider does
        go("g2", time=at(minutes=2)),
    ]
    actions = await simulate(make_client, settings, [send("email")], events, [ANN])
    assert seen(actions) == [
        (at(), "email", "sent", None),
        (at(minutes=2), "email", "suppressed", "unreachable: email: email address marked invalid (bounced)"),
    ]


async def test_email_after_the_contact_blocked_email_is_suppressed(
    make_client: Any, settings: Settings
) -> None:
    events = [go("g1"), outcome("b", "blocked", 1, channel="email"), go("g2", time=at(minutes=2))]
    actions = await simulate(make_client, settings, [send("email"), send("push")], events, [ANN])
    assert seen(actions) == [
        (at(), "email", "sent", None),
        (at(), "push", "sent", None),
        (at(minutes=2), "email", "suppressed", "suppression_list: email: contact is on the suppression list"),
        (at(minutes=2), "push", "sent", None),  # only email was blocked
    ]


async def test_quiet_hours_postpone_to_the_end_of_the_window_in_the_contacts_zone(
    make_client: Any, settings: Settings
) -> None:
    late = "2026-11-20T22:30:00Z"  # 23:30 in Berlin; in New York 17:30
    events = [go("g1", time=late), go("g2", contact="bob", time=late)]
    bob = {**ANN, "contact_id": "bob", "timezone": "America/New_York"}
    actions = await simulate(
        make_client, settings, [send("push")], events, [ANN, bob], quiet_hours="21:00-08:00"
    )
    assert [(a["contact_id"], a["at"], a["status"], a.get("postponed_to")) for a in actions] == [
        ("ann", late, "postponed", "2026-11-21T07:00:00Z"),  # 08:00 in Berlin
        ("bob", late, "sent", None),
        ("ann", "2026-11-21T07:00:00Z", "sent", None),
    ]
    assert (actions[0]["reason"], actions[0]["detail"]) == (
        "quiet_hours",
        "quiet hours in the contact's time zone",
    )


async def test_a_fallback_is_used_when_the_first_channel_cannot_reach_the_contact(
    make_client: Any, settings: Settings
) -> None:
    no_token = {**ANN, "push_tokens": []}
    actions = await simulate(make_client, settings, [send("push", fallback=["email"])], [go("g")], [no_token])
    assert seen(actions) == [(at(), "email", "sent", None)]
    neither = {**no_token, "email": None}
    actions = await simulate(make_client, settings, [send("push", fallback=["email"])], [go("g")], [neither])
    assert seen(actions) == [
        (at(), "push", "suppressed", "unreachable: push: no push token; email: no email address")
    ]


async def test_caps_count_what_the_simulation_sent_per_local_day(
    make_client: Any, settings: Settings
) -> None:
    auckland = {**ANN, "timezone": "Pacific/Auckland"}
    times = ["2026-11-20T09:00:00Z", "2026-11-20T10:00:00Z", "2026-11-20T11:30:00Z"]  # 22:00, 23:00, 00:30
    events = [go(f"g{i}", time=t) for i, t in enumerate(times)]
    actions = await simulate(
        make_client, settings, [send("push")], events, [auckland], frequency_caps={"push": 1}
    )
    assert [(a["at"], a["status"], a.get("reason"), a.get("detail")) for a in actions] == [
        (times[0], "sent", None, None),
        (times[1], "suppressed", "frequency_cap", "frequency cap: 1 push message(s) a day reached"),
        (times[2], "sent", None, None),  # a new day in Auckland
    ]


async def test_contacts_not_given_are_reached_on_nothing_that_needs_an_address(
    make_client: Any, settings: Settings
) -> None:
    events = [go("g", contact="stranger")]
    actions = await simulate(
        make_client, settings, [send("inapp"), send("push", transactional=True)], events, []
    )
    assert seen(actions) == [
        (at(), "inapp", "sent", None),
        (at(), "push", "suppressed", "unreachable: push: no push token"),
    ]


def test_the_cli_applies_the_same_send_rules(tmp_path: Path, settings: Settings) -> None:
    folder = setup(
        msgspec.structs.replace(settings, rulesets_dir=str(tmp_path / "rulesets")),
        [send("push", fallback=["email"]), send("email")],
    ).rulesets_dir
    events = tmp_path / "events.ndjson"
    events.write_text("\n".join(json.dumps(e) for e in [go("g"), go("h", contact="cid")]))
    contacts = tmp_path / "contacts.ndjson"
    contacts.write_text(json.dumps({**ANN, "push_tokens": []}) + "\n" + json.dumps({"contact_id": "cid"}))
    env = {**os.environ, "RULESVC_QUIET_HOURS": "", "RULESVC_CHANNEL_EMAIL_HOST": "127.0.0.1",
           "RULESVC_CHANNEL_EMAIL_FROM": "s@shop.example",
           "RULESVC_CHANNEL_PUSH_SERVICE_ACCOUNT_JSON": json.dumps(ACCOUNT)}  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "rulesvc", "simulate", str(events), "--rulesets", folder, "--json",
         "--contacts", str(contacts)], capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    actions = json.loads(result.stdout)["actions"]
    assert [
        (a["contact_id"], a["channel"], a["status"], a.get("reason"), a.get("detail")) for a in actions
    ] == [
        ("ann", "email", "sent", None, None),  # push has no token: its fallback
        ("ann", "email", "sent", None, None),
        (
            "cid",
            "push",
            "suppressed",
            "no_consent",
            "push: no marketing consent; email: no marketing consent",
        ),
        ("cid", "email", "suppressed", "no_consent", "email: no marketing consent"),
    ]
