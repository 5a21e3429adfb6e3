"""The Channels page in a real Chromium: each channel's state, a test send from the page that arrives at a
real SMTP server and a webhook receiver (judged by what they got, and by the API), a provider failure in
the provider's words, secrets nowhere in the HTML, and a read-only session without the form whose forged
POST is refused."""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterator

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement

from tests.browser import Browser
from tests.console.conftest import ConsoleService, raw, running_console, script_session
from tests.helpers import wait_for
from tests.webhook_flow import SECRET, Receiver

SMS_TOKEN = "sms-auth-token-9f8e7d6c5b4a"
HOOK_PASSWORD = "hook-pass-1a2b3c4d"


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()


@pytest.fixture(scope="module")
def console_service(tmp_path_factory: pytest.TempPathFactory, receiver: Receiver) -> Iterator[ConsoleService]:
    """The shipped rulesets; email to a real SMTP server; webhooks to a receiver whose URL holds a
    password; sms set up with a token against a provider that is not there (port 9, nothing listens)."""
    hook_url = receiver.url.replace("http://", f"http://hookuser:{HOOK_PASSWORD}@")
    env = {
        "RULESVC_CHANNEL_WEBHOOK_URL": hook_url,
        "RULESVC_CHANNEL_WEBHOOK_SECRET": SECRET,
        "RULESVC_CHANNEL_SMS_ACCOUNT_SID": "AC0123456789",
        "RULESVC_CHANNEL_SMS_AUTH_TOKEN": SMS_TOKEN,
        "RULESVC_CHANNEL_SMS_FROM": "+4915100000000",
        "RULESVC_CHANNEL_SMS_BASE_URL": "http://127.0.0.1:9",
    }
    with running_console(tmp_path_factory.mktemp("console-channels"), env) as service:
        yield service


def card(browser: Browser, channel: str) -> WebElement:
    return browser.driver.find_element(By.ID, f"channel-{channel}")


def row(browser: Browser, channel: str) -> WebElement:
    """The channel's row in the table of channels."""
    return browser.driver.find_element(
        By.XPATH, f"//table[contains(@class, 'channels')]//tr[th[normalize-space(.)='{channel}']]"
    )


