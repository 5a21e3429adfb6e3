"""Ruleset errors a person can act on: every error of every file, each at its line and column, with its
JSON path and a plain sentence; the same validation in `check`, the live loader, `simulate` and
`PUT /v1/rulesets/{name}`.

Expected places are computed here from the text the test wrote (find the token, count the newlines),
never taken from the parser under test."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec.inspect
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from rulesvc.config import Settings
from rulesvc.core import jsoncheck
from rulesvc.core.ruleformat import SENTENCES, InvalidRuleset, RulesetFile, parse_ruleset
from rulesvc.store.mongod import EmbeddedMongod
from rulesvc.web.app import create_app
from rulesvc.web.keys import KEYS
from tests.helpers import eventually, wait_for
from tests.service import ServiceProcess

CHANNELS = frozenset({"log", "inapp", "webhook", "email"})


def where(text: str, token: str, nth: int = 0) -> str:
    """`line:column` (both from 1) of the `nth` occurrence of `token` in `text`."""
    at = -1
    for _ in range(nth + 1):
        at = text.index(token, at + 1)
    return f"{text.count(chr(10), 0, at) + 1}:{at - text.rfind(chr(10), 0, at)}"


def rulesvc(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rulesvc", *args], capture_output=True, text=True, timeout=120, cwd=cwd
    )


# Seven mistakes in two files. Each rule holds one kind, so one broken rule hides nothing of the others.
CART = """{
  "rules": [
    {
      "name": "cart_reminder",
      "when": {"event": "cart_updated"},
      "then": [{"send": {"channel": "log", "template": "hello", "after": "20 minutes"}}]
    },
    {
      "name": "typo",
      "when": {"event": "cart_updated"},
      "then": [{"send": {"channel": "log", "templte": "hello"}}]
    },
    {
      "name": "wrong_type",
      "when": {"event": "cart_updated"},
      "then": [{"remember": {"name": "cart", "from": "attributes.items", "append": "yes"}}]
    },
    {
      "name": "welcome",
      "when": {"event": "subscribed"},
      "then": [{"send": {"channel": "pigeon", "template": "hello"}}]
    },
    {
      "name": "welcome",
      "when": {"event": "subscribed"},
      "then": [{"send": {"channel": "log", "template": "welcome/mail"}}]
    }
  ]
}
"""
BROKEN = """{
  "rules": [
    {"name": "a", "when": {"event": "x"}
     "then": [{"set_flag": "seen"}]}
  ]
}
"""


def test_check_prints_every_mistake_with_line_and_column(tmp_path: Path) -> None:
    (tmp_path / "cart.json").write_text(CART)
    (tmp_path / "broken.json").write_text(BROKEN)
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "hello.body").write_text("Hello")
    result = rulesvc("check", str(tmp_path))
    assert result.returncode == 1
    send = CART.index('{"channel": "log", "templte"')
    send_at = f"{CART.count(chr(10), 0, send) + 1}:{send - CART.rfind(chr(10), 0, send)}"
    comma = where(BROKEN, '"then"')
    after, templte, yes = where(CART, '"20 minutes"'), where(CART, '"templte"'), where(CART, '"yes"')
    pigeon, welcome, mail = (
        where(CART, '"pigeon"'),
        where(CART, '"welcome"', 1),
        where(CART, '"welcome/mail"'),
    )
    expected = [
        f"broken.json:{comma}: $.rules[0]: invalid JSON: expected `,` or `}}` after an object member: "
        "is a comma missing before this?",
        f"cart.json:{after}: $.rules[0].then[0].send.after: expected a duration such as `20m` or `2h`, "
        'got "20 minutes"',
        f"cart.json:{send_at}: $.rules[1].then[0].send.template: missing required key `template`",
        f"cart.json:{templte}: $.rules[1].then[0].send.templte: unknown key `templte`; "
        "did you mean `template`?",
        f'cart.json:{yes}: $.rules[2].then[0].remember.append: expected true or false, got "yes"',
        f"cart.json:{pigeon}: $.rules[3].then[0].send.channel: unknown channel `pigeon` "
        "(known: email, inapp, log, push, sms, webhook, webpush)",
        f"cart.json:{welcome}: $.rules[4].name: duplicate rule name `welcome`",
        f"cart.json:{mail}: $.rules[4].then[0].send.template: template `welcome/mail` not found in "
        f"{tmp_path}/templates",
    ]
    errors = [line for line in result.stdout.splitlines() if not line.startswith("warning:")]
    assert errors == expected
    assert "0 of 2 rulesets valid" in result.stderr


def test_check_warns_of_a_send_on_a_channel_that_is_not_configured(tmp_path: Path) -> None:
    text = json.dumps(
        {"rules": [{"name": "a", "when": {"event": "x"},
                    "then": [{"send": {"channel": "log", "template": "hello", "fallback": ["email"]}},
                             {"send": {"channel": "email", "template": "hello"}}]}]},
        indent=2,
    )  # fmt: skip
    (tmp_path / "mail.json").write_text(text)
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "hello.body").write_text("Hello")
    result = rulesvc("check", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr  # a warning, not an error
    first_send = text.rfind("{", 0, text.index('"channel": "log"'))
    line, column = text.count("\n", 0, first_send) + 1, first_send - text.rfind("\n", 0, first_send)
    assert result.stdout.splitlines() == [
        f"warning: mail.json:{line}:{column}: $.rules[0].then[0].send: channel `email` is not configured "
        "(missing setting(s): host, from): messages on it are suppressed (and 1 more send(s) in this file)"
    ]
    assert "1 of 1 rulesets valid" in result.stderr


def test_simulate_prints_the_same_lines_as_check(tmp_path: Path) -> None:
    (tmp_path / "cart.json").write_text(CART)
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "hello.body").write_text("Hello")
    (tmp_path / "events.ndjson").write_text('{"id": "e", "type": "x", "contact_id": "c"}\n')
    checked = rulesvc("check", str(tmp_path)).stdout.splitlines()
    simulated = rulesvc("simulate", str(tmp_path / "events.ndjson"), "--rulesets", str(tmp_path))
    assert simulated.returncode == 1
    assert len(checked) == 7 and simulated.stderr.splitlines() == checked


SYNTAX = [
    ('{"rules": [1, 2,]}', "]", "$.rules", "a comma before `]` is not allowed in JSON"),
    ('{"rules": [],\n}', "}", "$", "a comma before `}` is not allowed in JSON"),
    ("{'rules': []}", "'", "$",
     "expected a key in double quotes; JSON strings take double quotes, not single"),
    ('{"rules": [{"name": "a\n"}]}', '"a', "$.rules[0].name",
     "the string is not closed before the end of the line"),
    ('{\n  // rules\n  "rules": []}', "//", "$", "comments are not allowed in JSON"),
    ('{"rules": [{"then": [True]}]}', "True", "$.rules[0].then[0]",
     "expected a value, found `True`; write `true`"),
    ('{"rules": [{"max": 01}]}', "01", "$.rules[0].max", "invalid number `01`"),
    ('{"rules": [{"name" "a"}]}', ' "a"', "$.rules[0].name", "expected `:` after the key `name`, found `\"`"),
    ('{"rules": []} {}', "{}", "$", "unexpected text after the end of the JSON value (one object per file)"),
]  # fmt: skip


def test_json_syntax_errors_are_said_plainly_at_their_place() -> None:
    for text, token, path, message in SYNTAX:
        try:
            parse_ruleset("f.json", text.encode(), CHANNELS)
        except InvalidRuleset as exc:
            errors = [(e.path, f"{e.line}:{e.column}", e.message) for e in exc.errors]
        else:
            raise AssertionError(f"accepted: {text}")
        at = text.index(token) + (1 if token.startswith(" ") else 0)  # `:` is missing after the space
        place = f"{text.count(chr(10), 0, at) + 1}:{at - text.rfind(chr(10), 0, at)}"
        assert errors == [(path, place, f"invalid JSON: {message}")], text


def test_every_pattern_of_the_format_has_a_sentence() -> None:
    """A new constrained string in the format needs words for its errors, not a regular expression."""
    assert jsoncheck.patterns(msgspec.inspect.type_info(RulesetFile)) <= set(SENTENCES)


# --- one random mutation of a random valid ruleset: the path and the place are those of the mutation


names = st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True)
durations = st.builds(lambda n, u: f"{n}{u}", st.integers(1, 99), st.sampled_from("smhdw"))


@st.composite
def send(draw: st.DrawFn) -> tuple[dict[str, Any], list[list[str]]]:
    """A send, and the relative paths of its values that a sentinel string makes invalid."""
    value: dict[str, Any] = {"channel": draw(st.sampled_from(["log", "inapp", "webhook"])),
                             "template": draw(names)}  # fmt: skip
    paths = [[], ["channel"], ["template"]]
    if draw(st.booleans()):
        value["after"] = draw(durations)
        paths.append(["after"])
    if draw(st.booleans()):
        value["transactional"] = draw(st.booleans())
        paths.append(["transactional"])
    return value, paths


@st.composite
def action(draw: st.DrawFn) -> tuple[dict[str, Any], list[list[str]]]:
    kind = draw(st.sampled_from(["send", "set_flag", "count", "remember", "wait"]))
    if kind == "send":
        value, paths = draw(send())
        return {"send": value}, [["send", *p] for p in paths]
    if kind == "set_flag":
        return {"set_flag": draw(names)}, [["set_flag"]]
    if kind == "count":
        return {"count": {"name": draw(names), "window": draw(durations)}}, [
            ["count", "name"], ["count", "window"]]  # fmt: skip
    if kind == "remember":
        body = {"name": draw(names), "from": "attributes.x", "max": draw(st.integers(1, 1000))}
        return {"remember": body}, [["remember", "name"], ["remember", "from"], ["remember", "max"]]
    inner, paths = draw(send())
    wait = {"event": "stop", "within": draw(durations), "else": [{"send": inner}]}
    return {"wait": wait}, [
        ["wait", "within"],
        ["wait", "else"],
        *[["wait", "else", 0, "send", *p] for p in paths],
    ]


@st.composite
def ruleset(draw: st.DrawFn) -> tuple[dict[str, Any], list[list[Any]]]:
    rules, paths = [], []
    for i in range(draw(st.integers(1, 3))):
        rule: dict[str, Any] = {"name": f"r{i}_{draw(names)}", "when": {"event": "go"}, "then": []}
        paths += [["rules", i, "name"], ["rules", i, "when"], ["rules", i, "then"]]
        for j in range(draw(st.integers(1, 3))):
            value, inner = draw(action())
            rule["then"].append(value)
            paths += [["rules", i, "then", j, *p] for p in inner]
        if draw(st.booleans()):
            rule["once"] = {"per": draw(st.sampled_from(["session", "ever"]) | durations)}
            paths.append(["rules", i, "once", "per"])
        rules.append(rule)
    return {"rules": rules}, paths


def json_path(parts: list[Any]) -> str:
    return "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts)


@hsettings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ruleset(), st.data(), st.sampled_from([None, 1, 2, 4]))
def test_a_mutation_is_reported_at_its_path_and_place(
    made: tuple[dict[str, Any], list[list[Any]]], data: st.DataObject, indent: int | None
) -> None:
    body, paths = made
    parse_ruleset("f.json", json.dumps(body).encode(), CHANNELS)  # valid as generated
    target = data.draw(st.sampled_from(paths))
    sentinel = "!mutated value!"  # no constrained string, number, bool, object or array takes it
    holder = body
    for part in target[:-1]:
        holder = holder[part]
    holder[target[-1]] = sentinel
    text = json.dumps(body, indent=indent)
    try:
        parse_ruleset("f.json", text.encode(), CHANNELS)
    except InvalidRuleset as exc:
        errors = exc.errors
    else:
        raise AssertionError(f"{json_path(target)} = {sentinel!r} was accepted")
    assert [(e.path, f"{e.line}:{e.column}") for e in errors] == [
        (json_path(target), where(text, json.dumps(sentinel)))
    ]
    assert "regex" not in errors[0].message and "!mutated value!" in errors[0].message


# --- the live loader and PUT /v1/rulesets/{name}


def greet(template: str, event: str = "t") -> dict[str, Any]:
    return {"rules": [{"name": "say", "when": {"event": event},
                       "then": [{"send": {"channel": "log", "template": template}}]}]}  # fmt: skip


def test_live_service_refuses_a_missing_template_until_it_is_added(
    tmp_path: Path, mongod: EmbeddedMongod
) -> None:
    folder = tmp_path / "rulesets"
    (folder / "templates").mkdir(parents=True)
    (folder / "templates" / "v1.body").write_text("version 1")
    (folder / "greet.json").write_text(json.dumps(greet("v1")))
    service = ServiceProcess(tmp_path, env={"MONGODB_URI": mongod.uri, "RULESVC_DATABASE": "ruleset_errors"})
    service.start()
    try:
        created = service.cli("keys", "create", "--scope", "admin")
        assert created.returncode == 0, created.stderr
        service.key = created.stdout.splitlines()[-1]
        first = service.request("GET", "/v1/rulesets")[1]["rulesets"][0]
        assert first["status"] == "loaded"

        text = json.dumps(greet("v2"), indent=2)
        tmp = folder / "greet.tmp"
        tmp.write_text(text)
        tmp.replace(folder / "greet.json")
        line, column = (int(n) for n in where(text, '"v2"').split(":"))
        message = f"template `v2` not found in {Path('rulesets') / 'templates'}"

        def refused() -> dict[str, Any] | None:
            listed = service.request("GET", "/v1/rulesets")[1]["rulesets"][0]
            return listed if listed["status"] == "error" else None

        listed = wait_for(refused)
        assert listed["version"] == first["version"]  # the previous version stays live
        assert listed["errors"] == [
            {"file": "greet.json", "line": line, "column": column,
             "path": "$.rules[0].then[0].send.template", "message": message}
        ]  # fmt: skip
        ready = service.request("GET", "/readyz")[1]
        assert (
            f"greet.json:{line}:{column}: $.rules[0].then[0].send.template: {message}"
            in (ready["checks"]["rulesets"])
        )
        logged = [entry for entry in service.log_lines() if entry.get("event") == "ruleset.invalid"]
        assert [(e["file"], e["line"], e["column"], e["path"], e["message"]) for e in logged] == [
            ("greet.json", line, column, "$.rules[0].then[0].send.template", message)
        ]

        (folder / "templates" / "v2.body").write_text("version 2")  # only a template changes

        def loaded() -> dict[str, Any] | None:
            listed = service.request("GET", "/v1/rulesets")[1]["rulesets"][0]
            return listed if listed["status"] == "loaded" else None

        now = wait_for(loaded)
        assert now["version"] == hashlib.sha256(text.encode()).hexdigest()[:12] and now["errors"] == []
    finally:
        service.stop()


async def test_put_a_ruleset(make_client: Any, settings: Settings, db: Any) -> None:
    folder = Path(settings.rulesets_dir)
    (folder / "templates").mkdir(parents=True)
    (folder / "templates" / "hi.body").write_text("hi {{ contact.id }}")
    app = create_app(settings)
    client = await make_client(app)

    broken = json.dumps(
        {"rules": [{"name": "a", "when": {"event": "t"},
                    "then": [{"send": {"channel": "log", "template": "nope", "after": "soon"}}]},
                   {"name": "b", "when": {"event": "t"},
                    "then": [{"send": {"channel": "fax", "template": "hi"}}]}]},
        indent=2,
    )  # fmt: skip
    response = await client.put(
        "/v1/rulesets/welcome", data=broken, headers={"Content-Type": "application/json"}
    )
    assert response.status == 422
    body = await response.json()
    assert body["error"] == "ruleset `welcome` has 2 error(s); nothing changed"

    def at(token: str) -> dict[str, int]:
        line, column = where(broken, token).split(":")
        return {"line": int(line), "column": int(column)}

    assert body["errors"] == [
        {"file": "welcome.json", **at('"soon"'), "path": "$.rules[0].then[0].send.after",
         "message": 'expected a duration such as `20m` or `2h`, got "soon"'},
        {"file": "welcome.json", **at('"fax"'), "path": "$.rules[1].then[0].send.channel",
         "message": "unknown channel `fax` (known: email, inapp, log, push, sms, webhook, webpush)"},
    ]  # fmt: skip
    assert not (folder / "welcome.json").exists()

    good = json.dumps(greet("hi", event="signed_up"), indent=2).encode()
    dry = await client.put("/v1/rulesets/welcome?dry_run=true", data=good,
                           headers={"Content-Type": "application/json"})  # fmt: skip
    version = hashlib.sha256(good).hexdigest()[:12]
    assert dry.status == 200
    assert await dry.json() == {"valid": True, "name": "welcome", "version": version, "events": ["signed_up"]}
    assert not (folder / "welcome.json").exists()
    assert "welcome" not in [r["name"] for r in (await (await client.get("/v1/rulesets")).json())["rulesets"]]

    written = await client.put(
        "/v1/rulesets/welcome", data=good, headers={"Content-Type": "application/json"}
    )
    assert written.status == 200
    info = await written.json()
    assert (info["name"], info["status"], info["version"], info["events"]) == (
        "welcome", "loaded", version, ["signed_up"])  # fmt: skip
    assert (folder / "welcome.json").read_bytes() == good  # kept as sent
    assert [p.name for p in folder.iterdir() if p.is_file()] == ["welcome.json"]  # no temporary left

    assert (
        await client.post("/v1/events", json={"id": "e1", "type": "signed_up", "contact_id": "c1"})
    ).status == 202

    async def sent() -> bool:
        doc = await db.messages.find_one({"ruleset": "welcome", "status": "sent"})
        return doc is not None and doc["template"] == "hi"

    await eventually(sent)

    refused = await client.put(
        "/v1/rulesets/Bad-Name", data=good, headers={"Content-Type": "application/json"}
    )
    assert refused.status == 400 and "lower case" in (await refused.json())["error"]
    typed = await client.put("/v1/rulesets/welcome", data=good, headers={"Content-Type": "text/plain"})
    assert typed.status == 415
    flag = await client.put("/v1/rulesets/welcome?dry_run=maybe", data=good,
                            headers={"Content-Type": "application/json"})  # fmt: skip
    assert (flag.status, await flag.json()) == (
        422,
        {"error": "query parameter `dry_run` must be true or false, got `maybe`", "field": "dry_run"},
    )

    huge = b'{"description": "' + b"x" * settings.max_body_bytes + b'"}'
    over = await client.put("/v1/rulesets/welcome", data=huge, headers={"Content-Type": "application/json"})
    assert over.status == 413
    assert (folder / "welcome.json").read_bytes() == good

    ingest, _ = await app[KEYS].create("ingest", "shop backend")
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {ingest}"}
    assert (await client.put("/v1/rulesets/other", data=good, headers=headers)).status == 403
    assert not (folder / "other.json").exists()


async def test_put_refuses_overlong_durations_and_reserved_names(
    make_client: Any, settings: Settings, db: Any
) -> None:
    """A duration no date can hold once added to an event's time, `schema` (the editor's JSON Schema) and
    a name with a final newline (`$` in a pattern lets one in) are refused in words, never a 500."""
    folder = Path(settings.rulesets_dir)
    folder.mkdir(parents=True, exist_ok=True)
    client = await make_client(create_app(settings))
    huge = "99999999999999999999w"
    send = {"channel": "log", "template": "a/../../x", "after": huge}
    rule = {"name": "a", "once": {"per": huge}, "when": {"event": "t"}, "then": [{"send": send}]}
    text = json.dumps({"timeout": huge, "rules": [rule]})
    headers = {"Content-Type": "application/json"}
    response = await client.put("/v1/rulesets/long", data=text, headers=headers)
    assert response.status == 422
    paths = {e["path"]: e["message"] for e in (await response.json())["errors"]}
    too_long = f'expected a duration of at most 100 years, got "{huge}"'
    assert paths == {
        "$.timeout": too_long,
        "$.rules[0].once.per": too_long,
        "$.rules[0].then[0].send.after": too_long,
        "$.rules[0].then[0].send.template": "a template name may not contain a `..` part",
    }
    valid = json.dumps({"rules": [{"name": "a", "when": {"event": "t"}, "then": [{"set_flag": "f"}]}]})
    for name in ("schema", "abc%0A"):
        response = await client.put(f"/v1/rulesets/{name}", data=valid, headers=headers)
        assert response.status == 400, name
    assert sorted(p.name for p in folder.iterdir() if p.suffix == ".json") == []
    assert (await client.post("/v1/rulesets/reload")).status == 200
