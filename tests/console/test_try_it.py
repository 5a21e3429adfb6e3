"""The Try it pages in a real Chromium: a simulation of README's cart event shows the push reminder 20
minutes and the email reminder 12 hours after it; a simulation for stored contacts uses their profiles;
a backtest of a candidate folder runs, with its progress, to its report.

Judges: the times the test computes from the event it typed and the shipped ruleset's delays;
`POST /v1/simulate` and `GET /v1/backtests/{id}` through the API for the fates and the counts."""

from __future__ import annotations

import json
import shutil
import urllib.parse
from datetime import UTC, datetime, timedelta
from pathlib import Path

from selenium.webdriver.common.by import By

from rulesvc.core.durations import parse_duration
from tests.browser import Browser
from tests.console.conftest import ConsoleService, raw, script_session
from tests.helpers import wait_for

SHIPPED = Path(__file__).resolve().parent.parent.parent / "rulesets"
# A simulated fate in the page's words: nothing was sent, so each says what would happen.
WOULD = {
    "sent": "would send",
    "suppressed": "would be suppressed",
    "cancelled": "would be cancelled",
    "held_out": "would be held out",
    "postponed": "would be postponed",
    "failed": "would fail",
}


def _set(browser: Browser, label: str, text: str) -> None:
    field = browser.field(label)
    browser.driver.execute_script("arguments[0].value = arguments[1];", field, text)


def _rows(browser: Browser) -> list[list[str]]:
    table = browser.driver.find_element(By.CLASS_NAME, "timeline-table")
    return [
        [td.text for td in tr.find_elements(By.TAG_NAME, "td")]
        for tr in table.find_elements(By.XPATH, "./tbody/tr")
    ]


def test_a_simulated_cart_shows_both_reminders(console_service: ConsoleService, browser: Browser) -> None:
    browser.open("/console/try")
    assert '"type": "cart_updated"' in browser.field(
        "Events (a JSON array, or one JSON object per line)"
    ).get_attribute("value")  # type: ignore[operator]
    event = {"id": "evt-1", "type": "cart_updated", "contact_id": "c-42", "time": "2026-11-20T10:00:00Z",
             "attributes": {"value": 59.90}}  # fmt: skip
    _set(browser, "Events (a JSON array, or one JSON object per line)", json.dumps(event))
    browser.press("Simulate", expect="What would happen")
    rows = _rows(browser)
    shipped = json.loads((SHIPPED / "cart_abandon.json").read_text())
    remind = next(r for r in shipped["rules"] if r["name"] == "remind")
    sends = [a["send"] for a in remind["then"] if "send" in a]
    contact = json.loads(
        browser.field(
            "Made-up contact profile (JSON, as PUT /v1/contacts/{id} takes it, with its contact_id)"
        ).get_attribute("value")
    )  # type: ignore[arg-type]
    status, answer = console_service.request(
        "POST", "/v1/simulate", {"events": [event], "contacts": [contact]}
    )
    assert status == 200, answer
    start = datetime(2026, 11, 20, 10, tzinfo=UTC)
    for send, after_text in zip(sends, ("+20 min", "+12 h"), strict=True):
        due = start + parse_duration(send["after"])
        row = next(r for r in rows if send["template"] in r[2])
        assert row[0] == due.strftime("%Y-%m-%d %H:%M:%S UTC"), row
        assert row[1].startswith(after_text) and "after cart_updated evt-1" in row[1], row
        assert row[3] == "cart_abandon · remind" and row[4] == send["channel"], row
        (api,) = [a for a in answer["actions"] if a["template"] == send["template"]]
        assert row[5].startswith(WOULD[api["status"]]), (row, api)
        if api.get("reason"):
            assert api["reason"] in row[5]
    assert rows[0][2].startswith("Event cart_updated evt-1")
    browser.shot("try")

    _set(
        browser, "Events (a JSON array, or one JSON object per line)", '{"id": "x", "type": "cart_updated"\n'
    )
    browser.press("Simulate", expect="Not simulated: line 1")


