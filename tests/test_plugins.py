"""Plugins: built-ins first, then entry points; RULESVC_PLUGINS; failures isolated; pip install is enough."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rulesvc import hookimpl
from rulesvc.config import Settings
from rulesvc.default_plugins.builtin import BUILTIN_PLUGINS
from rulesvc.plugins import load_plugins
from rulesvc.web.app import create_app
from tests.helpers import go, send, settled, setup

PACKAGE = Path(__file__).parent / "plugin_package"


class Broken:
    @hookimpl
    def register_channels(self, register: Any, config: Any) -> None:
        """Fails, as a plugin with a bug would."""
        raise RuntimeError("boom")


def test_a_failing_plugin_is_reported_and_the_others_load() -> None:
    registry, reports = load_plugins([*BUILTIN_PLUGINS, ("broken", Broken())], only=[])
    by_name = {r.name: r for r in reports}
    assert by_name["broken"].error == "RuntimeError: boom"
    assert {"log", "inapp", "email"} <= registry.names()


def test_rulesvc_plugins_restricts_entry_points() -> None:
    everything, reports = load_plugins(BUILTIN_PLUGINS)
    assert everything.get("email").status()[1].startswith("missing setting")  # the installed plugin
    assert any(r.source.startswith("rulesvc-email") for r in reports)
    only_sms, reports = load_plugins(BUILTIN_PLUGINS, only=["sms"])
    assert only_sms.get("email").status()[1].startswith("no plugin provides `email`")
    assert not only_sms.get("sms").status()[1].startswith("no plugin provides")
    assert [r.name for r in reports] == ["builtin", "sms"]


def test_channel_settings_from_toml_and_environment() -> None:
    registry, _ = load_plugins(
        BUILTIN_PLUGINS,
        channel_settings={"webhook": {"url": "https://hooks.example/x"}},
        environ={"RULESVC_CHANNEL_WEBHOOK_SECRET": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"},
    )
    assert registry.get("webhook").status() == (True, "POST https://hooks.example/x")


DIST = "rulesvc-echo-test-plugin"


def installed(env: dict[str, str] | None = None) -> bool:
    """Whether a fresh interpreter (with `env`) finds the echo plugin's distribution."""
    probe = f"import importlib.metadata as m, sys; m.distribution({DIST!r})"
    return subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True).returncode == 0


@pytest.fixture
def echo_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The plugin pip-installed into a throw-away folder on the path, as `pip install` would make it
    importable, without touching the environment the suite runs in."""
    site, source = tmp_path / "site", tmp_path / "plugin_package"
    shutil.copytree(PACKAGE, source)  # the build writes next to the sources: not into the repository
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    subprocess.run(
        [*pip, "install", "--no-deps", "--target", str(site), str(source)], check=True, timeout=300
    )
    monkeypatch.syspath_prepend(str(site))  # this process finds its entry point too
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    try:
        yield site
    finally:
        sys.modules.pop("rulesvc_echo", None)
        importlib.invalidate_caches()


async def test_pip_installed_plugin_is_used_with_no_change_to_the_service(
    make_client: Any, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, echo_site: Path
) -> None:
    listing = subprocess.run([sys.executable, "-m", "rulesvc", "plugins"], capture_output=True, text=True)
    assert f"{DIST} 0.0.1" in listing.stdout and "echo" in listing.stdout
    outside = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    outside["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p and p != str(echo_site))
    assert installed() and not installed(
        outside
    )  # the suite's environment is as it was: nothing installed into it

    outbox = tmp_path / "outbox.ndjson"
    monkeypatch.setenv("RULESVC_CHANNEL_ECHO_OUTBOX", str(outbox))
    client = await make_client(create_app(setup(settings, [send("echo", transactional=True)])))
    await go(client, code="E-42")
    [msg] = await settled(client)
    assert msg["status"] == "sent"
    [line] = outbox.read_text().splitlines()
    assert json.loads(line)["body"] == "Code E-42"
    channels = await (await client.get("/v1/channels")).json()
    echo_channel = {"name": "echo", "configured": True, "detail": f"writes to {outbox}", "deduplicates": True,
                    "callbacks": False, "send_timeout_seconds": 10.0, "kind": "message channel"}  # fmt: skip
    [listed] = [c for c in channels["channels"] if c["name"] == "echo"]
    assert {k: listed[k] for k in echo_channel} == echo_channel
    # and its sends: the one above
    assert (listed["sent_24h"], listed["failed_24h"], listed["error_rate_24h"]) == (1, 0, 0.0)
    assert listed["last_sent_at"] == msg["sent_at"]
    echo = next(p for p in channels["plugins"] if p["name"] == "echo")  # a plugin without settings_type
    assert echo["provides"] == [
        {
            "name": "echo",
            "kind": "message channel",
            "configured": True,
            "detail": f"writes to {outbox}",
            "last_run": None,
            "last_error": None,
        }
    ]
