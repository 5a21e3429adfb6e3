"""Try it with a real contact: the stored profile (read through the contacts operation) decides what the
simulation sends, and nothing of the contact changes."""

from __future__ import annotations

import json
from pathlib import Path

from selenium.webdriver.common.by import By

from tests.browser import Browser
from tests.console.conftest import ConsoleService
from tests.console.pages import submit

SHIPPED = Path(__file__).resolve().parent.parent.parent / "rulesets"
EVENTS = "Events (a JSON array, or one JSON object per line)"


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
        field = browser.field(EVENTS)
        browser.driver.execute_script("arguments[0].value = arguments[1];", field, json.dumps(event))
        browser.driver.find_element(By.ID, "who-real").click()
        browser.field("Stored contact id").send_keys(contact)
        submit(browser, "Simulate", "What would happen")
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
        assert api["status"].replace("_", " ") in shown and (api.get("reason") or "") in shown, (shown, api)
    assert "no_consent" in outcomes["real-no"] and "no_consent" not in outcomes["real-yes"]
    assert {c: console_service.request("GET", f"/v1/contacts/{c}")[1] for c in before} == before
    browser.open("/console/try")
    browser.driver.find_element(By.ID, "who-real").click()
    browser.field("Stored contact id").send_keys("nobody-stored")
    submit(browser, "Simulate", "no stored contact `nobody-stored`")
