"""Template content safety, live: in-app title and body are HTML-escaped (pages show them as HTML), other
channels get the text as written; a missing or null value fails its message with `template_error`
instead of going out as "None"; and `rulesvc check` warns where a template needs a param a rule may not
give."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from rulesvc.config import Settings
from rulesvc.web.app import create_app
from tests.helpers import PROFILE, Provider, registry, settled, write_ruleset

TEMPLATES = {
    "offer.title": "{{ params.name }} is back",
    "offer.body": "<b>{{ params.name }}</b> for {{ params.price }} {{ params.currency | default('EUR') }}",
}


def setup(settings: Settings, channel: str, params: dict[str, Any]) -> Settings:
    folder = Path(settings.rulesets_dir)
    (folder / "templates").mkdir(parents=True, exist_ok=True)
    for name, text in TEMPLATES.items():
        (folder / "templates" / name).write_text(text)
    sends = [{"send": {"channel": channel, "template": "offer", "params": params, "transactional": True}}]
    write_ruleset(folder, "flow", {"rules": [{"name": "go", "when": {"event": "go"}, "then": sends}]})
    return settings


PARAMS = {"name": "$attributes.name", "price": "$attributes.price", "currency": "$attributes.currency"}


async def post(client: Any, event_id: str, **attributes: Any) -> None:
    event = {"id": event_id, "type": "go", "contact_id": "c1", "attributes": attributes}
    assert (await client.post("/v1/events", json=event)).status == 202


async def test_inapp_content_is_escaped_and_markup_of_the_template_kept(
    make_client: Any, settings: Settings
) -> None:
    client = await make_client(create_app(setup(settings, "inapp", PARAMS)))
    await post(client, "e1", name='<img src=x onerror="alert(1)">', price="9 & 10")
    [message] = await settled(client)
    assert message["status"] == "sent"
    inbox = (await (await client.get("/v1/contacts/c1/inbox")).json())["messages"]
    assert inbox[0]["content"] == {
        "title": "&lt;img src=x onerror=&#34;alert(1)&#34;&gt; is back",
        "body": "<b>&lt;img src=x onerror=&#34;alert(1)&#34;&gt;</b> for 9 &amp; 10 EUR",
    }


async def test_a_push_gets_the_text_as_written(make_client: Any, settings: Settings) -> None:
    push = Provider("push", needs="push_tokens")
    client = await make_client(create_app(setup(settings, "push", PARAMS), channels=registry(push)))
    assert (await client.put("/v1/contacts/c1", json=PROFILE)).status == 201
    await post(client, "e1", name="Fish & Chips <XL>", price=5)
    [message] = await settled(client)
    assert message["status"] == "sent"
    assert push.delivered[0].content["title"] == "Fish & Chips <XL> is back"


async def test_a_missing_value_fails_the_message_with_template_error(
    make_client: Any, settings: Settings
) -> None:
    client = await make_client(create_app(setup(settings, "inapp", PARAMS)))
    await post(client, "e1", price=12)  # no name: the param is null
    await post(client, "e2", name="Lamp", price=None, currency=None)  # null price, null currency
    await post(client, "e3", name="Lamp", price=12)  # currency defaults
    messages = await settled(client, count=3)
    by_event = {m["message_id"].split("/")[0]: m for m in messages}
    assert by_event["e1"]["status"] == "failed"
    assert by_event["e1"]["reason"] == by_event["e2"]["reason"] == "template_error"
    assert by_event["e1"]["detail"].startswith("template `offer.")
    assert "`name` is missing" in by_event["e1"]["detail"]
    assert by_event["e2"]["status"] == "failed" and "`price` is missing" in by_event["e2"]["detail"]
    assert by_event["e3"]["status"] == "sent"
    inbox = (await (await client.get("/v1/contacts/c1/inbox")).json())["messages"]
    assert [m["content"]["body"] for m in inbox] == ["<b>Lamp</b> for 12 EUR"]  # nothing says "None"


def check(folder: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rulesvc", "check", str(folder)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_check_warns_where_a_template_needs_a_param_the_rule_may_not_give(tmp_path: Path) -> None:
    folder = tmp_path / "rulesets"
    (folder / "templates").mkdir(parents=True)
    for name, text in TEMPLATES.items():
        (folder / "templates" / name).write_text(text)
    (folder / "templates" / "plain.body").write_text(
        "{% if params.note %}{{ params.note }}{% endif %}{{ params['code'] }} {{ params.x is defined }}"
    )
    rules = [
        # `price` comes from an attribute no condition requires; `name` is required; no `currency`
        # param at all, but the template has a default for it.
        {"name": "loose", "when": {"event": "go", "conditions": {"attributes.name": {"exists": True}}},
         "then": [{"send": {"channel": "inapp", "template": "offer",
                            "params": {"name": "$attributes.name", "price": "$attributes.price"}}}]},
        # Every param the template needs is given and guaranteed.
        {"name": "tight", "when": {"event": "go", "conditions": {"attributes.price": {"gt": 0},
                                                                 "attributes.name": "Lamp"}},
         "then": [{"send": {"channel": "inapp", "template": "offer",
                            "params": {"name": "$attributes.name", "price": "$attributes.price"}}}]},
        # `code` is not given at all (inside a wait's else too); `note` and `x` are guarded.
        {"name": "bare", "when": {"event": "go"},
         "then": [{"wait": {"event": "stop", "within": "1h",
                            "else": [{"send": {"channel": "inapp", "template": "plain",
                                               "params": {"note": "$attributes.note"}}}]}}]},
    ]  # fmt: skip
    text = json.dumps({"rules": rules})
    (folder / "flow.json").write_text(text)
    done = check(folder)
    assert done.returncode == 0, done.stderr  # warnings, not errors: the rulesets are valid
    warnings = [line for line in done.stdout.splitlines() if line.startswith("warning:")]
    price = text.find('"$attributes.price"') + 1  # one line: the column is the offset plus one
    params = text.find('{"note"') + 1
    assert warnings == [
        f"warning: flow.json:1:{price}: $.rules[0].then[0].send.params.price: template `offer.body` prints "
        "`params.price`, which comes from `attributes.price`, which the rule's conditions do not require: "
        "a message without it fails with template_error (add a condition "
        '`{"attributes.price": {"exists": true}}` or `| default(...)` in the template)',
        f"warning: flow.json:1:{params}: $.rules[2].then[0].wait.else[0].send.params: template `plain.body` "
        "prints "
        "`params.code`, which this send does not give: every such message fails with template_error",
    ]
    assert all("is not configured" not in line for line in done.stdout.splitlines())  # inapp needs none


def test_a_null_param_counts_as_missing_for_defaults_tests_and_loops(tmp_path: Path) -> None:
    """A null stays a key (`params["items"]` must not become the dict's `items` method) and reads as
    missing: defaults apply, `is none`/`is defined`/`if` see it, loops over it run zero times."""
    from rulesvc.runtime.templates import TemplateError, Templates

    (tmp_path / "t.body").write_text(
        '{% for i in params["items"] or [] %}{{ i }}{% endfor %}|{{ params.name | default("friend") }}|'
        "{% if params.left is not none %}{{ params.left }}{% endif %}|{{ params.n is defined }}"
    )
    (tmp_path / "u.body").write_text("{{ params.tags[0] }}")
    templates = Templates(tmp_path)
    nulls = {"params": {"items": None, "name": None, "left": None, "n": None}}
    assert templates.render("t", nulls) == {"body": "|friend||False"}
    given = {"params": {"items": ["a", "b"], "name": "Ann", "left": 0, "n": 1}}
    assert templates.render("t", given) == {"body": "ab|Ann|0|True"}
    with pytest.raises(TemplateError, match="null"):
        templates.render("u", {"params": {"tags": [None]}})  # a null inside a list is still no text


async def test_an_inapp_link_must_be_http_or_a_path_on_the_shop(make_client: Any, settings: Settings) -> None:
    """A page puts `url` in a link: `javascript:` (or another site via `//host`) from an event attribute
    would run in the shop's page."""
    folder = Path(settings.rulesets_dir)
    (folder / "templates").mkdir(parents=True, exist_ok=True)
    (folder / "templates" / "link.title").write_text("Back in stock")
    (folder / "templates" / "link.url").write_text("{{ params.link }}")
    sends = [{"send": {"channel": "inapp", "template": "link", "params": {"link": "$attributes.link"}}}]
    write_ruleset(folder, "flow", {"rules": [{"name": "go", "when": {"event": "go"}, "then": sends}]})
    client = await make_client(create_app(settings))
    links = ["javascript:alert(document.cookie)", "//evil.example/x", "/cart?x=1", "https://shop.example/p/1"]
    for i, link in enumerate(links):
        await post(client, f"e{i}", link=link)
    messages = await settled(client, count=4)
    by_event = {m["message_id"].split("/")[0]: m for m in messages}
    assert [by_event[f"e{i}"]["status"] for i in range(4)] == ["failed", "failed", "sent", "sent"]
    assert by_event["e0"]["reason"] == "template_error"
    assert by_event["e0"]["detail"] == "`.url` must be an http(s) URL or a path on the shop"
    inbox = (await (await client.get("/v1/contacts/c1/inbox")).json())["messages"]
    assert sorted(m["content"]["url"] for m in inbox) == ["/cart?x=1", "https://shop.example/p/1"]
