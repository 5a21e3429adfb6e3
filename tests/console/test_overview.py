"""The Overview page in a real Chromium: health as /readyz says it, then events posted through the API
showing up as numbers, in the throughput chart and as messages by channel, judged against the API and
against what the SMTP server received."""

from __future__ import annotations

import re
from datetime import UTC, datetime

from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement

from tests.browser import Browser
from tests.console.conftest import ConsoleService
from tests.helpers import wait_for

CONTACTS = ("c-ann", "c-bob", "c-cem")
THROUGHPUT = "Events per second, by quarter hour (UTC)"
MESSAGES = "Messages by channel and status, last 24 hours"


def overview(service: ConsoleService) -> dict[str, object]:
    status, body = service.request("GET", "/v1/overview")
    assert status == 200, body
    return body  # type: ignore[no-any-return]


def cells(row: WebElement) -> list[str]:
    """A table row's cells as their text, shown or not (the data tables sit in a closed <details>)."""
    found = row.find_elements(By.XPATH, "./th|./td")
    return [str(c.get_attribute("textContent")).strip() for c in found]


def data_table(browser: Browser, caption: str) -> list[list[str]]:
    """The rows of the "Data" table under the chart captioned so."""
    rows = browser.driver.find_elements(
        By.XPATH, f"//figure[figcaption[normalize-space(.)='{caption}']]//details//tbody/tr"
    )
    return [cells(r) for r in rows]


def quarter_hour(at: datetime) -> datetime:
    return at.replace(minute=at.minute - at.minute % 15, second=0, microsecond=0)


def test_health_says_what_to_do_about_unconfigured_channels(
    browser: Browser, console_service: ConsoleService
) -> None:
    browser.open("/console/")
    text = browser.text()
    # Health: what /readyz says, each reason as a sentence (the shipped rulesets send on channels this
    # service has not configured).
    ready = console_service.request("GET", "/readyz")[1]
    assert ready["status"] == "degraded" and ready["reasons"]
    assert "Working, but something needs a look" in text
    for reason in ready["reasons"]:
        assert reason in text
    # Each reason about a channel the API says is not configured leads to that channel's setup.
    listing = console_service.request("GET", "/v1/channels")[1]
    unconfigured = {c["name"] for c in listing["channels"] if not c["configured"]}
    named = {c for c in unconfigured for r in ready["reasons"] if f"on `{c}`, which is not configured" in r}
    assert named >= {"push", "sms", "webpush"}
    health = browser.driver.find_element(By.CSS_SELECTOR, "section.health")
    links = {a.text: a.get_attribute("href") for a in health.find_elements(By.TAG_NAME, "a")}
    assert {t: h.split("/console", 1)[1] for t, h in links.items()} == {
        f"Set up {c} on the Channels page": f"/channels#state-{c}" for c in named
    }
    assert (
        "Rulesets that send on an unconfigured channel get those messages suppressed "
        "(channel_not_configured) until it is set up." in health.text
    )
    browser.follow("Set up push on the Channels page")
    assert browser.driver.current_url.endswith("/console/channels#state-push")
    push = browser.driver.find_element(By.ID, "state-push")
    assert push.text.startswith("push") and "not configured" in push.text
    browser.open("/console/")
    plugins = listing["plugins"]
    table = browser.driver.find_element(By.CSS_SELECTOR, "table.plugins").text
    assert all(p["name"] in table for p in plugins)
    browser.shot("overview-fresh")


