"""Logging in and out of the console in a real Chromium, the cookie's flags, CSRF, and the read scope."""

from __future__ import annotations

import re
import urllib.parse
from typing import Any
from urllib.parse import quote

import msgspec

from rulesvc.config import Settings
from rulesvc.web.app import create_app
from tests.browser import Browser
from tests.console.conftest import ConsoleService, raw, script_session
from tests.helpers import wait_for


def test_nothing_without_login(console_service: ConsoleService) -> None:
    for path in ("/console/", "/console/contacts", "/console/static/console.css", "/console/no-such-page"):
        status, headers, _ = raw(console_service, "GET", path)
        assert status == 303, path
        assert headers["Location"].startswith("/console/login?next="), path
    status, _, page = raw(console_service, "POST", "/console/logout", "csrf_token=x")
    assert status == 401 and "session has ended" in page
    # An API key in the Authorization header is the API's, not a console login.
    status, headers, _ = raw(
        console_service, "GET", "/console/", headers={"Authorization": f"Bearer {console_service.key}"}
    )
    assert status == 303


def test_login_cookie_flags_and_logout(console_service: ConsoleService, new_browser: Browser) -> None:
    assert console_service.key is not None
    new_browser.open("/console/contacts")
    assert new_browser.path.startswith("/console/login")
    new_browser.field("API key").send_keys("rsk_000000000000_" + "x" * 40)
    new_browser.press("Log in")
    assert "not a valid API key" in new_browser.text()
    new_browser.field("API key").send_keys(console_service.key)
    new_browser.press("Log in")
    new_browser.wait(lambda: new_browser.path == "/console/contacts", "the page asked for before login")
    cookie = new_browser.cookies()["rulesvc_console"]
    assert cookie["httpOnly"] is True
    assert cookie["sameSite"] == "Strict"
    assert cookie["path"] == "/console/"
    assert cookie["secure"] is False  # plain HTTP here; see test_secure_cookie_behind_tls_proxy
    assert 11 * 3600 < float(cookie["expiry"]) - __import__("time").time() <= 12 * 3600 + 5  # type: ignore[arg-type]
    assert console_service.key not in new_browser.driver.page_source
    token = str(cookie["value"])
    new_browser.shot("login-done")
    new_browser.press("Log out")
    new_browser.wait(lambda: "You are logged out" in new_browser.text(), "the logged-out notice")
    new_browser.shot("login")
    new_browser.open("/console/")
    assert new_browser.path.startswith("/console/login")
    # The old cookie, replayed by someone who copied it, opens nothing: the session is gone on the server.
    status, headers, _ = raw(
        console_service, "GET", "/console/", headers={"Cookie": f"rulesvc_console={token}"}
    )
    assert status == 303 and headers["Location"].startswith("/console/login")


def test_csrf(console_service: ConsoleService) -> None:
    assert console_service.key is not None
    cookie, csrf = script_session(console_service, console_service.key)
    other_cookie, other_csrf = script_session(console_service, console_service.key)
    # No token, another session's token, the right token from another site: refused, still logged in.
    for body, headers in (
        ("", {"Cookie": cookie}),
        (f"csrf_token={other_csrf}", {"Cookie": cookie}),
        (f"csrf_token={csrf}", {"Cookie": cookie, "Origin": "https://evil.example"}),
        (f"csrf_token={csrf}", {"Cookie": cookie, "Referer": "https://evil.example/page"}),
    ):
        status, _, page = raw(console_service, "POST", "/console/logout", body, headers)
        assert status == 403 and "came from another site" in page, (body, headers)
        assert raw(console_service, "GET", "/console/", headers={"Cookie": cookie})[0] == 200
    # The login form has its own token (double submit): a forged login is refused.
    status, _, page = raw(
        console_service, "POST", "/console/login", f"csrf_token=x&api_key={console_service.key}"
    )
    assert status == 403 and "out of date" in page
    # With its own token from its own origin, the change goes through.
    host = f"http://127.0.0.1:{console_service.port}"
    status, headers, _ = raw(
        console_service, "POST", "/console/logout", f"csrf_token={csrf}", {"Cookie": cookie, "Origin": host}
    )
    assert status == 303 and headers["Location"] == "/console/login?bye=1"
    assert raw(console_service, "GET", "/console/", headers={"Cookie": cookie})[0] == 303
    assert raw(console_service, "GET", "/console/", headers={"Cookie": other_cookie})[0] == 200


