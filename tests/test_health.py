"""/readyz tells the truth: `degraded` (still 200) with one reason per problem when the service runs but
will not do what the operator expects (no rulesets, a refused ruleset, a channel the rulesets send on
that is not configured), and the warnings `rulesvc serve` logs at start-up. Real mongod, the real app,
and `rulesvc serve` as a process."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec

from rulesvc.config import Settings
from rulesvc.store.leases import ContactLeases
from rulesvc.store.mongod import EmbeddedMongod
from rulesvc.web.app import create_app
from rulesvc.web.keys import STORE
from tests.helpers import eventually, write_ruleset
from tests.service import ServiceProcess

Client = Any


def write(folder: Path, name: str, ruleset: dict[str, Any]) -> None:
    """A ruleset and the template its sends name (the loader refuses a send whose template is missing)."""
    write_ruleset(folder, name, ruleset)
    (folder / "templates").mkdir(exist_ok=True)
    for part in ("title", "body", "subject", "text"):
        (folder / "templates" / f"t.{part}").write_text("Hello")


def sends(channel: str, template: str = "t") -> dict[str, Any]:
    send = {"send": {"channel": channel, "template": template}}
    return {"rules": [{"name": "r", "when": {"event": "t"}, "then": [send]}]}


async def ready(client: Client) -> tuple[int, dict[str, Any]]:
    resp = await client.get("/readyz")
    return resp.status, await resp.json()


async def test_no_rulesets_is_degraded_with_the_folder_looked_in(client: Client, settings: Settings) -> None:
    status, body = await ready(client)
    folder = Path(settings.rulesets_dir).absolute()
    assert status == 200 and body["status"] == "degraded", body
    assert body["reasons"] == [
        f"no rulesets loaded: the rulesets folder {folder} does not exist; "
        "events are accepted but nothing is sent"
    ]
    assert set(body["checks"]) == {"mongodb", "rulesets", "inbox", "quarantine", "channels", "schema"}
    assert body["checks"]["inbox"] == "no unprocessed events"
    assert body["checks"]["rulesets"] == "0 loaded"

    folder.mkdir()
    (folder / "notes.txt").write_text("not a ruleset")
    await client.post("/v1/rulesets/reload")
    assert (await ready(client))[1]["reasons"] == [
        f"no rulesets loaded: no rulesets in {folder}; events are accepted but nothing is sent"
    ]


async def test_a_working_set_is_ok(make_client: Any, settings: Settings) -> None:
    write(Path(settings.rulesets_dir), "seen", sends("inapp"))
    status, body = await ready(await make_client(create_app(settings)))
    assert (status, body["status"], body["reasons"]) == (200, "ok", []), body
    assert body["checks"]["channels"] == "1 used, all configured"
    assert body["checks"]["rulesets"] == "1 loaded"


async def test_refused_ruleset_is_named_with_its_first_error(make_client: Any, settings: Settings) -> None:
    folder = Path(settings.rulesets_dir)
    write(folder, "seen", sends("inapp"))
    (folder / "broken.json").write_text('{"rules": [')
    unknown = sends("inapp")
    unknown["rules"][0]["then"][0]["send"]["channel"] = "fax"
    unknown["rules"][0]["when"]["event"] = 7
    write(folder, "twice", unknown)
    client = await make_client(create_app(settings))
    status, body = await ready(client)
    assert status == 200 and body["status"] == "degraded", body
    listed = {r["name"]: r for r in (await (await client.get("/v1/rulesets")).json())["rulesets"]}
    expected = []
    for name in ("broken", "twice"):
        errors = listed[name]["errors"]
        e = errors[0]  # as `rulesvc check` prints it: file:line:column: path: message
        where = f"{e['file']}:{e['line']}:{e['column']}" if e["line"] is not None else e["file"]
        first = f"{where}: {e['path']}: {e['message']}"
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        expected.append(f"ruleset `{name}` refused (not loaded): {first}{more}")
    assert body["reasons"] == expected
    assert body["checks"]["rulesets"].startswith("1 loaded; ")


async def test_channel_not_configured_is_named_per_ruleset(make_client: Any, settings: Settings) -> None:
    folder = Path(settings.rulesets_dir)
    write(folder, "cart_abandon", sends("email"))
    fallback = sends("inapp")
    fallback["rules"][0]["then"][0]["send"]["fallback"] = ["email"]
    write(folder, "welcome", fallback)
    client = await make_client(create_app(msgspec.structs.replace(settings, channels={})))
    channels = {c["name"]: c for c in (await (await client.get("/v1/channels")).json())["channels"]}
    assert channels["email"]["configured"] is False
    detail = channels["email"]["detail"]
    status, body = await ready(client)
    assert status == 200 and body["status"] == "degraded", body
    assert body["reasons"] == [f"cart_abandon and welcome send on `email`, which is not configured: {detail}"]
    (folder / "welcome.json").unlink()
    await client.post("/v1/rulesets/reload")
    reasons = (await ready(client))[1]["reasons"]
    assert reasons == [f"cart_abandon sends on `email`, which is not configured: {detail}"]
    assert body["checks"]["channels"] == "not configured: email (cart_abandon, welcome)"


async def test_inbox_lag_over_the_threshold_is_a_reason(make_client: Any, settings: Settings) -> None:
    """Another process holds the contact (as a stuck one would): its event waits, and /readyz says so."""
    write(Path(settings.rulesets_dir), "seen", sends("inapp"))
    app = create_app(msgspec.structs.replace(settings, degraded_lag_seconds=1.0))
    client = await make_client(app)
    until = datetime.now(UTC) + timedelta(hours=1)
    assert await ContactLeases(app[STORE]).take("stuck", "another-process", ["c-lag"], until)
    posted = time.monotonic()
    event = {"id": "e1", "type": "t", "contact_id": "c-lag"}
    assert (await client.post("/v1/events", json=event)).status == 202

    async def waited_two_seconds() -> bool:
        inbox = (await ready(client))[1]["checks"]["inbox"]
        return inbox.startswith("oldest unprocessed event waited") and int(inbox.split()[4]) >= 2

    await eventually(waited_two_seconds)
    status, body = await ready(client)
    waited = int(body["checks"]["inbox"].split()[4])
    assert 2 <= waited <= time.monotonic() - posted + 1, body
    assert (status, body["status"]) == (200, "degraded"), body
    assert body["checks"]["inbox"] == f"oldest unprocessed event waited {waited} s, over the 1 s threshold"
    assert body["reasons"] == [
        f"the oldest unprocessed event waited {waited} s, over the 1 s threshold "
        "(RULESVC_DEGRADED_LAG_SECONDS)"
    ]


async def test_mongodb_down_is_unavailable_with_a_reason(
    make_client: Any, settings: Settings, tmp_path: Path
) -> None:
    own = EmbeddedMongod(tmp_path / "own")
    own.start()
    try:
        write(Path(settings.rulesets_dir), "seen", sends("inapp"))
        client = await make_client(create_app(msgspec.structs.replace(settings, mongodb_uri=own.uri)))
        own.stop()
        status, body = await ready(client)
        assert (status, body["status"]) == (503, "unavailable"), body
        assert body["reasons"][0].startswith("MongoDB is unreachable (")
    finally:
        own.stop()


def warnings(service: ServiceProcess) -> list[dict[str, Any]]:
    return [line for line in service.log_lines() if line.get("level") == "warning"]


def test_serve_in_an_empty_folder_warns_once_and_says_degraded(tmp_path: Path) -> None:
    """As a user who runs `rulesvc serve` in the wrong directory: told at start-up and by /readyz."""
    service = ServiceProcess(tmp_path)
    service.start()
    try:
        rulesets, data = (tmp_path / "rulesets").absolute(), (tmp_path / ".rulesvc").absolute()
        assert [(w["event"], w["message"]) for w in warnings(service)] == [
            (
                "rulesets.none",
                f"the rulesets folder {rulesets} does not exist: the service will accept events but send "
                "nothing; set RULESVC_RULESETS_DIR or start from the project folder",
            ),
            (
                "data_dir.new",
                f"new data directory {data}: a fresh database; if you expected existing data, start from "
                "the folder that holds it or set RULESVC_DATA_DIR",
            ),
        ]
        status, body = service.request("GET", "/readyz")
        assert (status, body["status"]) == (200, "degraded"), body
        assert body["reasons"] == [
            f"no rulesets loaded: the rulesets folder {rulesets} does not exist; "
            "events are accepted but nothing is sent"
        ]
    finally:
        service.stop()
    # Started again in the same folder: the data is there now, so only the rulesets are missing.
    service.log_path.write_text("")
    service.start()
    try:
        assert [w["event"] for w in warnings(service)] == ["rulesets.none"]
    finally:
        service.stop()


def test_workers_warn_once(mongod: EmbeddedMongod, tmp_path: Path) -> None:
    """With several workers the supervisor says it, not each worker."""
    (tmp_path / "rulesets").mkdir()
    env = {"MONGODB_URI": mongod.uri, "RULESVC_DATABASE": "warn_once"}
    service = ServiceProcess(tmp_path, env=env, workers=2)
    service.start()
    try:
        events = [w["event"] for w in warnings(service)]
        assert events == ["rulesets.none"], json.dumps(warnings(service))
        assert f"no rulesets in {(tmp_path / 'rulesets').absolute()}:" in warnings(service)[0]["message"]
    finally:
        service.stop()