def test_channel_states_and_test_sends(
    browser: Browser, console_service: ConsoleService, receiver: Receiver
) -> None:
    # Two orders: one confirmation arrives, the other's address is refused by the server (550).
    for contact, address in (("c-ann", "ann@example.com"), ("c-nobody", "nobody@example.com")):
        assert console_service.request("PUT", f"/v1/contacts/{contact}", {"email": address})[0] == 201
        order = {"order_id": "A-1", "value": 59.9, "currency": "EUR"}
        console_service.post_events(
            {"id": f"order-{contact}", "type": "purchased", "contact_id": contact, "attributes": order}
        )

    def email_counted() -> bool:
        email = next(
            c for c in console_service.request("GET", "/v1/channels")[1]["channels"] if c["name"] == "email"
        )
        return bool(email["sent_24h"] == 1 and email["failed_24h"] == 1)

    wait_for(email_counted, what="the two confirmations counted")
    assert [rcpts for _, rcpts, _ in console_service.mailbox.messages] == [["ann@example.com"]]
    [sent] = console_service.request("GET", "/v1/messages?status=sent")[1]["messages"]
    browser.open("/console/channels")
    status, listing = console_service.request("GET", "/v1/channels")
    email_row = row(browser, "email").text
    assert "50.0 %" in email_row and sent["sent_at"][:19].replace("T", " ") in email_row
    assert status == 200
    for channel in listing["channels"]:  # the page says what the API says of each channel
        if channel["kind"] == "message channel":
            text = row(browser, channel["name"]).text
            assert ("not configured" not in text) == channel["configured"], text
            assert channel["detail"] in text
            # only a configured channel can be tried
            assert (
                bool(browser.driver.find_elements(By.ID, f"channel-{channel['name']}"))
                == channel["configured"]
            )
    assert "POST http://***@127.0.0.1:" in row(browser, "webhook").text  # the URL's password masked
    # The email server's transport in words (this one speaks plain SMTP), as the API says it.
    email = next(c for c in listing["channels"] if c["name"] == "email")
    assert email["detail"].endswith("(no TLS)") and email["detail"] in row(browser, "email").text
    # What a crash mid-send does, per channel as the API says it can repeat a send or not.
    for channel in listing["channels"]:
        if channel["kind"] == "message channel" and channel["configured"]:
            words = (
                "the message is sent once more with the same id, and the receiver ignores the repeat"
                if channel["deduplicates"]
                else "the message is marked uncertain and not sent again"
            )
            assert f"If the service crashes while sending, {words}." in card(browser, channel["name"]).text
    assert not email["deduplicates"]  # so the page's "uncertain" sentence was read above

    # A test email, typed in as a person would: it arrives at the SMTP server.
    browser.field("Send a test email to").send_keys("ops@example.com")
    browser.press("Send test", card(browser, "email"))
    browser.wait(lambda: "Test message sent through email to ops@example.com" in browser.text(), "the notice")
    [_, (sender, recipients, mail)] = console_service.mailbox.messages
    assert (sender, recipients) == ("shop@example.test", ["ops@example.com"])
    assert mail["Subject"] == "rulesvc test message (email)"
    assert mail["Message-ID"] in browser.text()  # the provider's id, as the page reports it
    browser.driver.execute_script("window.scrollTo(0, 0)")
    browser.shot("channels")

    # The webhook's test reaches its receiver, signed (the receiver verifies every request).
    browser.press("Send test", card(browser, "webhook"))
    browser.wait(lambda: "Test message sent through webhook" in browser.text(), "the webhook notice")
    assert [status for _, status in receiver.got] == [204]
    assert receiver.got[0][0].startswith("test:webhook:")

    # An address the channel cannot use: the API's refusal, word for word, in an error box; nothing sent.
    browser.field("Send a test email to").send_keys("not-an-address")
    browser.press("Send test", card(browser, "email"))
    api = console_service.request("POST", "/v1/channels/email/test", {"to": "not-an-address"})
    assert api[0] == 422
    box = card(browser, "email").find_element(By.CSS_SELECTOR, ".error-box")
    assert box.text == api[1]["error"] == "`not-an-address` is not an email address"
    assert browser.field("Send a test email to").get_attribute("value") == "not-an-address"  # kept to fix
    assert len(console_service.mailbox.messages) == 2

    # The sms provider is not there: the page says the provider did not take it, in its words.
    browser.field("Send a test sms to").send_keys("+4915112345678")
    browser.press("Send test", card(browser, "sms"))
    box = card(browser, "sms").find_element(By.CSS_SELECTOR, ".error-box")
    assert box.text.startswith("the `sms` provider did not take the test message (retry): ")
    assert "127.0.0.1:9" in box.text
    browser.shot("channels-provider-failed")

    # Secrets are in no page and no API answer: the webhook secret and URL password, the sms token.
    for path in ("/console/channels", "/console/"):
        browser.open(path)
        page = browser.driver.page_source
        for secret in (SECRET, SECRET.removeprefix("whsec_"), SMS_TOKEN, HOOK_PASSWORD):
            assert secret not in page, (path, secret)
    raw = str(listing) + str(console_service.request("GET", "/v1/overview")[1])
    assert all(s not in raw for s in (SECRET, SMS_TOKEN, HOOK_PASSWORD))


def test_read_only_session_has_no_test_form_and_a_forged_post_is_refused(
    console_service: ConsoleService, new_browser: Browser
) -> None:
    read = console_service.new_key("read")
    new_browser.login(read)
    new_browser.open("/console/channels")
    assert new_browser.driver.find_elements(By.XPATH, "//button[normalize-space(.)='Send test']") == []
    assert "A read-only session cannot send a test message." in card(new_browser, "email").text
    # The same POST the admin's form makes, with this read session's cookie and its valid CSRF token.
    cookie, csrf = script_session(console_service, read)
    sent_before = len(console_service.mailbox.messages)
    host = f"http://127.0.0.1:{console_service.port}"
    body = urllib.parse.urlencode({"csrf_token": csrf, "to": "ops@example.com"})
    status, _, page = raw(
        console_service, "POST", "/console/channels/email/test", body, {"Cookie": cookie, "Origin": host}
    )
    assert status == 403 and "A read-only session can look but not change anything." in page
    assert len(console_service.mailbox.messages) == sent_before
