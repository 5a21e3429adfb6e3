"""Junk never gets a server error from the console: random path segments, query strings and form fields
on every console route, logged in as admin (whose forms change things) and not logged in at all."""

from __future__ import annotations

import re
import urllib.parse
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rulesvc.web.console.base import ConsoleRoute
from rulesvc.web.console.setup import PAGES
from tests.console.conftest import ConsoleService, raw, script_session

ROUTES: list[ConsoleRoute] = [r for page in PAGES for r in page.ROUTES if r.path != "/logout"]
NAMES = [
    *("q", "ruleset", "rule", "channel", "status", "reason", "from", "to", "before", "before_id", "limit"),
    *("window", "since", "next", "contact_id", "email", "address", "events", "folder", "source", "", "x[]"),
    *("csrf_token", "api_key", "to", "candidate", "contact_mode"),
]
JUNK = ["", "0", "-1", "500", "1e309", "2026-01-01T00:00:00Z", "dead", "9" * 40, "../..", "%00", "[]",
        "<script>alert(1)</script>", '{"a":', "cart_abandon", "email"]  # fmt: skip
VALUES = st.one_of(st.sampled_from(JUNK), st.text(max_size=60))
PAIRS = st.lists(st.tuples(st.sampled_from(NAMES) | st.text(max_size=10), VALUES), max_size=5)
SEGMENT = st.one_of(
    st.sampled_from(["x", "c-1", "a/b", "..", "%2e%2e", "cart_abandon", " "]),
    st.text(min_size=1, max_size=30),
)


@pytest.fixture(scope="module")
def session(console_service: ConsoleService) -> tuple[str, str]:
    """An admin session's cookie and CSRF token, logged in as a script would."""
    assert console_service.key is not None
    return script_session(console_service, console_service.key)


def concrete(route: ConsoleRoute, segment: str) -> str:
    return "/console" + re.sub(r"\{[^}]+\}", quote(segment, safe="") or "x", route.path)


@given(route=st.sampled_from(ROUTES), pairs=PAIRS, segment=SEGMENT, logged_in=st.booleans())
@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
def test_junk_never_gets_a_server_error(
    console_service: ConsoleService, session: tuple[str, str], route: ConsoleRoute,
    pairs: list[tuple[str, str]], segment: str, logged_in: bool,
) -> None:  # fmt: skip
    cookie, csrf = session if logged_in else ("", "")
    cookie_header = {"Cookie": cookie} if cookie else {}
    path = concrete(route, segment)
    if route.method == "GET":
        query = urllib.parse.urlencode(pairs)
        status, headers, page = raw(console_service, "GET", f"{path}?{query}", headers=cookie_header)
    else:
        form = urllib.parse.urlencode([("csrf_token", csrf), *pairs])
        status, headers, page = raw(console_service, route.method, path, form, cookie_header)
    assert status < 500, (route.method, path, pairs, status, page[:2000])
    if not logged_in:
        assert status in (303, 401, 403, 404, 405), (path, status)
    if status == 200:
        assert headers["Content-Type"].startswith("text/html"), headers
        assert "<script>alert(1)</script>" not in page  # whatever came in is escaped
