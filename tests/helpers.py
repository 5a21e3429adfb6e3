"""What many tests share, in one place: rulesets built in a temporary folder and run through the engine
as the service would (the simulator), a scripted channel provider, posting `go` events and waiting for
messages to settle, and `eventually`, which waits on a condition instead of the clock."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import web
from prometheus_client.mmap_dict import MmapedDict

from rulesvc.channels import ChannelRegistry, Delivery, OutboundMessage, Outcome
from rulesvc.config import Settings
from rulesvc.plugins import builtin_channels
from rulesvc.replay.simulate import SimAction, SimulateRequest, simulate
from rulesvc.runtime.rulesets import Rulesets
from rulesvc.web.app import create_app

T0 = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)


def at(**delta: float) -> str:
    return (T0 + timedelta(**delta)).isoformat().replace("+00:00", "Z")


def an_hour_ago() -> datetime:
    """A time for stored events that a store's events TTL (a day in some tests) keeps, whatever day the
    suite runs on, unlike T0."""
    return datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)


def yesterday_at(hour: int) -> datetime:
    """A fixed time of day for data the store keeps by age (events 90 days, messages a year): a calendar
    date written into a test would expire under it some day, and the test fail then."""
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return today - timedelta(days=1) + timedelta(hours=hour)


def write_ruleset(directory: Path, name: str, body: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    path.write_text(json.dumps(body))
    return path


def load(directory: Path) -> Rulesets:
    rulesets = Rulesets(directory, builtin_channels().names())
    rulesets.reload()
    assert not rulesets.errors(), rulesets.errors()
    return rulesets


def run(
    rulesets: Rulesets,
    events: list[dict[str, Any]],
    contacts: list[dict[str, Any]] | None = None,
    until: str | None = None,
) -> list[SimAction]:
    request = msgspec.convert(
        {"events": events, "contacts": contacts or [], **({"until": until} if until else {})},
        SimulateRequest,
    )
    return simulate(rulesets.engine(), request).actions


def sent(actions: list[SimAction]) -> list[tuple[str, str, str | None, str]]:
    """(contact, rule, channel, time) of every message that went out."""
    return [
        (a.contact_id, a.rule, a.channel, a.at.isoformat().replace("+00:00", "Z"))
        for a in actions
        if a.status == "sent"
    ]


def event(
    event_id: str, type_: str, contact: str = "c1", minutes: float = 0, **attributes: Any
) -> dict[str, Any]:
    return {
        "id": event_id,
        "type": type_,
        "contact_id": contact,
        "time": at(minutes=minutes),
        "attributes": attributes,
    }


# Waiting on conditions. A loaded machine may be slow by seconds, so a deadline is only where a test gives
# up: generous, and the failure names what was awaited. Never sleep and then assert.

WAIT_SECONDS = 60.0


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = WAIT_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            name = getattr(check, "__name__", repr(check))
            raise AssertionError(f"condition `{name}` not reached in {timeout:g} s")
        await asyncio.sleep(0.05)


def wait_for(check: Callable[[], Any], timeout: float = WAIT_SECONDS, what: str = "") -> Any:
    """`eventually` for tests that drive real processes from synchronous code; returns what `check`
    found (its first truthy answer)."""
    deadline = time.monotonic() + timeout
    while not (found := check()):
        if time.monotonic() > deadline:
            name = what or getattr(check, "__name__", repr(check))
            raise AssertionError(f"not reached in {timeout:g} s: {name}")
        time.sleep(0.05)
    return found


# Orders, for process-level tests that count what reaches a provider: one message per order.


def order_flow(folder: Path, channel: str, templates: dict[str, str], count: bool = False) -> Path:
    """A ruleset folder in `folder`: each `order` event sends `order` on `channel` a second later, one
    message per `attributes.n`; `count` also counts the orders per contact (`state.counters.orders`)."""
    rulesets = folder / "rulesets"
    (rulesets / "templates").mkdir(parents=True)
    for name, text in templates.items():
        (rulesets / "templates" / name).write_text(text)
    send = {"channel": channel, "template": "order", "after": "1s", "transactional": True,
            "per": "attributes.n", "params": {"n": "$attributes.n"}}  # fmt: skip
    then: list[dict[str, Any]] = [{"count": "orders"}] if count else []
    rule = {"name": "on_order", "when": {"event": "order"}, "then": [*then, {"send": send}]}
    (rulesets / "orders.json").write_text(json.dumps({"rules": [rule]}))
    return rulesets


# The send pipeline, live: a scripted provider, a one-rule ruleset on `go` events, waiting for messages.

TEMPLATES = {
    "hello.subject": "Hello {{ contact.attributes.first_name | default('there') }}",
    "hello.text": "Your code is {{ params.code }}.",
    "hello.title": "Hello",
    "hello.body": "Code {{ params.code }}",
    "evil.body": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "broken.body": "{{ params.missing.deeper }}",
}

PROFILE = {"email": "ann@example.com", "push_tokens": ["tok-1"], "attributes": {"first_name": "Ann"}}


class Provider:
    """A channel plugin as a test installs it: reachability like the real ones, scripted answers."""

    def __init__(self, name: str, needs: str | None = None, deduplicates: bool = False) -> None:
        self.name = name
        self.needs = needs
        self.deduplicates = deduplicates
        self.delivered: list[OutboundMessage] = []
        self.keys_seen: list[str] = []
        self.script: list[Delivery] = []  # answers to give, in order; then "sent"
        self.hang = asyncio.Event()
        self.hanging = False

    def status(self) -> tuple[bool, str]:
        return True, "test provider"

    def reachable(self, contact: dict[str, Any]) -> str | None:
        if self.needs == "email" and (not contact.get("email") or contact.get("email_invalid")):
            return "no valid email address"
        if self.needs and self.needs != "email" and not contact.get(self.needs):
            return f"no {self.needs}"
        return None

    async def send(self, message: OutboundMessage) -> Delivery:
        self.keys_seen.append(message.message_id)
        if self.hanging:
            self.delivered.append(message)  # the provider got it ...
            await self.hang.wait()  # ... and the process dies before it hears back
        if self.deduplicates and message.message_id in {m.message_id for m in self.delivered}:
            return Delivery("sent", provider_id=f"p-{message.message_id}")  # de-duplicated by the key
        answer = (
            self.script.pop(0) if self.script else Delivery("sent", provider_id=f"p-{message.message_id}")
        )
        if answer.status == "sent":
            self.delivered.append(message)
        return answer

    async def callback(self, request: web.Request) -> list[Outcome]:
        if request.headers.get("X-Provider-Token") != "s3cret":
            raise web.HTTPUnauthorized(text="bad provider signature")
        body = await request.json()
        return [Outcome(status=body["status"], provider_id=body["id"])]


def registry(*providers: Provider) -> ChannelRegistry:
    channels = builtin_channels()
    for p in providers:
        channels.register(p)
    return channels


def setup(settings: Settings, sends: list[dict[str, Any]], **changes: Any) -> Settings:
    folder = Path(settings.rulesets_dir)
    (folder / "templates").mkdir(parents=True, exist_ok=True)
    for name, text in TEMPLATES.items():
        (folder / "templates" / name).write_text(text)
    write_ruleset(folder, "flow", {"rules": [{"name": "go", "when": {"event": "go"}, "then": sends}]})
    return msgspec.structs.replace(settings, **changes)


def send(channel: str, template: str = "hello", **extra: Any) -> dict[str, Any]:
    return {
        "send": {"channel": channel, "template": template, "params": {"code": "$attributes.code"}, **extra}
    }


async def go(client: Any, contact: str = "c1", n: int = 1, **attributes: Any) -> None:
    events = [{"id": f"go-{contact}-{i}-{datetime.now().timestamp()}", "type": "go", "contact_id": contact,
               "attributes": {"code": "X1", **attributes}} for i in range(n)]  # fmt: skip
    assert (await client.post("/v1/events", json=events)).status == 202


async def history(client: Any, contact: str = "c1") -> list[dict[str, Any]]:
    return list(reversed((await (await client.get(f"/v1/contacts/{contact}/messages")).json())["messages"]))


async def settled(client: Any, contact: str = "c1", count: int = 1) -> list[dict[str, Any]]:
    async def settled_messages() -> bool:
        msgs = await history(client, contact)
        return len(msgs) >= count and all(m["status"] not in ("scheduled", "sending") for m in msgs)

    await eventually(settled_messages)
    return await history(client, contact)


def message_doc(mid: str, contact: str, channel: str, due: datetime, **fields: Any) -> dict[str, Any]:
    """A message as the service stores it, for tests that plant one."""
    return {"_id": mid, "contact_id": contact, "ruleset": "flow", "rule": "go", "channel": channel,
            "template": "hello", "status": "scheduled", "created_at": due, "due_at": due,
            "params": {"code": "X1"}, "transactional": True, "fallback": [], **fields}  # fmt: skip


def entry_doc(message: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """The schedule entry that sends `message`."""
    keep = ("channel", "template", "params", "transactional", "fallback")
    return {"_id": message["_id"], "contact_id": message["contact_id"], "ruleset": "flow", "rule": "go",
            "key": message["_id"], "due_at": message["due_at"], "created_at": message["due_at"],
            "cancel_on": [], "status": "pending", "message": {k: message.get(k) for k in keep},
            **fields}  # fmt: skip


# Hot reload: a one-rule ruleset `greet.json` on `t` events, its templates `v0`..`v10`.


def ruleset(template: str, event: str = "t") -> dict[str, Any]:
    return {
        "rules": [
            {
                "name": "say",
                "when": {"event": event},
                "then": [{"send": {"channel": "log", "template": template}}],
            }
        ]
    }


def write(path: Path, body: dict[str, Any] | str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(body if isinstance(body, str) else json.dumps(body))
    tmp.replace(path)  # as editors save: the watcher sees one complete file


def write_templates(folder: Path) -> None:
    (folder / "templates").mkdir()
    for n in range(11):
        (folder / "templates" / f"v{n}.body").write_text(f"version {n}")


async def serve_greet(make_client: Any, settings: Settings, template: str) -> tuple[Path, Any]:
    """The service with one ruleset, `greet.json`, sending `template`; returns its path and a client."""
    folder = Path(settings.rulesets_dir)
    folder.mkdir(parents=True)
    write_templates(folder)
    path = folder / "greet.json"
    write(path, ruleset(template))
    return path, await make_client(create_app(settings))


def stopped(pid: int) -> bool:
    """Every thread of `pid` is stopped (state T): SIGSTOP reaches a busy multi-threaded process's
    threads one by one, and on a loaded machine the last may still answer a request for a moment."""
    tasks = Path(f"/proc/{pid}/task")
    states = [(task / "stat").read_text().rpartition(")")[2].split()[0] for task in tasks.iterdir()]
    return bool(states) and all(state in ("T", "t") for state in states)


def counts_per_worker(metrics_dir: Path, metric: str, *needles: str) -> dict[str, float]:
    """Each worker's own count of a counter, from the file it writes its metrics to.

    Summed over the label sets whose key contains every needle, so a test sees which worker did the work.
    """
    counts: dict[str, float] = {}
    for path in metrics_dir.glob("counter_*.db"):
        for key, value, *_ in MmapedDict.read_all_values_from_file(str(path)):
            if f'"{metric}"' in key and all(needle in key for needle in needles):
                counts[path.stem] = counts.get(path.stem, 0.0) + value
    return counts
