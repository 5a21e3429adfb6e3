"""Junk never gets a server error from the console: random path segments, query strings and form fields
on every console route, logged in as admin (whose forms change things) and not logged in at all."""

from __future__ import annotations

import http.client
import re
import urllib.parse
from collections.abc import Iterator
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rulesvc.web.console.base import ConsoleRoute
from rulesvc.web.console.setup import PAGES
from tests.console.conftest import ConsoleService

ROUTES: list[ConsoleRoute] = [r for page in PAGES for r in page.ROUTES if r.path != "/logout"]
NAMES = [
    *("q", "ruleset", "rule", "channel", "status", "reason", "from", "to", "before", "before_id", "limit"),
    *("window", "since", "next", "contact_id", "email", "address", "events", "folder", "source", "", "x[]"),
]
JUNK = ["", "0", "-1", "500", "1e309", "2026-01-01T00:00:00Z", "dead", "9" * 40, "../..", "%00", "[]",
        "<script>alert(1)</script>", '{"a":', "cart_abandon", "email"]  # fmt: skip
VALUES = st.one_of(st.sampled_from(JUNK), st.text(max_size=60))
PAIRS = st.lists(st.tuples(st.sampled_from(NAMES) | st.text(max_size=10), VALUES), max_size=5)
SEGMENT = st.one_of(
    st.sampled_from(["x", "c-1", "a/b", "..", "%2e%2e", "cart_abandon", " "]),
    st.text(min_size=1, max_size=30),
)


def _request(
    service: ConsoleService, method: str, path: str, body: str = "", cookie: str = ""
) -> tuple[int, str, str]:
    conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=60)
    try:
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        if cookie:
            headers["Cookie"] = cookie
        conn.request(method, path, body=body.encode(), headers=headers)
        response = conn.getresponse()
        return (
            response.status,
            response.getheader("Content-Type") or "",
            response.read().decode(errors="replace"),
        )
    finally:
        conn.close()


@pytest.fixture(scope="module")
def session(console_service: ConsoleService) -> Iterator[tuple[str, str]]:
    """An admin session's cookie and CSRF token, logged in as a script would."""
    conn = http.client.HTTPConnection("127.0.0.1", console_service.port, timeout=30)
    conn.request("GET", "/console/login")
    response = conn.getresponse()
    page = response.read().decode()
    login_cookie = (response.getheader("Set-Cookie") or "").split(";")[0]
    token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
    body = urllib.parse.urlencode({"csrf_token": token, "api_key": console_service.key})
    conn.request(
        "POST",
        "/console/login",
        body=body,
        headers={"Cookie": login_cookie, "Content-Type": "application/x-www-form-urlencoded"},
    )
    response = conn.getresponse()
    response.read()
    cookies = response.msg.get_all("Set-Cookie") or []
    cookie = next(c for c in cookies if c.startswith("rulesvc_console=")).split(";")[0]
    conn.close()
    status, _, page = _request(console_service, "GET", "/console/", cookie=cookie)
    assert status == 200
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
    yield cookie, csrf


def concrete(route: ConsoleRoute, segment: str) -> str:
    return "/console" + re.sub(r"\{[^}]+\}", quote(segment, safe="") or "x", route.path)


@given(route=st.sampled_from(ROUTES), pairs=PAIRS, segment=SEGMENT, logged_in=st.booleans())
@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
def test_junk_never_gets_a_server_error(
    console_service: ConsoleService, session: tuple[str, str], route: ConsoleRoute,
    pairs: list[tuple[str, str]], segment: str, logged_in: bool,
) -> None:  # fmt: skip
    cookie, csrf = session if logged_in else ("", "")
    path = concrete(route, segment)
    if route.method == "GET":
        query = urllib.parse.urlencode(pairs)
        status, kind, page = _request(console_service, "GET", f"{path}?{query}", cookie=cookie)
    else:
        form = urllib.parse.urlencode([("csrf_token", csrf), *pairs])
        status, kind, page = _request(console_service, route.method, path, form, cookie)
    assert status < 500, (route.method, path, pairs, status, page[:2000])
    if not logged_in:
        assert status in (303, 401, 403, 404, 405), (path, status)
    if status == 200:
        assert kind.startswith("text/html"), kind
        assert "<script>alert(1)</script>" not in page  # whatever came in is escaped