def test_a_backtest_of_a_candidate_folder_runs_to_its_report(
    console_service: ConsoleService, browser: Browser, tmp_path: Path
) -> None:
    hour_ago = (datetime.now(UTC) - timedelta(hours=1)).isoformat().replace("+00:00", "Z")
    contacts = [f"bt-{i}" for i in range(6)]
    for c in contacts:
        status, body = console_service.request(
            "PUT", f"/v1/contacts/{c}", {"email": f"{c}@example.test", "consent": {"email": True}}
        )
        assert status in (200, 201), body
    console_service.post_events(*(
        {"id": f"bt-ev-{c}", "type": "cart_updated", "contact_id": c, "time": hour_ago,
         "attributes": {"value": 420.0, "currency": "EUR", "items": []}}
        for c in contacts
    ))  # fmt: skip

    def decided() -> bool:
        status, body = console_service.request("GET", "/v1/stats?ruleset=cart_abandon&rule=high_value")
        return status == 200 and body["funnel"]["entered"] == len(contacts)

    wait_for(decided, what="the posted carts decided")

    def emails() -> dict[str, list[str]] | None:
        """The high_value emails' recorded fates, by status, once each is decided."""
        by: dict[str, list[str]] = {}
        for status in ("sent", "held_out", "suppressed", "failed", "cancelled"):
            code, body = console_service.request(
                "GET", f"/v1/messages?ruleset=cart_abandon&rule=high_value&channel=email&status={status}"
            )
            assert code == 200, body
            by[status] = [m["contact_id"] for m in body["messages"]]
        return by if sum(map(len, by.values())) == len(contacts) else None

    fates = wait_for(emails, what="every high_value email decided")
    # The candidate: the shipped rulesets without high_value's email.
    candidate = tmp_path / "candidate"
    shutil.copytree(SHIPPED, candidate)
    cart = json.loads((candidate / "cart_abandon.json").read_text())
    high = next(r for r in cart["rules"] if r["name"] == "high_value")
    high["then"] = [a for a in high["then"] if a.get("send", {}).get("channel") != "email"]
    (candidate / "cart_abandon.json").write_text(json.dumps(cart, indent=2))

    browser.open("/console/try/backtests")
    live = str((console_service.workdir / "rulesets").absolute())
    assert console_service.request("GET", "/v1/rulesets")[1]["folder"] == live
    assert f"The live rulesets are in {live}: copy it to a sibling folder, e.g. {live}-next" in browser.text()
    browser.field("Candidate rulesets folder (absolute path on the server)").send_keys(str(candidate))
    browser.driver.find_element(By.CSS_SELECTOR, "#window option[value='24h']").click()
    browser.press("Start backtest", expect="Baseline")
    assert "/console/try/backtests/" in browser.path
    job_id = browser.path.rsplit("/", 1)[1]
    browser.wait(lambda: "Sent per rule" in browser.text(), "the report (the page refreshes itself)", 90)
    status, job = console_service.request("GET", f"/v1/backtests/{job_id}")
    assert status == 200 and job["status"] == "done", job
    sent: dict[str, list[int]] = {}
    for row in job["report"]["rows"]:
        counts = sent.setdefault(f"{row['ruleset']} · {row['rule']}", [0, 0])
        counts[0] += row["baseline"]["sent"]
        counts[1] += row["candidate"]["sent"]
    baseline, after = sent["cart_abandon · high_value"]
    assert after == 0 < baseline  # the candidate has no email left in this rule; webpush is not configured
    table = browser.driver.find_element(By.XPATH, "//table[caption[normalize-space(.)='Sent per rule']]")
    shown = {
        tr.find_element(By.TAG_NAME, "th").text: [td.text for td in tr.find_elements(By.TAG_NAME, "td")]
        for tr in table.find_elements(By.XPATH, "./tbody/tr")
    }
    for label, (b, c) in sent.items():
        assert shown[label] == [str(b), str(c), f"{c - b:+d}"], (label, shown[label])
    chart = browser.driver.find_element(By.CSS_SELECTOR, "figure.chart svg")
    assert f"cart_abandon · high_value: {after - baseline:+d}" in chart.get_attribute("innerHTML")  # type: ignore[operator]
    assert job["request"]["candidate"] in browser.text()
    # Who is treated differently, judged by the emails the service recorded: a contact whose email was
    # sent loses it; one held out (or not sent otherwise) gets the same messages sent as before.
    losing, same = len(fates["sent"]), len(contacts) - len(fates["sent"])
    changes = browser.driver.find_element(By.ID, "changes").text
    assert f"{len(contacts)} contacts would be treated differently by the candidate:" in browser.text()
    assert "0 would get more messages (0 in all)" in changes, changes
    assert f"{losing} would get fewer ({losing} in all)" in changes, changes
    assert f"{same} would get the same messages sent" in changes, changes
    per_row = "//table[caption[starts-with(normalize-space(.), 'Per rule')]]"
    rows = browser.driver.find_element(By.XPATH, per_row)
    headers = [th.text for th in rows.find_elements(By.XPATH, "./thead//th")]
    assert headers[1:5] == ["Decided, baseline", "Decided, candidate", "Sent, baseline", "Sent, candidate"]
    browser.shot("backtest")
    browser.open("/console/try/backtests")
    assert job_id in browser.driver.page_source and "done" in browser.text()


