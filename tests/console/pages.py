"""What the console's page tests share: reading a page that a form's answer or a refresh may be
replacing at that moment."""

from __future__ import annotations

from selenium.common.exceptions import StaleElementReferenceException

from tests.browser import Browser


def shows(browser: Browser, text: str) -> bool:
    """Whether the page shows `text` now; while the next page replaces it, not yet."""
    try:
        return text in browser.text()
    except StaleElementReferenceException:
        return False
