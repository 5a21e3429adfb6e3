"""The Overview page in a real Chromium: health as /readyz says it, then events posted through the API
showing up as numbers, in the throughput chart and as messages by channel, judged against the API and
against what the SMTP server received."""

from __future__ import annotations

from selenium.webdriver.common.by import By

from tests.browser import Browser
from tests.console.conftest import ConsoleService
from tests.helpers import wait_for

CONTACTS = ("c-ann", "c-bob", "c-cem")
THROUGHPUT = "Events per second, by quarter hour (UTC)"


def overview(service: ConsoleService) -> dict[str, object]:
    status, body = service.request("GET", "/v1/overview")
    assert status == 200, body
    return body  # type: ignore[no-any-return]


def test_overview_health_numbers_and_plots(browser: Browser, console_service: ConsoleService) -> None:
    browser.open("/console/")
    text = browser.text()
    # Health: what /readyz says, each reason as a sentence (the shipped rulesets send on channels this
    # service has not configured).
    ready = console_service.request("GET", "/readyz")[1]
    assert ready["status"] == "degraded" and ready["reasons"]
    assert "Working, but something needs a look" in text
    for reason in ready["reasons"]:
        assert reason in text
    assert "No events in the last 24 hours" in text
    plugins = console_service.request("GET", "/v1/channels")[1]["plugins"]
    table = browser.driver.find_element(By.CSS_SELECTOR, "table.plugins").text
    assert all(p["name"] in table for p in plugins)

    # Three orders (each a confirmation email) and four product views, through the API.
    for contact in CONTACTS:
        profile = {"email": f"{contact}@example.com", "consent": {"email": True}}
        assert console_service.request("PUT", f"/v1/contacts/{contact}", profile)[0] == 201
    events = [
        {"id": f"order-{c}", "type": "purchased", "contact_id": c, "attributes": {"order_id": f"A-{c}"}}
        for c in CONTACTS
    ]
    events += [
        {"id": f"view-{i}", "type": "product_viewed", "contact_id": "c-ann",
         "attributes": {"product_id": f"p{i}"}}
        for i in range(4)
    ]  # fmt: skip
    console_service.post_events(*events)
    wait_for(
        lambda: len(console_service.mailbox.messages) == 3, what="three confirmations at the SMTP server"
    )

    def counted() -> dict[str, object] | None:
        got = overview(console_service)
        emails = [m for m in got["messages"] if m["channel"] == "email"]  # type: ignore[attr-defined, index]
        done = got["now"]["decided"] == 7 and emails and emails[0]["counts"].get("sent") == 3  # type: ignore[index]
        return got if done else None

    api = wait_for(counted, what="the overview counting the events and sends")
    assert api["now"]["accepted"] == 7  # type: ignore[index]
    browser.wait_for_text("events accepted per second (last minute: 7)")
    text = browser.text()
    assert "events decided per second (last minute: 7)" in text
    assert "No events in the last 24 hours" not in text

    # The throughput plot: a real SVG, with its 96 quarter hours as a table for those who cannot see it.
    chart = browser.driver.find_element(By.CSS_SELECTOR, f"svg[aria-label='{THROUGHPUT}']")
    assert chart.find_elements(By.TAG_NAME, "path")
    rows = browser.driver.find_elements(
        By.XPATH,
        f"//figure[figcaption[normalize-space(.)='{THROUGHPUT}']]//details//tbody/tr",
    )
    assert len(rows) == 96
    # Messages by channel: the bars, and the table with what the SMTP server received.
    assert browser.driver.find_elements(
        By.CSS_SELECTOR, "svg[aria-label='Messages by channel: what became of them']"
    )
    table = browser.driver.find_element(By.CSS_SELECTOR, "table.messages-by-status")
    headers = [th.text for th in table.find_elements(By.CSS_SELECTOR, "thead th")]
    email = [td.text for td in table.find_elements(By.XPATH, ".//tr[th[normalize-space(.)='email']]/td")]
    assert dict(zip(headers[1:], email, strict=True))["sent"] == str(len(console_service.mailbox.messages))
    # The big numbers lead to the messages they count.
    dead = browser.driver.find_element(
        By.XPATH, "//div[contains(@class, 'tile')][contains(., 'dead letters')]/a"
    )
    assert dead.text == str(api["dead_letters"]) == "0"
    assert dead.get_attribute("href").endswith("/console/messages?status=dead")
    due = browser.driver.find_element(
        By.XPATH, "//div[contains(@class, 'tile')][contains(., 'sends due now')]/a"
    )
    assert due.get_attribute("href").endswith("/console/messages?status=scheduled")
    assert due.text == str(api["due"]["due_now"])  # type: ignore[index]
    browser.shot("overview")


def test_a_query_parameter_is_refused_as_the_api_refuses_it(
    browser: Browser, console_service: ConsoleService
) -> None:
    for page, api in (
        ("/console/?limt=5", "/v1/overview?limt=5"),
        ("/console/channels?x=1", "/v1/channels?x=1"),
    ):
        status, refusal = console_service.request("GET", api)
        assert status == 422
        browser.open(page)
        assert refusal["error"] in browser.text(), page  # e.g. unknown query parameter `limt`: ...
