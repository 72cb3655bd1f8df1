"""What the browser tests share: Chromium's path and flags, sign-in, screenshots, a watch on
the console and on every request the page makes."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "artifacts" / "screenshots"
DOCS_SCREENSHOTS = REPO / "docs" / "screenshots"
settle_ms = 400  # plotly's last relayout after the page says its charts are drawn
ui_timeout_ms = 120_000  # generous: the machine running the tests may be shared and loaded


def new_page(browser: Any, **context_options: Any) -> Any:
    """A page in a fresh context (its own cookies), with the tests' patient timeouts."""
    context = browser.new_context(**context_options)
    context.set_default_timeout(ui_timeout_ms)
    context.set_default_navigation_timeout(ui_timeout_ms)
    return context.new_page()


def sign_in(page: Any, url: str, key: str) -> None:
    """Sign in through the form, as a person does (after signing anyone else out)."""
    page.context.clear_cookies()
    page.goto(url + "/dashboard/login")
    page.fill("#key", key)
    page.click("form[action='/dashboard/login'] button[type=submit]")
    page.wait_for_selector("header.top nav a.active")


def save_screenshot(page: Any, name: str) -> Path:
    """Write ``artifacts/screenshots/<name>.png``; with SPARECYCLES_UPDATE_SCREENSHOTS=1 also
    copy it to ``docs/screenshots`` (the README's pictures), so a test run leaves the tree as
    it found it."""
    page.wait_for_timeout(settle_ms)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("SPARECYCLES_UPDATE_SCREENSHOTS") == "1":
        DOCS_SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, DOCS_SCREENSHOTS / f"{name}.png")
    return path


class Watch:
    """Console errors, uncaught exceptions (CSP violations among them) and any request that
    leaves the coordinator (a CDN): a clean page has none."""

    def __init__(self, page: Any, origin: str):
        self.errors: list[str] = []
        self.foreign: list[str] = []
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        page.on("request", self._request)
        self.origin = origin

    def _request(self, request: Any) -> None:
        url = request.url
        if not url.startswith((self.origin + "/", "data:", "blob:")):
            self.foreign.append(url)

    def assert_clean(self) -> None:
        assert self.foreign == [], f"fetched from outside the coordinator: {self.foreign}"
        assert self.errors == [], f"errors in the browser console: {self.errors}"
