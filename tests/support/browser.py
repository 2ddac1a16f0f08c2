"""A real headless Chromium (Debian's ``chromium`` and ``chromium-driver``)
driven with Selenium, for the dashboard's tests.

The browser keeps what the page logged (console) and every URL it asked
for (Chrome's performance log), so each test can check that nothing went
wrong and that nothing left for another host. Selenium Manager is never
used: the binaries' paths are given.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

from tests.support.process import REPO

CHROMIUM = Path(os.environ.get("LECTR_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("LECTR_CHROMEDRIVER", "/usr/bin/chromedriver"))
SCREENSHOTS = REPO / "artifacts" / "screenshots"
FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--disable-features=Translate,OptimizationHints,MediaRouter",
    "--window-size=1280,900",
)


def missing_browser() -> str | None:
    """Why the browser tests cannot run here, or None."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not path.exists():
            return f"{path} is missing (apt-get install -y chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    return None


def origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


class Browser:
    def __init__(self, base_url: str) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        self.base_url = base_url.rstrip("/")
        self.profile = tempfile.mkdtemp(prefix="lectr-chromium-")
        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for flag in (*FLAGS, f"--user-data-dir={self.profile}"):
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
        self.driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
        self.driver.set_script_timeout(60)
        self.console: list[dict] = []
        self.urls: list[str] = []
        self.expected_statuses: set[int] = set()
        self.allowed_origins = {origin(self.base_url)}
        self.width = 1280
        self.driver.execute_cdp_cmd(
            "Browser.grantPermissions",
            {
                "origin": origin(self.base_url),
                "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"],
            },
        )

    # --- navigation and waiting ---------------------------------------------------------

    def open(self, route: str = "") -> None:
        """Load the dashboard afresh at ``#<route>`` (a new document, even
        when only the route differs from the current address)."""
        self.driver.get("about:blank")
        self.driver.get(f"{self.base_url}/{'#' + route if route else ''}")

    def go(self, route: str) -> None:
        """Change the route in the running page (no reload)."""
        self.driver.execute_script("location.hash = arguments[0]", route)

    def js(self, script: str, *args):
        return self.driver.execute_script(script, *args)

    def wait(self, predicate, timeout: float = 15.0, what: str = "condition"):
        """predicate()'s first true value; an element replaced while the
        predicate looked at it (a list re-rendered) means: look again."""
        from selenium.common.exceptions import StaleElementReferenceException

        deadline = time.monotonic() + timeout
        while True:
            try:
                value = predicate()
            except StaleElementReferenceException:
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}\n{self.text()[:2000]}")
            time.sleep(0.05)

    def find(self, css: str, timeout: float = 15.0):
        from selenium.webdriver.common.by import By

        return self.wait(
            lambda: next(iter(self.driver.find_elements(By.CSS_SELECTOR, css)), None),
            timeout,
            css,
        )

    def all(self, css: str) -> list:
        from selenium.webdriver.common.by import By

        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def texts(self, css: str) -> list[str]:
        """The text of every element matching ``css``, read in one step."""
        return self.js(
            "return [...document.querySelectorAll(arguments[0])].map(e => e.innerText)", css
        )

    def text(self) -> str:
        from selenium.common.exceptions import WebDriverException

        try:
            return self.js("return document.body ? document.body.innerText : ''") or ""
        except WebDriverException:  # a page in the middle of navigating
            return ""

    def wait_text(self, text: str, timeout: float = 15.0) -> None:
        self.wait(lambda: text in self.text(), timeout, repr(text))

    def heading(self, text: str, timeout: float = 15.0) -> None:
        self.wait(
            lambda: self.js("return document.querySelector('main h1')?.textContent") == text,
            timeout,
            f"the heading {text!r}",
        )

    def button(self, label: str, timeout: float = 15.0):
        """A visible button by its text."""
        return self.wait(
            lambda: next(
                (b for b in self.all("button") if b.text.strip() == label and b.is_displayed()),
                None,
            ),
            timeout,
            f"the button {label!r}",
        )

    def buttons(self) -> list[str]:
        return [b.text.strip() for b in self.all("main button") if b.is_displayed()]

    def control(self, label: str, within: str = "body"):
        """A form control by the text of its <label> (so every control the
        tests use has one)."""
        element_id = self.wait(
            lambda: self.js(
                "const scope = document.querySelector(arguments[1]);"
                "if (!scope) return null;"
                "const l = [...scope.querySelectorAll('label')]"
                "  .find(x => x.textContent.trim() === arguments[0]);"
                "return l ? l.htmlFor : null;",
                label,
                within,
            ),
            what=f"the label {label!r}",
        )
        return self.find(f"#{element_id}")

    def fill(self, label: str, value: str, within: str = "body") -> None:
        element = self.control(label, within)
        element.clear()
        element.send_keys(value)

    def select(self, label: str, value: str, within: str = "body") -> None:
        from selenium.webdriver.support.ui import Select

        Select(self.control(label, within)).select_by_value(value)

    def confirm_dialog(self, action: str) -> str:
        """Press ``action`` in the open confirmation dialog; its title."""
        dialog = self.find("dialog[open]")
        title = dialog.find_element("css selector", "h2").text
        buttons = dialog.find_elements("css selector", "button")
        next(b for b in buttons if b.text.strip() == action).click()
        self.wait(lambda: not self.all("dialog[open]"), what="the dialog to close")
        return title

    # --- session ------------------------------------------------------------------------

    def sign_in_with_token(self, token: str) -> None:
        self.open("/orgs")
        self.fill("Admin token", token)
        self.button("Sign in").click()
        self.heading("Organizations")

    def storage(self) -> dict:
        return self.js(
            "return {session: {...sessionStorage}, local: {...localStorage},"
            " cookies: document.cookie, href: location.href}"
        )

    # --- measurement --------------------------------------------------------------------

    def mark(self, name: str, timeout: float = 30.0) -> float:
        """startTime (ms since navigation start) of a performance mark."""
        return self.wait(
            lambda: self.js(
                "const m = performance.getEntriesByName(arguments[0]);"
                "return m.length ? m[m.length - 1].startTime : null;",
                name,
            ),
            timeout,
            f"the performance mark {name}",
        )

    # --- viewport and screenshots ----------------------------------------------------------

    def viewport(self, width: int, height: int = 900) -> None:
        self.width = width
        self.driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600},
        )

    def overflow(self) -> int:
        """How many pixels the page is wider than the viewport (0: none)."""
        return self.js(
            "return Math.max(0, document.documentElement.scrollWidth - window.innerWidth)"
        )

    def unlabelled_controls(self) -> list[str]:
        return self.js(
            "return [...document.querySelectorAll('input, select, textarea, button')]"
            ".filter(e => e.offsetParent !== null && e.type !== 'hidden')"
            ".filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label')"
            "  && !(e.tagName === 'BUTTON' && e.textContent.trim()))"
            ".map(e => e.outerHTML.slice(0, 120))"
        )

    def screenshot(self, name: str) -> Path:
        """A full-page PNG in artifacts/screenshots/<name>-<width>.png."""
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        width = self.width
        height = self.js(
            "return Math.ceil(Math.max(document.documentElement.scrollHeight, innerHeight))"
        )
        self.viewport(width, min(height, 6000))
        time.sleep(0.2)  # charts redraw on resize
        shot = self.driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png"})
        self.viewport(width)
        path = SCREENSHOTS / f"{name}-{width}.png"
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    # --- what happened ------------------------------------------------------------------------

    def collect(self) -> None:
        self.console += self.driver.get_log("browser")
        for entry in self.driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message["method"] == "Network.requestWillBeSent":
                self.urls.append(message["params"]["request"]["url"])

    def problems(self) -> list[str]:
        """Console errors (other than the HTTP statuses a test expects) and
        requests to any origin but the allowed ones."""
        self.collect()
        found = []
        for entry in self.console:
            if entry["level"] != "SEVERE":
                continue
            message = entry["message"]
            if "Failed to load resource" in message and any(
                f"status of {status}" in message for status in self.expected_statuses
            ):
                continue
            found.append(f"console: {message}")
        for url in self.urls:
            if not url.startswith(("http:", "https:", "ws:", "wss:")):
                continue  # the browser's own pages (chrome://, about:, data:)
            if origin(url) not in self.allowed_origins:
                found.append(f"request to another host: {url}")
        return found

    def close(self) -> None:
        try:
            self.driver.quit()
        finally:
            shutil.rmtree(self.profile, ignore_errors=True)
