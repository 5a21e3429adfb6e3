"""The live service and `POST /v1/simulate` decide the same: the same contacts and events through both
give the same messages per contact, rule, channel, status and reason.

Both run in one app with one set of channels (providers that record what they deliver and check
reachability as the real plugins do): the live side through `POST /v1/events`, MongoDB, the inbox and
the dispatcher; the simulated side through the simulator process. The contacts are a table of the cases
that matter (consent, reachability, a cap, fallback, a bounce, a block) plus seeded random ones.
"""

from __future__ import annotations

import random
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from rulesvc.config import Settings
from rulesvc.core.sendpolicy import QUIET_REASON
from rulesvc.web.app import create_app
from tests.helpers import Provider, eventually, history, registry, send, setup

SENDS = [
    send("push", "promo", fallback=["email"]),
    send("sms", "promo"),
    send("email", "receipt", transactional=True),
]
CAPS = {"push": 2, "email": 2, "sms": 1}
ROUNDS = 3  # `go` events per contact, each round settled before the next

# (contact, profile, outcome after the first round: None or (kind, channel))
TABLE: list[tuple[str, dict[str, Any], tuple[str, str] | None]] = [
    ("all", {"email": "a@example.com", "push_tokens": ["t"], "phone": "+4915112345678",
             "consent": {"push": True, "email": True, "sms": True}}, None),  # caps: push 2, sms 1
    ("no-consent", {"email": "b@example.com", "push_tokens": ["t"], "phone": "+4915112345679"}, None),
    ("no-token", {"email": "c@example.com", "consent": {"push": True, "email": True}}, None),  # fallback
    ("nothing", {"consent": {"push": True, "email": True, "sms": True}}, None),
    ("bounced", {"email": "d@example.com", "consent": {"email": True}}, ("bounced", "email")),
    ("blocked", {"email": "e@example.com", "push_tokens": ["t"], "consent": {"push": True, "email": True}},
     ("blocked", "push")),
]  # fmt: skip


def random_contacts(seed: int, count: int) -> list[tuple[str, dict[str, Any], tuple[str, str] | None]]:
    rng = random.Random(seed)
    found = []
    for i in range(count):
        profile: dict[str, Any] = {
            "consent": {c: True for c in ("push", "email", "sms") if rng.random() < 0.6}
        }
        if rng.random() < 0.7:
            profile["email"] = f"r{i}@example.com"
        if rng.random() < 0.5:
            profile["push_tokens"] = [f"t{i}"]
        if rng.random() < 0.4:
            profile["phone"] = f"+49151{i:08d}"
        news = rng.choice([None, None, ("bounced", "email"), ("blocked", "push"), ("blocked", "email")])
        found.append((f"r{i}", profile, news))
    return found


def midday_zone(now: datetime) -> str:
    """A zone where it is around noon now, so that no local day ends during the test (caps count per day)."""
    offset = 12 - now.hour
    offset = offset - 24 if offset > 14 else offset
    return "Etc/GMT" if offset == 0 else f"Etc/GMT{-offset:+d}"


def templates(folder: Path) -> None:
    for name in ("promo", "receipt"):
        for part, text in (("subject", "Hi"), ("text", "Hello"), ("title", "Hi"), ("body", "Hello")):
            (folder / "templates" / f"{name}.{part}").write_text(text)


def decided(messages: list[dict[str, Any]]) -> Counter[tuple[str, str, str | None, str | None, str | None]]:
    """The reason code and its detail both: the codes are what dashboards count, the details say which
    channel failed how."""
    return Counter(
        (m["template"], m["status"], m["channel"], m.get("reason"), m.get("detail")) for m in messages
    )


