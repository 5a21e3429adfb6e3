"""What the Rulesets and Try it page tests share."""

from __future__ import annotations

from selenium.common.exceptions import WebDriverException

from tests.browser import Browser


def submit(browser: Browser, label: str, expect: str, timeout: float = 30) -> None:
    """Press the button `label` and wait until the page shows `expect`. The wait for the old page to go
    (`Browser.press`) can lose a race with Chromium replacing it ("Node with given id does not belong to
    the document"): the page that came is judged by `expect` all the same."""
    try:
        browser.press(label)
    except WebDriverException as exc:
        if "does not belong to the document" not in str(exc):
            raise
    browser.wait(lambda: expect in browser.text(), f"`{expect}` after pressing {label}", timeout)
