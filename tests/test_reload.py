"""Hot reload: edits go live by themselves, broken edits keep the old version, deletes unload."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any

from rulesvc.config import Settings
from tests.helpers import eventually, ruleset, serve_greet, write


async def listing(client: Any) -> dict[str, Any]:
    return {r["name"]: r for r in (await (await client.get("/v1/rulesets")).json())["rulesets"]}


async def templates_sent(db: Any) -> list[str]:
    return [m["template"] async for m in db.messages.find({"status": "sent"}).sort("created_at", 1)]


async def test_edit_broken_edit_and_delete(make_client: Any, settings: Settings, db: Any) -> None:
    path, client = await serve_greet(make_client, settings, "v1")
    first = (await listing(client))["greet"]
    assert first["status"] == "loaded" and first["events"] == ["t"] and first["errors"] == []
    assert (await client.get("/readyz")).status == 200

    write(path, ruleset("v2"))
    saved = datetime.fromtimestamp(path.stat().st_mtime, UTC)

    async def new_version() -> bool:
        return (await listing(client))["greet"]["version"] != first["version"]

    await eventually(new_version)  # no reload asked for: the watcher saw the edit
    assert datetime.fromisoformat((await listing(client))["greet"]["loaded_at"]) >= saved
    await client.post("/v1/events", json={"id": "a", "type": "t", "contact_id": "c1"})

    async def one_sent() -> bool:
        return await templates_sent(db) == ["v2"]

    await eventually(one_sent)

    cut = '{"rules": [{"name": "say", "when": {"event": "t"}, "then": [{"send": {"channel": "fax"'
    write(path, cut)
    await eventually(lambda: _status_is(client, "error"))
    broken = (await listing(client))["greet"]
    assert broken["version"] == (await listing(client))["greet"]["version"] != first["version"]
    error = broken["errors"][0]
    assert (error["file"], error["line"], error["column"]) == ("greet.json", 1, len(cut) + 1)  # where it ends
    assert error["path"] == "$.rules[0].then[0].send" and error["message"].startswith("invalid JSON")
    ready = await (await client.get("/readyz")).json()
    assert (
        f"greet.json:1:{len(cut) + 1}: $.rules[0].then[0].send: invalid JSON" in ready["checks"]["rulesets"]
    )

    unknown_channel = ruleset("v3")
    unknown_channel["rules"][0]["then"][0]["send"]["channel"] = "fax"
    write(path, unknown_channel)
    await eventually(lambda: _error_path_is(client, "$.rules[0].then[0].send.channel"))
    await client.post("/v1/events", json={"id": "b", "type": "t", "contact_id": "c1"})

    async def old_version_still_runs() -> bool:
        return await templates_sent(db) == ["v2", "v2"]

    await eventually(old_version_still_runs)

    path.unlink()
    await eventually(lambda: _gone(client))
    await client.post("/v1/events", json={"id": "c", "type": "t", "contact_id": "c1"})
    await eventually(lambda: _no_pending(db))
    assert await templates_sent(db) == ["v2", "v2"]  # nothing listens any more


async def _status_is(client: Any, status: str) -> bool:
    return bool((await listing(client))["greet"]["status"] == status)


async def _error_path_is(client: Any, path: str) -> bool:
    errors = (await listing(client))["greet"]["errors"]
    return bool(errors) and errors[0]["path"] == path


async def _gone(client: Any) -> bool:
    return "greet" not in await listing(client)


async def _no_pending(db: Any) -> bool:
    return await db.inbox.count_documents({"state": "pending"}) == 0


async def test_events_posted_during_reloads_are_all_processed(
    make_client: Any, settings: Settings, db: Any
) -> None:
    path, client = await serve_greet(make_client, settings, "v0")

    async def post(batch: int) -> None:
        events = [{"id": f"e{batch}-{i}", "type": "t", "contact_id": f"c{i % 7}"} for i in range(25)]
        assert (await client.post("/v1/events", json=events)).status == 202

    async def some_sent() -> bool:
        return await db.messages.count_documents({"status": "sent"}) > 0

    await post(0)
    await eventually(some_sent)  # the first version has sent something
    for n in range(1, 11):  # ten edits, each while two batches are on their way, not waiting for it
        write(path, ruleset(f"v{n}"))
        await post(2 * n - 1)
        await post(2 * n)

    async def last_version_live() -> bool:
        return bool(await templates_sent(db)) and (await listing(client))["greet"]["version"] == last

    last = hashlib.sha256(path.read_bytes()).hexdigest()[:12]  # a version is its file's digest
    await eventually(last_version_live)
    await post(21)  # after the last edit is live: sent with it

    async def all_sent() -> bool:
        return await db.messages.count_documents({"status": "sent"}) == 22 * 25

    await eventually(all_sent)
    assert await db.events.count_documents({}) == 22 * 25 and await db.inbox.count_documents({}) == 0
    used = await templates_sent(db)
    assert used[0] == "v0" and used[-1] == "v10"  # the reloads happened while events flowed
    assert (await client.post("/v1/rulesets/reload")).status == 200
    assert (await listing(client))["greet"]["status"] == "loaded"