async def test_live_and_simulated_sends_are_the_same(make_client: Any, settings: Settings) -> None:
    providers = [Provider("push", needs="push_tokens"), Provider("email", needs="email"),
                 Provider("sms", needs="phone")]  # fmt: skip
    app = create_app(setup(settings, SENDS, frequency_caps=CAPS), registry(*providers))
    templates(Path(settings.rulesets_dir))
    client = await make_client(app)
    now = datetime.now(UTC)
    zone = midday_zone(now)
    contacts = [*TABLE, *random_contacts(13, 10)]
    for cid, profile, _ in contacts:
        assert (await client.put(f"/v1/contacts/{cid}", json={**profile, "timezone": zone})).status in (
            200,
            201,
        )

    start = now - timedelta(minutes=5)
    events: list[dict[str, Any]] = []
    for round_ in range(ROUNDS):
        at = (start + timedelta(seconds=10 * round_)).isoformat()
        batch = [{"id": f"go-{cid}-{round_}", "type": "go", "contact_id": cid, "time": at,
                  "attributes": {"code": "X"}} for cid, _, _ in contacts]  # fmt: skip
        if round_ == 1:  # the bad news arrives before the second round
            news_at = (start + timedelta(seconds=5)).isoformat()
            batch[:0] = [{"id": f"news-{cid}", "type": f"message_{news[0]}", "contact_id": cid,
                          "time": news_at, "attributes": {"channel": news[1]}}
                         for cid, _, news in contacts if news]  # fmt: skip
        events.extend(batch)
        assert (await client.post("/v1/events", json=batch)).status == 202
        expected = len(SENDS) * (round_ + 1)

        async def settled(expected: int = expected) -> bool:
            for cid, _, _ in contacts:
                msgs = await history(client, cid)
                if len(msgs) < expected or any(m["status"] in ("scheduled", "sending") for m in msgs):
                    return False
            return True

        await eventually(settled)

    body = {
        "events": events,
        "contacts": [{"contact_id": cid, **p, "timezone": zone} for cid, p, _ in contacts],
    }
    resp = await client.post("/v1/simulate", json=body)
    assert resp.status == 200, await resp.text()
    simulated: dict[str, list[dict[str, Any]]] = {}
    for action in (await resp.json())["actions"]:
        simulated.setdefault(action["contact_id"], []).append(action)

    statuses: Counter[str] = Counter()
    for cid, _, _ in contacts:
        live = [{**m, "channel": m.get("sent_channel") or m["channel"]} if m["status"] == "sent" else m
                for m in await history(client, cid)]  # fmt: skip
        # A suppression after the channel was chosen (a cap) names the chosen channel in the simulation
        # and the message's own channel in the history: compare the reasons there.
        sim = [{**a, "channel": a["channel"] if a["status"] == "sent" else None} for a in simulated[cid]]
        live = [{**m, "channel": m["channel"] if m["status"] == "sent" else None} for m in live]
        assert decided(live) == decided(sim), cid
        statuses.update(m["status"] for m in live)
    delivered = sum(len(p.delivered) for p in providers)
    assert delivered == statuses["sent"]
    assert statuses["sent"] and statuses["suppressed"]  # both kinds happened
    codes = {m.get("reason") for cid, _, _ in contacts for m in await history(client, cid)}
    assert {"no_consent", "unreachable", "frequency_cap"} <= codes  # each rule spoke


def test_the_table_covers_every_rule() -> None:
    """Consent, reachability, fallback, a cap, a bounce and a block each have a contact of their own."""
    names = [cid for cid, _, _ in TABLE]
    assert names == ["all", "no-consent", "no-token", "nothing", "bounced", "blocked"]
    assert ROUNDS > CAPS["sms"] and ROUNDS > CAPS["push"]


async def test_live_and_simulated_quiet_hours_postpone_to_the_same_moment(
    make_client: Any, settings: Settings
) -> None:
    """A quiet window around now in one contact's zone: live, the message stays `scheduled` with a new
    `due_at`; simulated, it is `postponed` to the same moment and sent then. Another zone is not quiet."""
    now = datetime.now(UTC)
    local = now.astimezone(ZoneInfo("Asia/Kolkata"))
    window = f"{(local - timedelta(hours=1)):%H:%M}-{(local + timedelta(hours=2)):%H:%M}"
    push = Provider("push", needs="push_tokens")
    app = create_app(setup(settings, [send("push")], quiet_hours=window), registry(push))
    client = await make_client(app)
    zones = {"ann": "Asia/Kolkata", "bob": "Etc/GMT+7"}  # 12.5 hours apart: outside the 3-hour window
    profile = {"push_tokens": ["t"], "consent": {"push": True}}
    for cid, zone in zones.items():
        await client.put(f"/v1/contacts/{cid}", json={**profile, "timezone": zone})
    at = now.isoformat()
    events = [{"id": f"go-{cid}", "type": "go", "contact_id": cid, "time": at, "attributes": {"code": "X"}}
              for cid in zones]  # fmt: skip
    assert (await client.post("/v1/events", json=events)).status == 202

    async def decided() -> bool:
        msgs = [m for cid in zones for m in await history(client, cid)]
        return len(msgs) == 2 and all(m["status"] == "sent" or m.get("reason") for m in msgs)

    await eventually(decided)
    [ann] = await history(client, "ann")
    [bob] = await history(client, "bob")
    assert (ann["status"], ann["reason"], ann["detail"], bob["status"]) == (
        "scheduled",
        "quiet_hours",
        QUIET_REASON,
        "sent",
    )

    contacts = [{"contact_id": cid, **profile, "timezone": zone} for cid, zone in zones.items()]
    resp = await client.post("/v1/simulate", json={"events": events, "contacts": contacts})
    actions = (await resp.json())["actions"]
    assert [(a["contact_id"], a["status"]) for a in actions] == [
        ("ann", "postponed"),
        ("bob", "sent"),
        ("ann", "sent"),
    ]
    assert (actions[0]["reason"], actions[0]["detail"]) == ("quiet_hours", QUIET_REASON)
    assert datetime.fromisoformat(actions[0]["postponed_to"]) == datetime.fromisoformat(ann["due_at"])
    assert datetime.fromisoformat(actions[2]["at"]) == datetime.fromisoformat(ann["due_at"])