def test_scopes(console_service: ConsoleService, new_browser: Browser) -> None:
    ingest = console_service.new_key("ingest")
    new_browser.open("/console/login")
    new_browser.field("API key").send_keys(ingest)
    new_browser.press("Log in")
    assert "cannot open the console" in new_browser.text()
    read = console_service.new_key("read")
    new_browser.field("API key").send_keys(read)
    new_browser.press("Log in")
    new_browser.wait(lambda: new_browser.path == "/console/", "the overview")
    assert "read-only" in new_browser.text()
    read_cookie = str(new_browser.cookies()["rulesvc_console"]["value"])
    # A read key looks at what an admin looks at through the API too, and changes nothing there.
    key_id = read.split("_")[1]
    saved, console_service.key = console_service.key, read
    try:
        assert console_service.request("GET", "/v1/rulesets")[0] == 200
        assert console_service.request("POST", "/v1/rulesets/reload")[0] == 403
        assert (
            console_service.request("POST", "/v1/events", {"id": "e", "type": "x", "contact_id": "c"})[0]
            == 403
        )
    finally:
        console_service.key = saved
    # A read session logs out as any other (its form is not a change).
    new_browser.press("Log out", expect="You are logged out")
    assert (
        raw(console_service, "GET", "/console/", headers={"Cookie": f"rulesvc_console={read_cookie}"})[0]
        == 303
    )
    new_browser.login(read)
    # Revoking the key ends its console session at the next page (within the key cache's 5 seconds).
    assert console_service.cli("keys", "revoke", key_id).returncode == 0
    new_browser.wait(
        lambda: (new_browser.driver.refresh(), new_browser.path.startswith("/console/login"))[1],
        "the login page after the key was revoked",
        timeout=15,
    )


def test_security_headers(console_service: ConsoleService) -> None:
    assert console_service.key is not None
    cookie, _ = script_session(console_service, console_service.key)
    for path in ("/console/", "/console/login"):
        status, headers, _ = raw(console_service, "GET", path, headers={"Cookie": cookie})
        assert status == 200, path
        assert "script-src 'self'" in headers["Content-Security-Policy"]
        assert "unsafe-inline" not in headers["Content-Security-Policy"]
        assert headers["X-Frame-Options"] == "DENY"
        assert headers["Cache-Control"] == "no-store"


async def _login_cookie_header(client: Any) -> str:
    """Log in to an in-process app with its test key; the session cookie's Set-Cookie header."""
    key = client.session.headers["Authorization"].split(" ", 1)[1]
    form = await client.get("/console/login", headers={"Authorization": ""})
    page = await form.text()
    token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
    login_cookie = form.cookies["rulesvc_console_login"].value
    answer = await client.post(
        "/console/login",
        data={"csrf_token": token, "api_key": key},
        headers={"Cookie": f"rulesvc_console_login={login_cookie}"},
        allow_redirects=False,
    )
    assert answer.status == 303
    return next(v for v in answer.headers.getall("Set-Cookie") if v.startswith("rulesvc_console="))


async def test_secure_cookie_behind_tls_proxy(make_client: Any, settings: Settings) -> None:
    """Behind a proxy that terminates TLS the service sees plain HTTP: RULESVC_CONSOLE_SECURE_COOKIES marks
    the cookies Secure all the same, so a browser never sends them over plain HTTP."""
    plain = await make_client(create_app(settings))
    assert "secure" not in (await _login_cookie_header(plain)).lower().split("; ")
    behind_tls = await make_client(create_app(msgspec.structs.replace(settings, console_secure_cookies=True)))
    flags = [f.strip().lower() for f in (await _login_cookie_header(behind_tls)).split(";")]
    assert "secure" in flags and "httponly" in flags and "samesite=strict" in flags


def test_a_forged_change_changes_nothing(console_service: ConsoleService) -> None:
    """Another site's form (the right cookie rides along in an old browser, the token it cannot read) posts
    a cancel: refused, and the API shows the send still waiting."""
    assert console_service.key is not None
    console_service.post_events(
        {"id": "forged-cart", "type": "cart_updated", "contact_id": "c-forged", "attributes": {"value": 20}}
    )

    def scheduled() -> list[dict[str, Any]]:
        status, body = console_service.request("GET", "/v1/contacts/c-forged/messages?status=scheduled")
        assert status == 200, body
        return body["messages"]  # type: ignore[no-any-return]

    pending = wait_for(scheduled, what="the cart reminders scheduled")
    message_id = pending[0]["message_id"]
    cookie, csrf = script_session(console_service, console_service.key)
    action = f"/console/messages/{quote(message_id, safe='')}/cancel"
    for body, headers in (
        ("", {"Cookie": cookie, "Origin": "https://evil.example"}),
        (f"csrf_token={csrf}", {"Cookie": cookie, "Origin": "https://evil.example"}),
        ("csrf_token=guessed", {"Cookie": cookie}),
    ):
        status, _, page = raw(console_service, "POST", action, body, headers)
        assert status == 403 and "came from another site" in page
    assert [m["message_id"] for m in scheduled()].count(message_id) == 1
    # The same form from the console's own page goes through.
    origin = {"Cookie": cookie, "Origin": f"http://127.0.0.1:{console_service.port}"}
    status, _, _ = raw(console_service, "POST", action, f"csrf_token={csrf}", origin)
    assert status == 303
    assert (
        console_service.request("GET", f"/v1/messages/{quote(message_id, safe='')}")[1]["status"]
        == "cancelled"
    )


