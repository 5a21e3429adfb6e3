"""The contact pages in a real Chromium against a real service with the shipped rulesets: find a contact
by email, watch its event and reminders appear, cancel a pending send, read why a message was not sent.
The API (`GET /v1/...` with the admin key) is the judge of what the page claims."""

from __future__ import annotations

import hashlib
import re
import urllib.parse
from datetime import UTC, datetime, timedelta
from typing import Any

from selenium.webdriver.common.by import By

from tests.browser import Browser
from tests.console.conftest import ConsoleService
from tests.stored import plant_sync


def in_holdout(ruleset: str, contact_id: str, share: float = 0.05) -> bool:
    """The documented holdout draw (core/assign.py): SHA-256 of salt (the name), id and purpose."""
    digest = hashlib.sha256(f"{ruleset}\x00{contact_id}\x00holdout".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


def api(service: ConsoleService, path: str) -> Any:
    status, body = service.request("GET", path)
    assert status == 200, (path, status, body)
    return body


def test_find_contact_watch_reminders_and_cancel_one(
    console_service: ConsoleService, browser: Browser
) -> None:
    contact = next(c for c in (f"shopper-{n}" for n in range(100)) if not in_holdout("cart_abandon", c))
    status, _ = console_service.request("PUT", f"/v1/contacts/{contact}", {
        "email": "Shopper.One@Example.com", "consent": {"email": True, "push": True},
        "push_tokens": ["tok-1"], "attributes": {"first_name": "Sam"}})  # fmt: skip
    assert status == 201
    cart = {"value": 49.9, "currency": "EUR", "items": ["mug"]}
    console_service.post_events(
        {"id": f"{contact}-cart-1", "type": "cart_updated", "contact_id": contact, "attributes": cart}
    )

    browser.open("/console/contacts")
    browser.field("Contact id, email or phone").send_keys("shopper.one@EXAMPLE.com")
    browser.press("Search")
    assert "1 contact found" in browser.text()
    browser.shot("contact-search")
    browser.follow(contact)
    assert browser.path == f"/console/contacts/{contact}"

    # The event and the two reminders the cart_abandon rules schedule (push after 20 min, email after 12 h).
    browser.wait_for_text("event cart_updated")
    browser.wait_for_text("cart_abandon / remind")
    pending = api(console_service, f"/v1/contacts/{contact}/messages?status=scheduled")["messages"]
    assert sorted(m["channel"] for m in pending) == ["email", "push"]
    rows = browser.driver.find_elements(By.XPATH, "//section[@aria-labelledby='pending-h']//tbody/tr")
    assert len(rows) == 2
    assert "push" in rows[0].text and "email" in rows[1].text  # soonest first
    assert re.search(r"in (1[0-9]|20) min", rows[0].text), rows[0].text  # 20 min after the event, read later
    browser.shot("contact-pending")

    push = next(m for m in pending if m["channel"] == "push")
    cancel = browser.button("Cancel", within=rows[0])

    def confirmed() -> None:
        cancel.click()
        browser.driver.switch_to.alert.accept()  # the confirm() of console.js

    browser.loads(confirmed)
    assert "cancelled: it will never be sent" in browser.text()
    assert browser.path == f"/console/contacts/{contact}"
    judged = api(console_service, "/v1/messages/" + urllib.parse.quote(push["message_id"], safe=""))
    assert judged["status"] == "cancelled" and judged["reason"] == "cancelled_by_operator"
    rows = browser.driver.find_elements(By.XPATH, "//section[@aria-labelledby='pending-h']//tbody/tr")
    assert len(rows) == 1 and "email" in rows[0].text
    timeline = browser.driver.find_element(By.XPATH, "//section[@aria-labelledby='timeline-h']").text
    assert "cancelled by an operator" in timeline

    # A purchase cancels the other reminder (its `cancel_on`) and sends the order confirmation.
    order = {"order_id": "A-1001", "value": 49.9, "currency": "EUR", "items": [{"sku": "mug", "name": "Mug"}]}
    console_service.post_events(
        {"id": f"{contact}-order-1", "type": "purchased", "contact_id": contact, "attributes": order}
    )
    browser.wait_for_text("cancelled by purchased at")
    browser.wait_for_text("sent on email at")
    email = next(m for m in pending if m["channel"] == "email")
    judged = api(console_service, "/v1/messages/" + urllib.parse.quote(email["message_id"], safe=""))
    assert (judged["status"], judged["reason"]) == ("cancelled", "cancelled_by_event")
    sent = api(console_service, f"/v1/contacts/{contact}/messages?status=sent")["messages"]
    assert [(m["ruleset"], m["rule"]) for m in sent] == [("confirmations", "order")]
    assert any("A-1001" in str(mail["Subject"]) for _, _, mail in console_service.mailbox.messages)
    assert "Nothing waiting to be sent" in browser.text()
    browser.shot("contact")


def test_suppressed_message_says_why(console_service: ConsoleService, browser: Browser) -> None:
    contact = "no-consent-1"
    status, _ = console_service.request(
        "PUT", f"/v1/contacts/{contact}", {"email": "quiet@example.com", "consent": {"email": False}}
    )
    assert status == 201
    console_service.post_events({"id": f"{contact}-addr", "type": "address_changed", "contact_id": contact,
                                 "attributes": {"city": "Berlin"}})  # fmt: skip
    browser.open(f"/console/contacts/{contact}")
    browser.wait_for_text("not sent: the contact has no email consent")
    (message,) = api(console_service, f"/v1/contacts/{contact}/messages")["messages"]
    assert (message["status"], message["reason"], message["ruleset"]) == (
        "suppressed",
        "no_consent",
        "lifecycle",
    )
    why = browser.driver.find_element(By.ID, "ruleset-lifecycle").text
    assert "1 not sent" in why and "no email consent" in why and "no_consent" in why
    # A ruleset that decided nothing says what the contact never did.
    cart = browser.driver.find_element(By.ID, "ruleset-cart_abandon").text
    assert "never did what it listens to" in cart and "cart_updated" in cart
    reach = browser.driver.find_element(By.XPATH, "//section[@aria-labelledby='reach-h']").text
    assert "no marketing consent" in reach

    # Two product views in a session without a cart: browse_abandon's in-app offer, in the inbox.
    for n in (1, 2):
        view = {"product_id": f"p{n}"}
        console_service.post_events(
            {"id": f"{contact}-view-{n}", "type": "product_viewed", "contact_id": contact, "attributes": view}
        )

    def in_the_inbox_section() -> str | None:
        """The page's in-app inbox, once it shows the offer (the history may list it a moment before the
        in-app send has put it in the inbox)."""
        browser.driver.refresh()
        shown = browser.driver.find_element(By.XPATH, "//section[@aria-labelledby='inbox-h']").text
        return shown if "browse_abandon/free_shipping" in shown else None

    browser.wait(in_the_inbox_section, "the offer in the page's in-app inbox")
    shown = browser.driver.find_element(By.XPATH, "//section[@aria-labelledby='inbox-h']").text
    inbox = api(console_service, f"/v1/contacts/{contact}/inbox")["messages"]
    assert [m["template"] for m in inbox] == ["browse_abandon/free_shipping"]
    assert "not shown yet" in shown
    browser.shot("contact-suppressed")


def test_unknown_contact_and_bad_search(console_service: ConsoleService, browser: Browser) -> None:
    browser.open("/console/contacts/nobody-at-all")
    assert "No contact `nobody-at-all`" in browser.text()
    browser.open("/console/contacts?q=" + "x" * 300)
    assert "query parameter `q`" in browser.text()  # the API's own refusal, on the page
    browser.open("/console/contacts?q=ghost%40example.com")
    assert "No contact matches" in browser.text()


def test_a_read_only_session_sees_pending_sends_without_cancel(
    console_service: ConsoleService, new_browser: Browser
) -> None:
    contact = next(c for c in (f"looker-{n}" for n in range(100)) if not in_holdout("cart_abandon", c))
    cart = {"value": 20, "currency": "EUR", "items": ["pen"]}
    console_service.post_events(
        {"id": f"{contact}-cart", "type": "cart_updated", "contact_id": contact, "attributes": cart}
    )
    new_browser.login(console_service.new_key("read"))
    new_browser.open(f"/console/contacts/{contact}")
    new_browser.wait_for_text("cart_abandon / remind")
    section = new_browser.driver.find_element(By.XPATH, "//section[@aria-labelledby='pending-h']")
    assert len(section.find_elements(By.XPATH, ".//tbody/tr")) == 2
    assert section.find_elements(By.XPATH, ".//button") == []
    assert "read-only" in new_browser.text()


def test_the_why_panel_says_what_became_of_each_event(
    console_service: ConsoleService, browser: Browser
) -> None:
    """An event too old for cart_abandon's 12h timeout, one set aside after failing (planted as the inbox
    leaves it), and one waiting for the rules (its contact held by a send in progress, planted)."""
    contact, now = "late-1", datetime.now(UTC)
    old = (now - timedelta(hours=13)).replace(microsecond=0)
    cart = {"value": 5, "items": ["pen"]}
    console_service.post_events({"id": "late-cart", "type": "cart_updated", "contact_id": contact,
                                 "time": old.isoformat(), "attributes": cart})  # fmt: skip

    def states() -> dict[str, str]:
        return {e["id"]: e["state"] for e in api(console_service, f"/v1/contacts/{contact}/events")["events"]}

    browser.wait(lambda: states().get("late-cart") == "done", "the old event to be decided")
    with console_service.db() as database:
        plant_sync(database, [{"_id": "late-checkout", "type": "checkout_started", "contact_id": contact,
                               "time": now, "received_at": now, "state": "quarantined", "attempts": 3,
                               "error": "KeyError: 'sku'", "quarantined_at": now}])  # fmt: skip
        database.schedule.insert_one({"_id": "late-hold", "contact_id": contact, "status": "running",
                                      "owner": "a-test", "lease_until": now + timedelta(hours=1),
                                      "due_at": now, "key": "late-hold", "cancel_on": []})  # fmt: skip
    try:
        console_service.post_events({"id": "late-parcel", "type": "delivery_status_changed",
                                     "contact_id": contact, "attributes": {"status": "shipped"}})  # fmt: skip
        browser.open(f"/console/contacts/{contact}")
        events = {e["id"]: e for e in api(console_service, f"/v1/contacts/{contact}/events")["events"]}
        assert {k: e["state"] for k, e in events.items()} == {
            "late-cart": "done", "late-checkout": "quarantined", "late-parcel": "pending"}  # fmt: skip
        arrived = datetime.fromisoformat(events["late-cart"]["received_at"])
        assert arrived - datetime.fromisoformat(events["late-cart"]["time"]) > timedelta(hours=12)
        assert api(console_service, f"/v1/contacts/{contact}/messages")["messages"] == []

        said = browser.driver.find_element(By.ID, "ruleset-cart_abandon").text
        assert "no message: ignored: older than 12h when it arrived" in said
        assert "no rule's conditions held" not in said
        checkout = browser.driver.find_element(By.ID, "ruleset-checkout_abandon").text
        assert "checkout_started set aside after 3 failures: KeyError: 'sku'" in checkout
        parcel = browser.driver.find_element(By.ID, "ruleset-delivery_status").text
        assert "no message yet: 1 of its events waiting for the rules" in parcel
        timeline = browser.driver.find_element(By.XPATH, "//section[@aria-labelledby='timeline-h']").text
        for said in ("cart_abandon: ignored: older than 12h when it arrived", "waiting for the rules",
                     "set aside after 3 failures: KeyError: 'sku'"):  # fmt: skip
            assert said in timeline, said
        browser.shot("contact-why-events")
    finally:
        with console_service.db() as database:
            database.schedule.delete_one({"_id": "late-hold"})
    browser.wait(lambda: states().get("late-parcel") == "done", "the held event to be decided")


def test_a_pending_send_no_channel_would_take_says_so(
    console_service: ConsoleService, browser: Browser
) -> None:
    contact = next(c for c in (f"unwilling-{n}" for n in range(100)) if not in_holdout("cart_abandon", c))
    status, _ = console_service.request("PUT", f"/v1/contacts/{contact}", {
        "email": "unwilling@example.com", "consent": {"email": False, "push": True},
        "push_tokens": ["tok-9"]})  # fmt: skip
    assert status == 201
    console_service.post_events({"id": f"{contact}-cart", "type": "cart_updated", "contact_id": contact,
                                 "attributes": {"value": 9, "items": ["cup"]}})  # fmt: skip
    browser.open(f"/console/contacts/{contact}")
    browser.wait_for_text("cart_abandon / remind")
    pending = api(console_service, f"/v1/contacts/{contact}/messages?status=scheduled")["messages"]
    assert sorted(m["channel"] for m in pending) == ["email", "push"]
    channels = {c["channel"]: c for c in api(console_service, f"/v1/contacts/{contact}/state")["channels"]}
    assert channels["email"]["blocked_by"] == "no_consent"
    rows = browser.driver.find_elements(By.XPATH, "//section[@aria-labelledby='pending-h']//tbody/tr")
    by_channel = {("email" if "email ·" in r.text else "push"): r.text for r in rows}
    assert "will not be sent as things stand: the contact has no email consent" in by_channel["email"]
    # Push: blocked only if the state says so (this service may have no push provider configured).
    assert ("will not be sent as things stand" in by_channel["push"]) == (
        channels["push"]["blocked_by"] is not None
    )
    # The daily caps in words: sent today of the cap, or none (this service has both kinds).
    assert {state["cap"] is None for state in channels.values()} == {True, False}
    for name, state in channels.items():
        row = browser.driver.find_element(By.XPATH, f"//section[@aria-labelledby='reach-h']//tr[th='{name}']")
        today = row.find_elements(By.TAG_NAME, "td")[1].text
        if state["cap"] is None:
            assert today == "no daily cap", (name, today)
        else:
            assert today == f"{state['sent_today']} of {state['cap']} marketing messages today", (name, today)
    browser.shot("contact-blocked-send")
