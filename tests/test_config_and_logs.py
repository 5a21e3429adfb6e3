"""Settings precedence and validation; what the logs may and may not contain."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from rulesvc import logs
from rulesvc.cli import build_parser
from rulesvc.config import SETTINGS_DOC, ConfigError, Settings, load_settings


def test_defaults() -> None:
    settings = load_settings(environ={})
    assert (settings.host, settings.port, settings.mongodb_uri) == ("127.0.0.1", 8080, None)
    assert settings.event_retention_days == 90


def test_toml_then_env_then_flags(tmp_path: Path) -> None:
    config = tmp_path / "rulesvc.toml"
    config.write_text('port = 9000\ndatabase = "shop"\nevent_retention_days = 30\n')
    settings = load_settings(environ={"RULESVC_CONFIG": str(config), "RULESVC_PORT": "9100"})
    assert (settings.port, settings.database, settings.event_retention_days) == (9100, "shop", 30)
    assert settings.with_overrides(port=9200, host=None).port == 9200


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"RULESVC_PORT": "eighty"}, "port"),
        ({"RULESVC_PORT": "70000"}, "port"),
        ({"RULESVC_LOG_FORMAT": "xml"}, "log_format"),
        ({"RULESVC_EVENT_RETENTION_DAYS": "-1"}, "event_retention_days"),
        ({"RULESVC_CONFIG": "/nonexistent.toml"}, "cannot read"),
        ({"RULESVC_EMBEDDED_MONGOD": "false"}, "MONGODB_URI is required"),
    ],
)
def test_invalid_settings_are_named(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(environ=environ)


def test_unknown_toml_key_rejected(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("prot = 1\n")
    with pytest.raises(ConfigError, match="prot"):
        load_settings(config, environ={})


def test_serve_help_documents_every_setting(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    out = capsys.readouterr().out
    assert {d.field for d in SETTINGS_DOC} == set(Settings.__struct_fields__)
    for doc in SETTINGS_DOC:
        assert doc.env in out


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    out = io.StringIO()
    logs.configure("json", "info", out)
    yield out
    structlog.reset_defaults()


def test_logs_mask_personal_data_and_keys(json_logs: io.StringIO) -> None:
    structlog.get_logger("t").info(
        "contact.updated",
        email="jane.doe@example.com",
        note="call +49 151 12345678 or mail jane.doe@example.com",
        authorization="Bearer sk_live_abcdef123456",
        detail={"password": "hunter2", "id": "evt-20261122-000123"},
    )
    line = json.loads(json_logs.getvalue().strip().splitlines()[-1])
    text = json.dumps(line)
    assert "jane.doe" not in text and "12345678" not in text
    assert "sk_live" not in text and "hunter2" not in text
    assert line["email"] == "j***@example.com"
    assert line["detail"]["id"] == "evt-20261122-000123"  # ids are not phone numbers
    assert "***78" in line["note"]


def test_logs_never_show_api_keys(json_logs: io.StringIO) -> None:
    key = "rsk_0123456789ab_" + "x" * 43
    structlog.get_logger("t").warning("auth.failed", header=f"Bearer {key}", note=f"tried {key}")
    text = json_logs.getvalue()
    assert key not in text and "x" * 20 not in text