async def test_a_proxy_terminating_tls(make_client: Any, settings: Settings) -> None:
    """Behind a TLS proxy the browser's forms say `https://host`, the service sees http: accepted with
    RULESVC_CONSOLE_SECURE_COOKIES; another host is still refused; RULESVC_CONSOLE_ORIGIN names the one."""
    client = await make_client(create_app(msgspec.structs.replace(settings, console_secure_cookies=True)))
    cookie = (await _login_cookie_header(client)).split(";")[0]
    page = await (await client.get("/console/", headers={"Cookie": cookie, "Authorization": ""})).text()
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
    host = f"{client.host}:{client.port}"
    headers = {"Cookie": cookie, "Authorization": ""}
    for origin, status in (("https://evil.example", 403), (f"https://{host}", 303)):
        answer = await client.post("/console/logout", data={"csrf_token": csrf}, allow_redirects=False,
                                   headers={**headers, "Origin": origin})  # fmt: skip
        assert answer.status == status, origin
    named = await make_client(
        create_app(msgspec.structs.replace(settings, console_origin="https://rules.shop.example"))
    )
    cookie = (await _login_cookie_header(named)).split(";")[0]
    page = await (await named.get("/console/", headers={"Cookie": cookie, "Authorization": ""})).text()
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
    headers = {"Cookie": cookie, "Authorization": ""}
    for origin, status in ((f"http://{named.host}:{named.port}", 403), ("https://rules.shop.example", 303)):
        answer = await named.post("/console/logout", data={"csrf_token": csrf}, allow_redirects=False,
                                  headers={**headers, "Origin": origin})  # fmt: skip
        assert answer.status == status, origin


def test_odd_tokens_and_bodies_are_refused_not_errors(console_service: ConsoleService) -> None:
    assert console_service.key is not None
    cookie, _ = script_session(console_service, console_service.key)
    # A token that is not ASCII: compared as bytes, refused (a str compare_digest would raise: a 500).
    status, _, _ = raw(console_service, "POST", "/console/logout", "csrf_token=%C3%A9", {"Cookie": cookie})
    assert status == 403
    status, _, _ = raw(console_service, "POST", "/console/login", "csrf_token=%C3%A9&api_key=x",
                       {"Cookie": "rulesvc_console_login=abc"})  # fmt: skip
    assert status == 403
    # An oversized login form is refused before it is read.
    status, _, page = raw(console_service, "POST", "/console/login", "api_key=" + "x" * 20_000)
    assert status == 413 and "too large" in page
    # Logging in again from the same browser ends the session it had, and only that one.
    other, _ = script_session(console_service, console_service.key)
    status, headers, page = raw(console_service, "GET", "/console/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert status == 200 and token is not None
    form = urllib.parse.urlencode({"csrf_token": token.group(1), "api_key": console_service.key})
    both = {"Cookie": f"{headers['Set-Cookie']}; {cookie}"}
    status, headers, _ = raw(console_service, "POST", "/console/login", form, both)
    assert status == 303
    assert raw(console_service, "GET", "/console/", headers={"Cookie": cookie})[0] == 303
    assert raw(console_service, "GET", "/console/", headers={"Cookie": other})[0] == 200
    assert raw(console_service, "GET", "/console/", headers={"Cookie": headers["Set-Cookie"]})[0] == 200


async def test_a_session_has_its_keys_rate_limit(make_client: Any, settings: Settings) -> None:
    client = await make_client(create_app(msgspec.structs.replace(settings, rate_limit=2.0)))
    cookie = (await _login_cookie_header(client)).split(";")[0]
    statuses = [(await client.get("/console/", headers={"Cookie": cookie, "Authorization": ""})).status
                for _ in range(8)]  # fmt: skip
    assert statuses[0] == 200 and 429 in statuses
