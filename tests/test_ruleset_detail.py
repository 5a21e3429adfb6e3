"""`GET /v1/rulesets/{name}`: a shipped ruleset as a person reads it (each rule's trigger and what each
action does), its holdout and goal, and the current text of its file, also after a refused edit.

Expected values are read off the file the test copied (its JSON, its bytes), never from the code under
test."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from rulesvc.config import Settings
from rulesvc.core.ruleformat import parse_ruleset
from rulesvc.core.rulesummary import condition_text, rules_of
from rulesvc.web.app import create_app
from rulesvc.web.keys import KEYS

SHIPPED = Path(__file__).resolve().parent.parent / "rulesets"


async def test_a_shipped_ruleset_in_words_with_its_text(
    make_client: Any, settings: Settings, db: Any
) -> None:
    folder = Path(settings.rulesets_dir)
    shutil.copytree(SHIPPED, folder)
    app = create_app(settings)
    client = await make_client(app)
    text = (folder / "cart_abandon.json").read_bytes()
    shipped = json.loads(text)

    response = await client.get("/v1/rulesets/cart_abandon")
    assert response.status == 200
    body = await response.json()
    assert (body["name"], body["file"], body["status"], body["errors"]) == (
        "cart_abandon", "cart_abandon.json", "loaded", [])  # fmt: skip
    assert body["version"] == hashlib.sha256(text).hexdigest()[:12]
    assert body["source"] == text.decode() and body["source_error"] is None
    assert body["events"] == ["cart_updated"]
    assert body["holdout"] == shipped["holdout"] == "5%" and body["variants"] == []
    assert body["goal"] == {"events": ["purchased"], "within": "5d", "conditions": [],
                            "value": "attributes.value"}  # fmt: skip
    assert [r["name"] for r in body["rules"]] == [r["name"] for r in shipped["rules"]]
    remind = body["rules"][1]
    assert remind["events"] == ["cart_updated"] and remind["channels"] == ["push", "email"]
    assert remind["conditions"] == ["attributes.value > 0 and ≤ 200"]
    sends = [(a["channel"], a["template"], a["after"]) for a in remind["actions"] if a["kind"] == "send"]
    assert sends == [("push", "cart_abandon/push", "20m"), ("email", "cart_abandon/email", "12h")]
    assert remind["actions"][1]["text"] == (
        "sends `cart_abandon/push` on push 20m after the event; cancelled by purchased"
    )
    assert body["rules"][0]["actions"][0]["text"] == "cancels every pending send of this ruleset"

    engagement = await (await client.get("/v1/rulesets/engagement")).json()
    waits = [a for r in engagement["rules"] for a in r["actions"] if a["kind"] == "wait"]
    nudge = next(w for w in waits if w["then"][0].get("template") == "engagement/email_nudge")
    assert nudge["text"].startswith("waits up to 24h for message_opened")
    assert nudge["then"][0]["channel"] == "push"

    # A refused edit: the file's text is the new one, the rules still the live version's.
    broken = text.replace(b'"after": "20m"', b'"after": "soon"')
    (folder / "cart_abandon.json").write_bytes(broken)
    assert (await client.post("/v1/rulesets/reload")).status == 200
    body = await (await client.get("/v1/rulesets/cart_abandon")).json()
    assert body["status"] == "error" and body["source"] == broken.decode()
    line = broken[: broken.index(b'"soon"')].count(b"\n") + 1
    assert [(e["path"], e["line"]) for e in body["errors"]] == [("$.rules[1].then[1].send.after", line)]
    assert body["version"] == hashlib.sha256(text).hexdigest()[:12]
    assert body["rules"][1]["actions"][1]["after"] == "20m"

    for name in ("nope", "Bad-Name", "schema"):
        missing = await client.get(f"/v1/rulesets/{name}")
        assert missing.status == 404, name
        assert f"no ruleset `{name}`" in (await missing.json())["error"]
    ingest, _ = await app[KEYS].create("ingest", "shop backend")
    refused = await client.get("/v1/rulesets/cart_abandon", headers={"Authorization": f"Bearer {ingest}"})
    assert refused.status == 403


def test_every_shipped_rule_has_a_sentence_per_action() -> None:
    channels = frozenset({"email", "push", "sms", "webpush", "inapp", "webhook", "log"})
    for path in sorted(SHIPPED.glob("*.json")):
        if path.name == "schema.json":
            continue
        raw = json.loads(path.read_text())
        summaries = rules_of(parse_ruleset(path.name, path.read_bytes(), channels))
        for rule, summary in zip(raw["rules"], summaries, strict=True):
            assert len(summary.actions) == len(rule["then"]), (path.name, rule["name"])
            for action, line in zip(rule["then"], summary.actions, strict=True):
                (kind,) = action
                assert line.kind == kind and line.text and line.text != kind


def test_conditions_read_as_comparisons() -> None:
    from rulesvc.core.ruleformat import Ops

    assert condition_text("attributes.price", Ops(gte=10, lt=20)) == "attributes.price ≥ 10 and < 20"
    assert condition_text("contact.country", "DE") == 'contact.country = "DE"'
    assert condition_text("flags.vip", Ops(exists=False)) == "flags.vip is missing"
    assert condition_text("attributes.tag", Ops(in_=["a", 2])) == 'attributes.tag in "a", 2'
