"""A real headless Chromium (Debian's `chromium`, driven through its `chromedriver` by Selenium) against
a real `rulesvc serve`: what the console tests use. `.ci/run` installs both packages; on a developer's
machine: `apt-get install chromium chromium-driver` (docs/console.md)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS = ROOT / "build" / "console"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


class Browser:
    """One Chromium with its own empty profile; `driver` is Selenium's."""

    def __init__(self, base_url: str, width: int = 1360, height: int = 900) -> None:
        self.base_url = base_url
        self.profile = tempfile.mkdtemp(prefix="rulesvc-chromium-")
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in (
            "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-extensions", "--disable-default-apps", f"--user-data-dir={self.profile}",
            f"--window-size={width},{height}", "--lang=en-US",
        ):  # fmt: skip
            options.add_argument(flag)
        # The driver is the system's: Selenium Manager would try to download one, and the network is closed.
        self.driver: WebDriver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
        self.driver.set_page_load_timeout(30)

    def open(self, path: str) -> None:
        self.driver.get(self.base_url + path)

    @property
    def path(self) -> str:
        url = self.driver.current_url
        return url[len(self.base_url) :] if url.startswith(self.base_url) else url

    def text(self) -> str:
        for _ in range(50):
            try:
                return self.driver.find_element(By.TAG_NAME, "body").text
            except StaleElementReferenceException:  # the page was being replaced
                continue
        raise AssertionError("the page kept changing")

    def loads(self, action: Callable[[], object]) -> None:
        """Do `action` (a click that submits or follows) and wait until the next page replaced this one:
        a mark left on this page's `window` is gone from the next one's. (Waiting for an element to go
        stale races with Chromium swapping the document: "Node with given id does not belong to the
        document".)"""
        self.driver.execute_script("window.__rulesvcLeft = true;")
        action()

        def arrived() -> bool:
            try:
                return bool(
                    self.driver.execute_script(
                        "return window.__rulesvcLeft === undefined && document.readyState === 'complete';"
                    )
                )
            except WebDriverException:  # no document to run in, in the middle of the swap
                return False

        self.wait(arrived, "the next page", timeout=30)

    def press(self, label: str, within: WebElement | None = None, expect: str | None = None) -> None:
        """Click the button labelled `label`, wait for the page it leads to, and for `expect` on it."""
        button = self.button(label, within)
        self.loads(button.click)
        if expect is not None:
            self.wait(lambda: expect in self.text(), f"`{expect}` after pressing {label}")

    def follow(self, text: str) -> None:
        """Click the link `text` and wait for its page."""
        link = self.link(text)
        self.loads(link.click)

    def login(self, key: str) -> None:
        self.open("/console/login")
        self.field("API key").send_keys(key)
        self.press("Log in")
        assert "/console/login" not in self.path, self.text()

    def field(self, label: str) -> WebElement:
        """The input a `<label>` names, as a person finds it."""
        found = self.driver.find_element(By.XPATH, f"//label[normalize-space(.)='{label}']")
        target = found.get_attribute("for")
        if target:
            return self.driver.find_element(By.ID, target)
        return found.find_element(By.XPATH, ".//input|.//select|.//textarea")

    def button(self, label: str, within: WebElement | None = None) -> WebElement:
        scope = within or self.driver
        return scope.find_element(By.XPATH, f".//button[normalize-space(.)='{label}']")

    def link(self, text: str) -> WebElement:
        return self.driver.find_element(By.LINK_TEXT, text)

    def wait(self, condition: Callable[[], object], what: str, timeout: float = 20) -> None:
        try:
            WebDriverWait(self.driver, timeout, poll_frequency=0.1).until(lambda _: condition())
        except TimeoutException:
            raise AssertionError(
                f"waited {timeout}s for {what}; at {self.path}:\n{self.text()[:3000]}"
            ) from None

    def wait_for_text(self, text: str, timeout: float = 20, reload: bool = True) -> None:
        """Until the page shows `text`, reloading it (server-rendered pages change on reload)."""

        def shown() -> bool:
            if text in self.text():
                return True
            if reload:
                self.driver.refresh()
            return False

        self.wait(shown, f"`{text}` on the page", timeout)

    def shot(self, name: str) -> Path:
        """The whole page as PNG under build/console/ (docs/console.md shows copies of them)."""
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"{name}.png"
        height = self.driver.execute_script("return document.documentElement.scrollHeight")
        size = self.driver.get_window_size()
        self.driver.set_window_size(size["width"], min(max(int(height) + 120, 600), 6000))
        try:
            self.driver.save_screenshot(str(path))
        finally:
            self.driver.set_window_size(size["width"], size["height"])
        return path

    def cookies(self) -> dict[str, dict[str, object]]:
        return {c["name"]: c for c in self.driver.get_cookies()}

    def close(self) -> None:
        try:
            self.driver.quit()
        finally:
            shutil.rmtree(self.profile, ignore_errors=True)
