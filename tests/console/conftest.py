"""Fixtures of the console's browser tests: one real service per test module (shipped rulesets, the
embedded mongod, email to a real SMTP server, webhooks to a real receiver), and a logged-in Chromium."""

from __future__ import annotations

import http.client
import re
import shutil
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
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


@contextmanager
def running_console(workdir: Path, env: dict[str, str] | None = None) -> Iterator[ConsoleService]:
    """`rulesvc serve` in `workdir` with the shipped rulesets and email to a real SMTP server (plain SMTP,
    as aiosmtpd speaks it); `env` adds or changes settings."""
    shutil.copytree(ROOT / "rulesets", workdir / "rulesets")
    with smtp_server() as (mailbox, smtp_port):
        settings = {
            "RULESVC_RULESETS_DIR": str(workdir / "rulesets"),
            "RULESVC_QUIET_HOURS": "",
            "RULESVC_CHANNEL_EMAIL_HOST": "127.0.0.1",
            "RULESVC_CHANNEL_EMAIL_PORT": str(smtp_port),
            "RULESVC_CHANNEL_EMAIL_SECURITY": "none",  # the test SMTP server speaks no TLS
            "RULESVC_CHANNEL_EMAIL_FROM": "shop@example.test",
            **(env or {}),
        }
        service = ConsoleService(workdir, env=settings)
        service.mailbox = mailbox
        service.start()
        try:
            yield service
        finally:
            service.stop()


@pytest.fixture(scope="module")
def console_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsoleService]:
    with running_console(tmp_path_factory.mktemp("console")) as service:
        yield service


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


def raw(
    service: ConsoleService, method: str, path: str, body: str = "", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], str]:
    """A request as a script or another site would send it: no browser, no redirects followed."""
    conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=30)
    try:
        sent = {"Content-Type": "application/x-www-form-urlencoded", **(headers or {})}
        conn.request(method, path, body=body.encode(), headers=sent)
        response = conn.getresponse()
        headers = dict(response.getheaders())
        cookies = [
            c.split(";")[0]
            for c in response.msg.get_all("Set-Cookie") or []
            if "=;" not in c.split(";")[0] + ";"
        ]
        headers["Set-Cookie"] = "; ".join(c for c in cookies if not c.endswith('=""'))
        return response.status, headers, response.read().decode()
    finally:
        conn.close()


def script_session(service: ConsoleService, key: str) -> tuple[str, str]:
    """Log in as a script would: the login form's token and cookie, then the session cookie and the page's
    CSRF token."""
    status, headers, page = raw(service, "GET", "/console/login")
    form_token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
    login_cookie = headers["Set-Cookie"].split(";")[0]
    body = urllib.parse.urlencode({"csrf_token": form_token, "api_key": key, "next": "/console/"})
    status, headers, _ = raw(service, "POST", "/console/login", body, {"Cookie": login_cookie})
    assert status == 303, status
    cookie = headers["Set-Cookie"].split(";")[0]
    status, _, page = raw(service, "GET", "/console/", headers={"Cookie": cookie})
    assert status == 200
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
    return cookie, csrf
