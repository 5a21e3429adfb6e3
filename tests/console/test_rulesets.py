"""The Rulesets pages in a real Chromium: every shipped ruleset with its rules and a refused file's
errors at their line and column; a ruleset's funnel after events posted through the API; the check panel
for a pasted candidate, which writes nothing.

Judges: counts the test computes from what it posted, `GET /v1/stats` for what became of the messages,
and the ruleset files' bytes on disk."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from selenium.webdriver.common.by import By
from statsmodels.stats.proportion import confint_proportions_2indep, proportion_confint

from tests.browser import Browser
from tests.console.conftest import ConsoleService
from tests.helpers import wait_for

SHIPPED = Path(__file__).resolve().parent.parent.parent / "rulesets"


def place(text: str, token: str) -> tuple[int, int]:
    """Line and column (from 1) of `token` in `text`, counted here."""
    at = text.index(token)
    return text.count("\n", 0, at) + 1, at - text.rfind("\n", 0, at)


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.json"))}


def stats_rows(service: ConsoleService, ruleset: str) -> list[dict[str, Any]]:
    status, body = service.request("GET", f"/v1/stats?ruleset={ruleset}")
    assert status == 200, body
    return body["rows"]  # type: ignore[no-any-return]


def summed(rows: list[dict[str, Any]], rule: str, channel: str | None = None) -> dict[str, int]:
    total: dict[str, int] = {}
    for row in rows:
        if row["rule"] == rule and (channel is None or row["channel"] == channel):
            for status, n in row["funnel"].items():
                if isinstance(n, int):
                    total[status] = total.get(status, 0) + n
    return total


def frm_of(browser: Browser) -> str:
    """The start of the window the page shows ("Counts from 2026-11-27 05:00:00 UTC to ..."), as ISO."""
    found = re.search(r"Counts from (\S+) (\S+) UTC", browser.text())
    assert found is not None, browser.text()
    return f"{found.group(1)}T{found.group(2)}Z"


def test_rulesets_list_with_rules_and_a_refused_file(
    console_service: ConsoleService, browser: Browser
) -> None:
    folder = console_service.workdir / "rulesets"
    broken = (SHIPPED / "checkout_abandon.json").read_text().replace('"20m"', '"soon"')
    (folder / "broken_demo.json").write_text(broken)
    line, column = place(broken, '"soon"')
    browser.open("/console/rulesets")
    browser.wait_for_text(f"broken_demo.json:{line}:{column}")
    text = browser.text()
    shipped = sorted(p.stem for p in SHIPPED.glob("*.json") if p.name != "schema.json")
    for name in shipped:
        heading = browser.driver.find_element(By.ID, f"rs-{name}")
        assert heading.find_element(By.TAG_NAME, "a").get_attribute("href") == (
            f"{console_service.url}/console/rulesets/{name}"
        )
    assert "$.rules[0].then[0].send.after" in text and "This file was refused; nothing of it runs." in text
    cart = json.loads((SHIPPED / "cart_abandon.json").read_text())
    headers = [th.text for th in browser.driver.find_elements(By.XPATH, "(//table)[1]/thead//th")]
    assert headers == ["Ruleset", "Status", "Rules", "Listens to", "Holdout / A/B"], headers
    for rule in cart["rules"]:
        assert rule["name"] in text
    assert "sends `cart_abandon/push` on push 20m after the event; cancelled by purchased" in text
    browser.shot("rulesets")
    (folder / "broken_demo.json").unlink()


def test_a_rulesets_funnel_and_the_check_panel(console_service: ConsoleService, browser: Browser) -> None:
    folder = console_service.workdir / "rulesets"
    hour_ago = (datetime.now(UTC) - timedelta(hours=1)).isoformat().replace("+00:00", "Z")
    values = {"fn-a": 59.9, "fn-b": 20.0, "fn-c": 120.0, "fn-d": 75.5, "fn-e": 250.0, "fn-f": 310.0}
    console_service.post_events(*(
        {"id": f"ev-{c}", "type": "cart_updated", "contact_id": c, "time": hour_ago,
         "attributes": {"value": v, "currency": "EUR", "items": []}}
        for c, v in values.items()
    ))  # fmt: skip
    entered = {
        "remind": sum(1 for v in values.values() if 0 < v <= 200),
        "high_value": sum(1 for v in values.values() if v > 200),
    }

    def settled() -> list[dict[str, Any]] | None:
        rows = stats_rows(console_service, "cart_abandon")
        push, email = summed(rows, "remind", "push"), summed(rows, "high_value", "email")
        fates = ("sent", "suppressed", "held_out")
        done = (
            all(summed(rows, rule).get("entered", 0) == n for rule, n in entered.items())
            and sum(push.get(s, 0) for s in fates) == entered["remind"]
            and sum(email.get(s, 0) for s in fates) == entered["high_value"]
        )
        return rows if done else None

    rows = wait_for(settled, what="the cart_abandon counts of the posted events")
    cart = json.loads((SHIPPED / "cart_abandon.json").read_text())
    sends = {r["name"]: sum(1 for a in r["then"] if "send" in a) for r in cart["rules"]}
    # The judge of the messages' fates: the messages themselves, as `GET /v1/messages` lists them.
    fates = (("waiting", "scheduled"), ("sent", "sent"), ("suppressed", "suppressed"),
             ("held out", "held_out"), ("cancelled", "cancelled"), ("failed", "failed"))  # fmt: skip
    by_status: dict[str, dict[str, int]] = {}
    for rule in entered:
        by_status[rule] = {}
        for _, status in fates:
            code, body = console_service.request(
                "GET", f"/v1/messages?ruleset=cart_abandon&rule={rule}&status={status}&limit=500"
            )
            assert code == 200, body
            by_status[rule][status] = len(body["messages"])
        assert sum(by_status[rule].values()) == sends[rule] * entered[rule], by_status[rule]
    browser.open("/console/rulesets/cart_abandon")
    browser.follow("last 24 hours")
    assert browser.path == "/console/rulesets/cart_abandon?window=24h"
    for rule, n in entered.items():
        section = browser.driver.find_element(By.ID, f"rule-{rule}")
        assert f"Entries\n{n} entries (each a contact starting this rule)" in section.text, section.text
        parts = ", ".join(f"{by_status[rule][s]} {label}" for label, s in fates if by_status[rule][s])
        said = f"Messages\n{sends[rule] * n} messages: {parts}"
        assert said in section.text, (said, section.text)
    total_entered = sum(entered.values())
    waiting = sum(b["scheduled"] for b in by_status.values())
    assert (
        f"In total: {total_entered} entries; {sum(sends[r] * n for r, n in entered.items())} messages: "
        f"{waiting} waiting" in browser.text()
    )
    remind = browser.driver.find_element(By.ID, "rule-remind")
    table = remind.find_element(By.XPATH, ".//table[caption[normalize-space(.)='Messages by channel']]")
    headers = [th.text for th in table.find_elements(By.XPATH, ".//thead//th")]
    for channel in ("push", "email"):
        cells = table.find_element(By.XPATH, f".//tr[th[normalize-space(.)='{channel}']]")
        shown = dict(
            zip(headers[1:], [td.text for td in cells.find_elements(By.TAG_NAME, "td")], strict=True)
        )
        expected = summed(rows, "remind", channel)
        decided = sum(expected.get(s, 0) for s in ("sent", "suppressed", "held_out"))
        waiting_here = expected["scheduled"] - decided
        for label, n in (("Waiting", waiting_here), ("Sent", expected.get("sent", 0)),
                         ("Suppressed", expected.get("suppressed", 0)),
                         ("Held out", expected.get("held_out", 0))):  # fmt: skip
            assert shown[label] == str(n), (channel, label, shown, expected)
        chart = remind.find_element(By.CSS_SELECTOR, ".funnel-chart svg").get_attribute("innerHTML")
        for label, n in (("waiting", waiting_here), ("suppressed", expected.get("suppressed", 0))):
            if n:
                assert f"{channel} · {label}: {n}" in chart, (channel, label, chart)  # type: ignore[operator]
    reasons = {
        code: n
        for row in rows
        if row["rule"] == "remind"
        for code, n in row["funnel"]["reasons"].get("suppressed", {}).items()
    }
    for code, n in reasons.items():
        assert f"{n} \u00d7 {code}" in remind.text, (code, remind.text)
    text = browser.text()
    assert "Does it work? Holdout" in text and "treatment against holdout" in text
    block = browser.driver.find_element(By.ID, "uplift").find_element(By.XPATH, "following-sibling::div[1]")
    status, report = console_service.request("GET", "/v1/stats?ruleset=cart_abandon&from=" + frm_of(browser))
    note = report["comparisons"][0]["note"]
    assert note.startswith("Not enough data:") and block.text.count("enough data") == 1, block.text
    assert note in block.text and "n/a" not in block.text  # 6 contacts: below the minimum sample
    source = browser.driver.find_element(By.TAG_NAME, "pre").text
    assert source == (folder / "cart_abandon.json").read_text().strip()
    browser.shot("ruleset")

    # The check panel: a broken candidate, then a valid one; no file changes.
    before = files(folder)
    original = (folder / "cart_abandon.json").read_text()
    candidate = original.replace('"after": "12h"', '"after": "half a day"')
    line, column = place(candidate, '"half a day"')
    area = browser.field("Candidate cart_abandon.json")
    browser.driver.execute_script("arguments[0].value = arguments[1];", area, candidate)
    browser.press("Check", expect="Not valid")
    text = browser.text()
    assert f"cart_abandon.json:{line}:{column} $.rules[1].then[2].send.after" in text, text
    assert "expected a duration such as `20m` or `2h`" in text
    browser.shot("ruleset-check")
    area = browser.field("Candidate cart_abandon.json")
    browser.driver.execute_script("arguments[0].value = arguments[1];", area, original.replace("12h", "6h"))
    browser.press("Check", expect="Valid: would listen to cart_updated")
    assert "Nothing was written." in browser.text()
    assert files(folder) == before
    status, body = console_service.request("GET", "/v1/rulesets/cart_abandon")
    assert body["source"] == original and body["status"] == "loaded"


def test_a_read_session_sees_no_check_and_the_page_refuses_a_bad_window(
    console_service: ConsoleService, new_browser: Browser
) -> None:
    new_browser.login(console_service.new_key("read"))
    new_browser.open("/console/rulesets/checkout_abandon?window=1y")
    assert "query parameter `window`: `1y` is not one of 24h, 7d, 30d" in new_browser.text()
    new_browser.open("/console/rulesets/checkout_abandon")
    assert "checking a candidate needs an admin key" in new_browser.text()
    assert not new_browser.driver.find_elements(By.XPATH, "//button[normalize-space(.)='Check']")
    new_browser.open("/console/rulesets/no_such_ruleset")
    assert "no ruleset `no_such_ruleset`" in new_browser.text()


# A 50 % holdout with enough entries for an uplift: (entries, conversions) per group, seeded as counts.
HALVES = {"": (1200, 96), "holdout": (1180, 59)}
HALF_HOLDOUT = {
    "holdout": "50%",
    "goal": {"event": "purchased", "within": "5d"},
    "rules": [{"name": "nudge", "when": {"event": "page_viewed"},
               "then": [{"send": {"channel": "email", "template": "cart_abandon/email", "after": "1h"}}]}],
}  # fmt: skip


def test_an_uplift_with_enough_data(console_service: ConsoleService, browser: Browser) -> None:
    """The stats collection seeded in its documented schema (as test_pages_over_http.py does); the judge:
    Wilson intervals and Newcombe's interval of the difference, from statsmodels, on the seeded counts."""
    path = console_service.workdir / "rulesets" / "halves.json"
    path.write_text(json.dumps(HALF_HOLDOUT, indent=2))
    wait_for(
        lambda: console_service.request("GET", "/v1/rulesets/halves")[1].get("status") == "loaded",
        what="halves.json loaded",
    )
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=2)
    with console_service.db() as db:
        db.stats.insert_many([
            {"_id": f"{hour.isoformat()}|halves|nudge|{group}||w1", "hour": hour, "ruleset": "halves",
             "rule": "nudge", "variant": group, "channel": "", "shard": "w1",
             "counts": {"entered": n, "converted": x}, "reasons": {}, "revenue": 0.0, "revenue_sq": 0.0}
            for group, (n, x) in HALVES.items()
        ])  # fmt: skip
    browser.open("/console/rulesets/halves?window=24h")
    (n1, x1), (n2, x2) = HALVES[""], HALVES["holdout"]

    def pct(v: float) -> str:
        return f"{v * 100:.1f} %"

    table = browser.driver.find_element(By.XPATH, "//h2[@id='uplift']/following-sibling::table[1]")
    for group, (n, x) in (("treatment", (n1, x1)), ("holdout", (n2, x2))):
        row = table.find_element(By.XPATH, f".//tr[th[normalize-space(.)='{group}']]")
        cells = [td.text for td in row.find_elements(By.TAG_NAME, "td")]
        low, high = proportion_confint(x, n, alpha=0.05, method="wilson")
        assert cells[:3] == [f"{n:,}", f"{x:,}", f"{pct(x / n)} ({pct(low)} \u2013 {pct(high)})"], (
            group,
            cells,
        )
    low, high = confint_proportions_2indep(x1, n1, x2, n2, method="newcomb", compare="diff", alpha=0.05)
    diff = x1 / n1 - x2 / n2
    block = browser.driver.find_element(By.XPATH, "//h2[@id='uplift']/following-sibling::div[1]")
    said = (
        f"Uplift: {diff * 100:+.1f} points "
        f"(95 % interval {low * 100:+.1f} points to {high * 100:+.1f} points)"
        f", {diff / (x2 / n2) * 100:+.0f} % relative."
    )
    assert said in block.text, (said, block.text)
    assert ("Significant: the interval excludes zero." in block.text) == (low > 0 or high < 0)
    assert "enough data" not in block.text
    svg = block.find_element(By.CSS_SELECTOR, "svg.interval").get_attribute("aria-label")
    assert svg == (
        f"Uplift of treatment over holdout: {diff * 100:+.1f} points, 95% interval {low * 100:+.1f} to "
        f"{high * 100:+.1f}"
    )
    browser.shot("ruleset-uplift")
    path.unlink()