def test_a_read_session_may_neither_simulate_nor_start_a_backtest(
    console_service: ConsoleService, new_browser: Browser
) -> None:
    """As the API: POST /v1/simulate and POST /v1/backtests are an admin's."""
    read_key = console_service.new_key("read")
    new_browser.login(read_key)
    new_browser.open("/console/try")
    assert "simulations need an admin key" in new_browser.text()
    assert not new_browser.driver.find_elements(By.XPATH, "//button[normalize-space(.)='Simulate']")
    new_browser.open("/console/try/backtests")
    assert "A read-only session can look at backtests but not start one." in new_browser.text()
    assert not new_browser.driver.find_elements(By.XPATH, "//button[normalize-space(.)='Start backtest']")
    # The form posted anyway, with the session's own token: refused.
    cookie, csrf = script_session(console_service, read_key)
    events = urllib.parse.quote('{"id": "e", "type": "cart_updated", "contact_id": "c"}')
    status, _, page = raw(console_service, "POST", "/console/try", f"csrf_token={csrf}&events={events}",
                          {"Cookie": cookie})  # fmt: skip
    assert status == 403 and "read-only session" in page


def test_a_simulation_for_a_stored_contact(console_service: ConsoleService, browser: Browser) -> None:
    # Two stored contacts: one who agreed to email, one who did not.
    for contact, consent in (("real-yes", True), ("real-no", False)):
        status, body = console_service.request(
            "PUT",
            f"/v1/contacts/{contact}",
            {"email": f"{contact}@example.test", "consent": {"email": consent}},
        )
        assert status in (200, 201), body
    before = {c: console_service.request("GET", f"/v1/contacts/{c}")[1] for c in ("real-yes", "real-no")}
    checkout = json.loads((SHIPPED / "checkout_abandon.json").read_text())
    email = next(
        a["send"] for a in checkout["rules"][0]["then"] if a.get("send", {}).get("channel") == "email"
    )
    event = {
        "id": "evt-r",
        "type": "checkout_started",
        "contact_id": "someone",
        "time": "2026-11-20T10:00:00Z",
    }
    outcomes = {}
    for contact in ("real-yes", "real-no"):
        browser.open("/console/try")
        field = browser.field("Events (a JSON array, or one JSON object per line)")
        browser.driver.execute_script("arguments[0].value = arguments[1];", field, json.dumps(event))
        browser.driver.find_element(By.ID, "who-real").click()
        browser.field("Stored contact id").send_keys(contact)
        browser.press("Simulate", expect="What would happen")
        table = browser.driver.find_element(By.CLASS_NAME, "timeline-table")
        row = table.find_element(By.XPATH, f".//tr[td[contains(., '{email['template']}')]]")
        outcomes[contact] = row.text
        assert f"for {contact}" in table.text  # the events were taken as the stored contact's
    # Judged by the API: the same simulation with the stored profile, as `GET /v1/contacts/{id}` gives it.
    for contact, shown in outcomes.items():
        profile = {
            k: v for k, v in before[contact].items() if k not in ("email_invalid", "created_at", "updated_at")
        }
        status, answer = console_service.request(
            "POST", "/v1/simulate", {"events": [{**event, "contact_id": contact}], "contacts": [profile]}
        )
        assert status == 200, answer
        (api,) = [a for a in answer["actions"] if a["template"] == email["template"]]
        assert WOULD[api["status"]] in shown and (api.get("reason") or "") in shown, (shown, api)
    assert "no_consent" in outcomes["real-no"] and "no_consent" not in outcomes["real-yes"]
    assert {c: console_service.request("GET", f"/v1/contacts/{c}")[1] for c in before} == before
    browser.open("/console/try")
    browser.driver.find_element(By.ID, "who-real").click()
    browser.field("Stored contact id").send_keys("nobody-stored")
    browser.press("Simulate", expect="no stored contact `nobody-stored`")
