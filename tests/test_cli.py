"""`rulesvc check`, `rulesvc simulate` and `rulesvc schema` from the command line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from tests.helpers import at, event

ROOT = Path(__file__).parent.parent


def rulesvc(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rulesvc", *args], capture_output=True, text=True, input=stdin, timeout=60
    )


def test_check_shipped_rulesets_pass() -> None:
    result = rulesvc("check", str(ROOT / "rulesets"))
    assert result.returncode == 0, result.stdout + result.stderr
    # Valid; here no channel but log, inapp and webhook has settings, so the sends on others are warned of.
    lines = result.stdout.splitlines()
    assert lines and all(line.startswith("warning: ") and "is not configured" in line for line in lines)


TYPO_TEMPLATE_PREFIX = (
    '{"rules": [{"name": "a", "when": {"event": "x"}, "then": [{"send": {"channel": "log", "template": '
)


def test_check_prints_every_error_with_file_and_json_path(tmp_path: Path) -> None:
    (tmp_path / "good.json").write_text((ROOT / "rulesets" / "cart_abandon.json").read_text())
    shutil.copytree(ROOT / "rulesets" / "templates", tmp_path / "templates")
    (tmp_path / "typo_template.json").write_text(TYPO_TEMPLATE_PREFIX + '"cart_abandon/emial"}}]}]}')
    (tmp_path / "broken.json").write_text('{"rules": [{"name": "r", "when": {"event": "x"}, "then": [')
    typo = json.dumps(
        {
            "rules": [
                {
                    "name": "a",
                    "when": {"event": "x"},
                    "then": [{"send": {"channel": "pigeon", "template": "t"}}],
                },
                {"name": "a", "when": {"event": "x"}, "then": [{"set_flag": "f", "clear_flag": "g"}]},
            ]
        },
        indent=1,
    )
    (tmp_path / "typo.json").write_text(typo)
    (tmp_path / "Bad-Name.json").write_text("{}")
    result = rulesvc("check", str(tmp_path))
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert "Bad-Name.json: $: file name must be lower case letters, digits and _" in lines
    end = len('{"rules": [{"name": "r", "when": {"event": "x"}, "then": [') + 1  # one past the last character
    assert (
        f"broken.json:1:{end}: $.rules[0].then[0]: invalid JSON: the file ends early: expected a value"
        in (result.stdout)
    )

    def where(at: int) -> str:
        """line:column of the character at `at`, counted here from the text written."""
        return f"{typo.count(chr(10), 0, at) + 1}:{at - typo.rfind(chr(10), 0, at)}"

    pigeon = where(typo.index('"pigeon"'))
    second_a = where(typo.index('"a"', typo.index('"a"') + 1))
    action = where(typo.rfind("{", 0, typo.index('"set_flag"')))
    assert f"typo.json:{pigeon}: $.rules[0].then[0].send.channel: unknown channel `pigeon`" in result.stdout
    assert f"typo.json:{second_a}: $.rules[1].name: duplicate rule name `a`" in lines
    assert f"typo.json:{action}: $.rules[1].then[0]: an action has exactly one key" in result.stdout
    missing = (
        f"typo_template.json:1:{len(TYPO_TEMPLATE_PREFIX) + 1}: $.rules[0].then[0].send.template: "
        "template `cart_abandon/emial` not found"
    )
    assert f"{missing} in {tmp_path}/templates" in lines
    assert "1 of 5 rulesets valid" in result.stderr


def test_simulate_prints_the_timeline(tmp_path: Path) -> None:
    events = tmp_path / "events.ndjson"
    events.write_text(
        "\n".join(
            json.dumps(e)
            for e in [
                event("c", "cart_updated", value=20),
                event("d", "cart_updated", contact="c2", value=30),
                event("p", "purchased", contact="c2", minutes=19),
            ]
        )
    )
    result = rulesvc("simulate", str(events), "--rulesets", str(ROOT / "rulesets"))
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if "cart_abandon/" in line]
    assert len(lines) == 4
    assert (
        lines[0].startswith(at(minutes=19))
        and "c2" in lines[0]
        and lines[0].endswith("cancelled  cancelled_by_event (cancelled by purchased)")
    )
    # The send rules apply as in the service: here no channel is configured and nobody consented.
    assert lines[2].startswith(at(minutes=20)) and "push:cart_abandon/push" in lines[2]
    assert lines[2].endswith(
        "suppressed  channel_not_configured "
        "(push: not configured: missing setting: service_account_file or service_account_json)"
    )
    assert lines[3].startswith(at(hours=12)) and "email:cart_abandon/email" in lines[3]
    assert "0 message(s) would be sent" in result.stderr

    as_json = rulesvc("simulate", "-", "--rulesets", str(ROOT / "rulesets"), "--json", "--until", at(hours=1),
                      stdin=events.read_text())  # fmt: skip
    assert as_json.returncode == 0, as_json.stderr
    actions = [a for a in json.loads(as_json.stdout)["actions"] if a["ruleset"] == "cart_abandon"]
    assert [(a["contact_id"], a["channel"], a["status"]) for a in actions] == [
        ("c2", "push", "cancelled"),
        ("c2", "email", "cancelled"),
        ("c1", "push", "suppressed"),
    ]


def test_simulate_reports_bad_input(tmp_path: Path) -> None:
    events = tmp_path / "events.ndjson"
    events.write_text('{"id": "a", "type": "cart_updated"}\n')
    result = rulesvc("simulate", str(events), "--rulesets", str(ROOT / "rulesets"))
    assert result.returncode == 1
    assert "event 0: $.contact_id: required" in result.stderr


def test_schema_file_is_current() -> None:
    result = rulesvc("schema")
    assert json.loads(result.stdout) == json.loads((ROOT / "rulesets" / "schema.json").read_text())


def test_commands_exit_cleanly_every_time() -> None:
    """Regression: a msgspec type (constrained str in a union with a list) crashed the interpreter at
    exit about one run in four; a command must not fail after doing its work."""
    codes = [rulesvc("schema").returncode for _ in range(12)]
    assert codes == [0] * 12


def test_invalid_event_types_are_reported_with_paths(tmp_path: Path) -> None:
    send = {"channel": "log", "template": "t", "cancel_on": ["9x", {"event": []}]}
    rule = {"name": "a", "when": {"event": ["ok", "bad type"]}, "then": [{"send": send}]}
    text = json.dumps({"rules": [rule]})
    (tmp_path / "names.json").write_text(text)
    lines = [line for line in rulesvc("check", str(tmp_path)).stdout.splitlines() if "event type" in line]
    bad, nine, empty = (text.find(token) + 1 for token in ('"bad type"', '"9x"', "[]"))
    assert lines == [
        f"names.json:1:{bad}: $.rules[0].when.event[1]: invalid event type 'bad type'",
        f"names.json:1:{nine}: $.rules[0].then[0].send.cancel_on[0]: invalid event type '9x'",
        f"names.json:1:{empty}: $.rules[0].then[0].send.cancel_on[1].event: needs at least one event type",
    ]