def test_numbers_and_plots_after_orders(browser: Browser, console_service: ConsoleService) -> None:
    browser.open("/console/")
    assert "No events in the last 24 hours" in browser.text()
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
    before = datetime.now(UTC)
    console_service.post_events(*events)
    after = datetime.now(UTC)
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

    # The big numbers: rates over the last minute or two (the counters are per minute), said so.
    accepted_7 = re.compile(r"events/s accepted over the last \d+ s \(7 events\)")

    decided_7 = re.compile(r"events/s decided over the last \d+ s \(7 events\)")

    def shown() -> bool:
        browser.open("/console/")
        text = browser.text()
        return accepted_7.search(text) is not None and decided_7.search(text) is not None

    browser.wait(shown, "7 events accepted", timeout=30)
    text = browser.text()
    seconds = int(re.search(r"events/s decided over the last (\d+) s \(7 events\)", text).group(1))  # type: ignore[union-attr]
    assert 60 <= seconds <= 120
    accepted_tile = browser.driver.find_element(
        By.XPATH, "//div[contains(@class, 'tile')][contains(., 'accepted over the last')]"
    )
    assert accepted_tile.find_element(By.CLASS_NAME, "value").text == f"{7 / seconds:.2f}"
    assert "No events in the last 24 hours" not in text
    shown_at = datetime.fromisoformat(
        str(browser.driver.find_element(By.CSS_SELECTOR, "p.lead time").get_attribute("datetime"))
    )
    api = overview(console_service)  # read after the page: complete quarter hours are the same

    # The throughput plot: a real SVG; decided drawn dashed over accepted, so both show when equal.
    chart = browser.driver.find_element(By.CSS_SELECTOR, f"svg[aria-label='{THROUGHPUT}']")
    paths = {
        p.find_element(By.TAG_NAME, "title").get_attribute("textContent"): p.get_attribute("stroke-dasharray")
        for p in chart.find_elements(By.TAG_NAME, "path")
    }
    assert paths["Events accepted per second"] is None and paths["Events decided per second"]
    # Every time label inside the picture (a label cut off at the right edge read "04:0").
    right = chart.rect["x"] + chart.rect["width"]
    labels = [t for t in chart.find_elements(By.TAG_NAME, "text") if ":" in t.text]
    assert labels and all(t.rect["x"] >= chart.rect["x"] and t.rect["x"] + t.rect["width"] <= right + 0.5
                          for t in labels)  # fmt: skip

    # Its data: the API's 96 quarter hours; the one holding the events has 7 over its seconds.
    rows = data_table(browser, THROUGHPUT)
    assert len(rows) == 96
    by_time = {p["at"][:16].replace("T", " "): p for p in api["series"]}  # type: ignore[attr-defined]
    holding = {quarter_hour(before), quarter_hour(after)}  # one, but for a post across a quarter's end
    events_row = None
    for label, accepted, decided in rows:
        start = datetime.fromisoformat(label).replace(tzinfo=UTC)
        seconds = min(900.0, (shown_at - start).total_seconds())
        if float(accepted):
            assert start in holding and events_row is None, (label, accepted)
            events_row = label
            assert abs(float(accepted) - 7 / seconds) <= 0.0051, (label, accepted, seconds)
        if seconds == 900.0 and label in by_time:  # a complete quarter hour: as the API says it
            point = by_time[label]
            assert abs(float(accepted) - point["accepted_per_second"]) <= 0.0051
            assert abs(float(decided) - point["decided_per_second"]) <= 0.0051
    assert events_row is not None
    # The legend names the window of the last point: the latest quarter hour, as in the table.
    legend = browser.driver.find_element(
        By.XPATH, f"//figure[figcaption[normalize-space(.)='{THROUGHPUT}']]//div[@class='legend']"
    ).text
    assert f"Events accepted per second, latest quarter hour: {rows[-1][1]}/s" in legend

    # Messages by channel: every status the counters hold, each its own bar, and how they count.
    assert (
        "Each message is counted once in every status it went through (a sent message was scheduled first)"
        in browser.text()
    )
    bars = {label: value for label, value in data_table(browser, MESSAGES)}
    orders = len(CONTACTS)
    assert bars["email · Scheduled"] == bars["email · Sent"] == str(orders)
    [email] = [m for m in api["messages"] if m["channel"] == "email"]  # type: ignore[attr-defined]
    words = {"scheduled": "Scheduled", "sent": "Sent", "suppressed": "Suppressed", "failed": "Failed"}
    for status, n in email["counts"].items():
        assert bars[f"email · {words.get(status, status)}"] == str(n), status
    table = browser.driver.find_element(By.CSS_SELECTOR, "table.messages-by-status")
    headers = [th.text for th in table.find_elements(By.CSS_SELECTOR, "thead th")]
    email_row = [td.text for td in table.find_elements(By.XPATH, ".//tr[th[normalize-space(.)='email']]/td")]
    counts = dict(zip(headers[1:], email_row, strict=True))
    assert counts["sent"] == str(len(console_service.mailbox.messages)) == counts["scheduled"]
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
