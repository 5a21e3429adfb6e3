"""The messages pages in a real Chromium: filter with the API's own parameters, find a dead letter (a
webhook whose receiver on 127.0.0.1 answers 500 until the sends give up), retry it from the page and see
the receiver get it; one message with every field. The API and the receiver are the judges."""

from __future__ import annotations

import json
import shutil
import time
import urllib.parse
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

from tests.browser import Browser
from tests.console.conftest import ROOT, ConsoleService
from tests.helpers import message_doc
from tests.webhook_flow import SECRET, Receiver


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    r.status = 500  # a provider failing for now: each send is retried, then given up (dead)
    yield r
    r.server.shutdown()


@pytest.fixture(scope="module")
def console_service(tmp_path_factory: pytest.TempPathFactory, receiver: Receiver) -> Iterator[ConsoleService]:
    """The shipped rulesets and one more: each `ping` sends a webhook at once (transactional)."""
    workdir = tmp_path_factory.mktemp("console-messages")
    rulesets = workdir / "rulesets"
    shutil.copytree(ROOT / "rulesets", rulesets)
    (rulesets / "templates" / "ping.body").write_text("ping {{ params.n }}")
    send = {"channel": "webhook", "template": "ping", "transactional": True, "per": "attributes.n",
            "params": {"n": "$attributes.n"}}  # fmt: skip
    (rulesets / "hooks.json").write_text(json.dumps({"rules": [
        {"name": "ping", "when": {"event": "ping"}, "then": [{"send": send}]}]}))  # fmt: skip
    env = {"RULESVC_RULESETS_DIR": str(rulesets), "RULESVC_QUIET_HOURS": "",
           "RULESVC_CHANNEL_WEBHOOK_URL": receiver.url, "RULESVC_CHANNEL_WEBHOOK_SECRET": SECRET,
           "RULESVC_MAX_ATTEMPTS": "2", "RULESVC_RETRY_BASE_SECONDS": "0.2"}  # fmt: skip
    service = ConsoleService(workdir, env=env)
    service.start()
    try:
        yield service
    finally:
        service.stop()


def api(service: ConsoleService, path: str) -> Any:
    status, body = service.request("GET", path)
    assert status == 200, (path, status, body)
    return body


def until(check: Any, what: str, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"waited {timeout}s for {what}")


def test_retry_a_dead_letter_from_the_messages_page(
    console_service: ConsoleService, browser: Browser, receiver: Receiver
) -> None:
    console_service.post_events(
        {"id": "ping-1", "type": "ping", "contact_id": "hooked-1", "attributes": {"n": 1}}
    )

    def dead() -> Any:
        found = api(console_service, "/v1/messages?status=dead&ruleset=hooks")["messages"]
        return found[0] if found else None

    message = until(dead, "the webhook message to be dead")
    mid = message["message_id"]
    assert receiver.received(mid) == [500, 500]  # two attempts (RULESVC_MAX_ATTEMPTS), both refused

    browser.open("/console/messages")
    browser.follow("Dead letters")
    assert "status=dead" in browser.path
    row = browser.driver.find_element(By.XPATH, "//tbody/tr[contains(., 'hooks / ping')]")
    assert "dead" in row.text and "gave up after 2 attempts" in row.text and "provider_error" in row.text
    browser.shot("messages")

    receiver.status = 204
    browser.press("Retry", within=row)
    assert "sent again now" in browser.text()
    until(lambda: receiver.received(mid) == [500, 500, 204], "the receiver to get the retried message")
    quoted = urllib.parse.quote(mid, safe="")
    judged = until(lambda: (m := api(console_service, f"/v1/messages/{quoted}"))["status"] == "sent" and m,
                   "the message to be sent")  # fmt: skip
    assert judged["retries"] == 1

    browser.open(f"/console/messages/{quoted}")
    text = browser.text()
    assert "sent on webhook" in text and mid in text
    retries = browser.driver.find_element(By.XPATH, "//tr[th='Retries by an operator']/td")
    assert retries.text == "1"
    assert '"n": 1' in browser.driver.find_element(By.TAG_NAME, "pre").text
    browser.shot("message")


def test_filters_refuse_what_the_api_refuses(console_service: ConsoleService, browser: Browser) -> None:
    console_service.post_events(
        {"id": "ping-2", "type": "ping", "contact_id": "hooked-2", "attributes": {"n": 2}}
    )
    until(lambda: api(console_service, "/v1/messages?contact_id=hooked-2")["messages"], "the second message")
    browser.open("/console/messages")
    browser.field("Ruleset").send_keys("hooks")
    browser.field("Contact").send_keys("hooked-2")
    browser.press("Filter")
    rows = browser.driver.find_elements(By.XPATH, "//tbody/tr")
    expected = api(console_service, "/v1/messages?ruleset=hooks&contact_id=hooked-2")["messages"]
    assert len(rows) == len(expected) == 1 and "hooked-2" in rows[0].text

    browser.open("/console/messages")
    browser.field("Rule").send_keys("ping")
    browser.press("Filter")
    assert "query parameter `rule` needs `ruleset`" in browser.text()
    browser.open("/console/messages")
    browser.field("To (UTC)").send_keys("yesterday")
    Select(browser.field("Status")).select_by_visible_text("dead")
    browser.press("Filter")
    assert "query parameter `to` must be an RFC 3339 time" in browser.text()
    assert Select(browser.field("Status")).first_selected_option.text == "dead"  # the form keeps its values


