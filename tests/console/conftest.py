"""Fixtures of the console's browser tests: one real service per test module (shipped rulesets, the
embedded mongod, email to a real SMTP server, webhooks to a real receiver), and a logged-in Chromium."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.browser import Browser
from tests.service import ServiceProcess
from tests.smtp_server import Mailbox, smtp_server

ROOT = Path(__file__).resolve().parent.parent.parent


class ConsoleService(ServiceProcess):
    mailbox: Mailbox

    def post_events(self, *events: dict[str, object]) -> None:
        status, body = self.request("POST", "/v1/events", list(events))
        assert status == 202 or status == 200, (status, body)

    def new_key(self, scope: str) -> str:
        done = self.cli("keys", "create", "--scope", scope, "--name", f"console test {scope}")
        assert done.returncode == 0, done.stderr
        return done.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def console_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsoleService]:
    workdir = tmp_path_factory.mktemp("console")
    shutil.copytree(ROOT / "rulesets", workdir / "rulesets")
    with smtp_server() as (mailbox, smtp_port):
        env = {
            "RULESVC_RULESETS_DIR": str(workdir / "rulesets"),
            "RULESVC_QUIET_HOURS": "",
            "RULESVC_CHANNEL_EMAIL_HOST": "127.0.0.1",
            "RULESVC_CHANNEL_EMAIL_PORT": str(smtp_port),
            "RULESVC_CHANNEL_EMAIL_SECURITY": "none",
            "RULESVC_CHANNEL_EMAIL_FROM": "shop@example.test",
            "RULESVC_CHANNEL_EMAIL_SECURITY": "none",  # the test SMTP server speaks no TLS
        }
        service = ConsoleService(workdir, env=env)
        service.mailbox = mailbox
        service.start()
        try:
            yield service
        finally:
            service.stop()


@pytest.fixture(scope="module")
def browser(console_service: ConsoleService) -> Iterator[Browser]:
    """Logged in with the service's admin key."""
    opened = Browser(console_service.url)
    try:
        assert console_service.key is not None
        opened.login(console_service.key)
        yield opened
    finally:
        opened.close()


@pytest.fixture
def new_browser(console_service: ConsoleService) -> Iterator[Browser]:
    """A fresh Chromium, not logged in."""
    opened = Browser(console_service.url)
    try:
        yield opened
    finally:
        opened.close()
