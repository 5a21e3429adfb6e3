"""Build rulesets in a temporary folder and run them through the engine, as the service would."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec

from rulesvc.plugins import builtin_channels
from rulesvc.replay.simulate import SimAction, SimulateRequest, simulate
from rulesvc.runtime.rulesets import Rulesets

T0 = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)


def at(**delta: float) -> str:
    return (T0 + timedelta(**delta)).isoformat().replace("+00:00", "Z")


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