def test_paging_through_the_list(console_service: ConsoleService, browser: Browser) -> None:
    for n in (3, 4):
        console_service.post_events(
            {"id": f"ping-{n}", "type": "ping", "contact_id": "pager", "attributes": {"n": n}}
        )
    until(lambda: len(api(console_service, "/v1/messages?contact_id=pager")["messages"]) == 2, "two messages")
    newest_first = [
        m["message_id"] for m in api(console_service, "/v1/messages?contact_id=pager")["messages"]
    ]
    browser.open("/console/messages?contact_id=pager&limit=1")
    seen = []
    for _ in range(2):
        (row,) = browser.driver.find_elements(By.XPATH, "//tbody/tr")
        seen.append(
            row.find_element(By.XPATH, ".//a[contains(@href, '/console/messages/')]").get_attribute("href")
        )
        if len(seen) < 2:
            browser.follow("Older messages")
    assert "Older messages" not in browser.text()
    assert [urllib.parse.unquote(h.rsplit("/console/messages/", 1)[1]) for h in seen] == newest_first


def test_give_up_on_a_dead_letter_from_the_messages_page(
    console_service: ConsoleService, browser: Browser, receiver: Receiver
) -> None:
    receiver.status = 500
    try:
        console_service.post_events(
            {"id": "ping-9", "type": "ping", "contact_id": "hooked-9", "attributes": {"n": 9}}
        )
        dead = "/v1/messages?status=dead&contact_id=hooked-9"
        found = until(lambda: api(console_service, dead)["messages"], "the webhook message to be dead")
    finally:
        receiver.status = 204
    mid, gave_up = found[0]["message_id"], found[0]["detail"]
    browser.open("/console/messages?status=dead&contact_id=hooked-9")
    row = browser.driver.find_element(By.XPATH, "//tbody/tr[contains(., 'hooked-9')]")
    assert [b.text for b in row.find_elements(By.TAG_NAME, "button")] == ["Retry", "Cancel"]

    def confirmed() -> None:
        browser.button("Cancel", within=row).click()
        browser.driver.switch_to.alert.accept()  # the confirm() of console.js

    browser.loads(confirmed)
    assert "cancelled: it will never be sent" in browser.text()
    assert browser.driver.find_elements(By.XPATH, "//tbody/tr") == []  # gone from the dead letters
    judged = api(console_service, f"/v1/messages/{urllib.parse.quote(mid, safe='')}")
    assert (judged["status"], judged["reason"]) == ("cancelled", "cancelled_by_operator")
    assert judged["detail"] == f"dismissed by an operator; it was dead: {gave_up}"
    assert receiver.received(mid) == [500, 500]  # never sent again
    browser.open(f"/console/messages/{urllib.parse.quote(mid, safe='')}")
    assert f"dismissed by an operator; it was dead: {gave_up}" in browser.text()
    assert browser.driver.find_elements(By.XPATH, "//main//button") == []  # nothing left to do


def test_an_uncertain_send_offers_retry_and_cancel(console_service: ConsoleService, browser: Browser) -> None:
    """Planted as a call cut off leaves it (tests/test_interrupted_sends.py): it may have arrived."""
    now = datetime.now(UTC)
    mid = "hooks/ping/doubt-1/planted"
    said = "cut off after 10s without an answer, so it may have arrived; not sent again"
    with console_service.db() as database:
        database.messages.insert_one(
            message_doc(
                mid,
                "doubt-1",
                "webhook",
                now,
                ruleset="hooks",
                rule="ping",
                status="uncertain",
                reason="timeout",
                detail=said,
                attempt=1,
                sent_channel="webhook",
            )
        )
    browser.open("/console/messages")
    browser.follow("Uncertain")
    row = browser.driver.find_element(By.XPATH, "//tbody/tr[contains(., 'doubt-1')]")
    assert "uncertain" in row.text and "may have arrived" in row.text
    assert [b.text for b in row.find_elements(By.TAG_NAME, "button")] == ["Retry", "Cancel"]
    browser.shot("messages-uncertain")
    browser.open(f"/console/messages/{urllib.parse.quote(mid, safe='')}")
    buttons = [b.text for b in browser.driver.find_elements(By.XPATH, "//main//button")]
    assert buttons == ["Retry", "Cancel"]
    assert api(console_service, f"/v1/messages/{urllib.parse.quote(mid, safe='')}")["status"] == "uncertain"
