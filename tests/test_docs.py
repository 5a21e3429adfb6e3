"""The documentation's examples run: every `curl` in the `sh` blocks of README.md and docs/*.md against
a running service (with $KEY set, as a reader would), each answer compared with the `# ...` line under
it; every JSON ruleset and every action shown in docs/rulesets.md passes the ruleset parser."""

from __future__ import annotations

import json
import re
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rulesvc.config import Settings
from rulesvc.core.ruleformat import InvalidRuleset, parse_ruleset
from rulesvc.store.mongod import EmbeddedMongod
from rulesvc.web.lifecycle import load_channels
from tests.service import ServiceProcess

ROOT = Path(__file__).resolve().parent.parent


def sh_blocks(markdown: str) -> list[str]:
    return re.findall(r"```sh\n(.*?)```", markdown, re.S)


def curl_examples(markdown: str) -> list[tuple[str, str | None]]:
    """(command, expected output or None) for every curl in the `sh` blocks; continued lines joined."""
    examples: list[tuple[str, str | None]] = []
    for block in sh_blocks(markdown):
        lines = block.replace("\\\n", " ").splitlines()
        for i, line in enumerate(lines):
            if not line.startswith("curl "):
                continue
            after = lines[i + 1] if i + 1 < len(lines) else ""
            expected = after[2:] if after.startswith("# {") else None
            examples.append((line, expected))
    return examples


def matches(expected: Any, actual: Any) -> bool:
    """Equal, except that a documented string ending in `...` stands for any string it begins, and a
    documented list ending in "..." for any list it begins: what an example elides."""
    if isinstance(expected, str) and expected.endswith("...") and isinstance(actual, str):
        return actual.startswith(expected[:-3])
    if isinstance(expected, list) and isinstance(actual, list):
        if expected and expected[-1] == "...":
            head = expected[:-1]
            return len(actual) >= len(head) and all(map(matches, head, actual[: len(head)]))
        return len(expected) == len(actual) and all(map(matches, expected, actual))
    if isinstance(expected, dict) and isinstance(actual, dict):
        return expected.keys() == actual.keys() and all(matches(v, actual[k]) for k, v in expected.items())
    return bool(expected == actual)


@pytest.fixture(scope="module")
def service(mongod: EmbeddedMongod, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """As after `make run` in the project folder: the shipped rulesets, no channel configured."""
    env = {"MONGODB_URI": mongod.uri, "RULESVC_DATABASE": f"docs_{uuid.uuid4().hex[:8]}",
           "RULESVC_RULESETS_DIR": str(ROOT / "rulesets")}  # fmt: skip
    process = ServiceProcess(tmp_path_factory.mktemp("docs"), env=env)
    process.start()
    process.key = process.cli("keys", "create", "--scope", "admin", "--name", "docs").stdout.splitlines()[-1]
    yield process
    process.stop()


def test_readme_curl_examples_answer_as_documented(service: ServiceProcess) -> None:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    examples = [e for page in pages for e in curl_examples(page.read_text())]
    assert len(examples) >= 7 and sum(e is not None for _, e in examples) >= 3, examples
    assert service.key is not None
    for command, expected in examples:
        line = command.replace("127.0.0.1:8080", f"127.0.0.1:{service.port}")
        line = "curl -sS -w '\\n%{http_code}' " + line.removeprefix("curl ")
        done = subprocess.run(["bash", "-c", line], env={"KEY": service.key, "PATH": "/usr/bin:/bin"},
                              capture_output=True, text=True, timeout=30)  # fmt: skip
        body, _, status = done.stdout.rpartition("\n")
        assert done.returncode == 0 and status.isdigit(), (command, done.stderr)
        if expected is None:
            assert int(status) < 400, (command, status, body)
            continue
        wanted = json.loads(expected)
        assert int(status) < 500 and matches(wanted, json.loads(body)), (command, status, body)
        if int(status) >= 400:
            assert "error" in wanted, (command, status)  # an example of an error says so


def test_ruleset_examples_parse() -> None:
    """The fenced JSON rulesets, and each action of the actions table inside a rule."""
    text = (ROOT / "docs" / "rulesets.md").read_text()
    channels, _ = load_channels(Settings())
    names = channels.names()
    blocks = re.findall(r"```json\n(.*?)```", text, re.S)
    assert blocks
    for i, block in enumerate(blocks):
        parse_ruleset(f"example{i}.json", block.encode(), names)
    table = text[text.index("## Actions (`then`)") : text.index("### `send`")]
    actions = []
    for span in re.findall(r"`(\{.*?\})`", table):
        try:
            actions.append(json.loads(span))
        except ValueError:
            assert "..." in span, span  # elided on purpose, as `{"remove": ...}`
    assert len(actions) >= 12
    for action in actions:
        rule = {"name": "rule_a", "when": {"event": "t"}, "then": [action]}
        ruleset = json.dumps({"rules": [rule]}).encode()
        try:
            parse_ruleset("action.json", ruleset, names)
        except InvalidRuleset as exc:
            raise AssertionError(f"{action}: {exc.errors}") from None
