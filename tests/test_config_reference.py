"""docs/configuration.md is generated from the settings types and cannot drift: it must equal what
`python -m rulesvc.configdoc` prints, and every setting must have its documentation row."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import msgspec

from rulesvc.config import SETTINGS_DOC, ConfigError, Settings, load_settings
from rulesvc.configdoc import reference

DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def test_configuration_md_is_the_generated_reference() -> None:
    printed = subprocess.run(
        [sys.executable, "-m", "rulesvc.configdoc"], capture_output=True, text=True, check=True,
        env={**os.environ},
    ).stdout  # fmt: skip
    assert printed == reference()
    assert DOC.read_text() == printed, (
        "docs/configuration.md is stale: python -m rulesvc.configdoc > docs/configuration.md"
    )


def test_every_setting_has_one_row_and_every_row_a_setting() -> None:
    fields = [f.name for f in msgspec.structs.fields(Settings)]
    rows = [d.field for d in SETTINGS_DOC]
    assert sorted(rows) == sorted(fields)
    assert len(set(rows)) == len(rows)
    assert len({d.env for d in SETTINGS_DOC}) == len(rows)


def rows() -> dict[str, list[str]]:
    """The settings table: TOML key -> [variable, type, default, meaning], backticks dropped."""
    found = {}
    text = DOC.read_text()
    for line in text[text.index("## Settings") : text.index("## Rate limits")].splitlines():
        if line.startswith("| `") and line.count(" | ") == 4:
            key, *rest = [cell.strip("| `") for cell in line.split(" | ")]
            found[key] = rest
    return found


def test_each_row_shows_the_default_that_applies_and_the_variable_that_sets_it() -> None:
    """The table's default is the value a service without configuration uses, and setting the variable
    the row names changes that setting."""
    table = rows()
    defaults = load_settings(environ={})
    assert table["[channels.NAME]"][0] == "RULESVC_CHANNEL_<NAME>_<KEY>"
    changed = {"integer": ("7", 7), "number": ("2.5", 2.5), "boolean": ("true", True)}
    checked = 0
    for doc in SETTINGS_DOC:
        if doc.field == "channels":
            continue
        env, kind, default, _ = table[doc.field]
        assert env == doc.env
        value = getattr(defaults, doc.field)
        if value is None:
            shown = "unset"
        elif isinstance(value, bool):
            shown = str(value).lower()
        elif isinstance(value, str):
            shown = f'"{value}"'
        elif isinstance(value, dict):
            shown = "{" + ", ".join(f"{k} = {v}" for k, v in value.items()) + "}"
        else:
            shown = str(value)
        assert default == shown, doc.field
        if kind in changed and doc.field not in {"port", "mongod_cache_gb", "workers"}:
            raw, expected = changed[kind]
            try:
                loaded = load_settings(environ={doc.env: raw})
            except ConfigError:
                continue  # out of this setting's range: `load_settings` read the variable
            assert getattr(loaded, doc.field) == expected, doc.env
            checked += 1
    assert checked > 15


def test_the_reference_ends_with_every_plugin_channel_settings() -> None:
    """Computed from the installed plugins: every channel a plugin configures has its section, with
    the variable of one of its settings (a setting the test names, not taken from the generator)."""
    text = reference()
    channel_part = text[text.index("## Channel settings") :]
    for name, variable in (("email", "RULESVC_CHANNEL_EMAIL_HOST"), ("sms", "RULESVC_CHANNEL_SMS_AUTH_TOKEN"),
                           ("webhook", "RULESVC_CHANNEL_WEBHOOK_URL")):  # fmt: skip
        assert f"### channels.{name}" in channel_part and variable in channel_part, name
