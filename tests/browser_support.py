"""What the browser tests share: Debian's Chromium through Playwright, the page fixtures and screenshots.

A test module takes the fixtures by importing them: `from browser_support import page, playwright, screens`.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import pytest
from playwright.sync_api import Page, sync_playwright

CHROMIUM = "/usr/bin/chromium"
# No sandbox (CI runs as root in a container), no GPU, and nothing that would reach out to the network.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TABS = ["Chat", "Sampling lab", "Insight", "Memory"]
# The chat's replies, and the stats lines shown under them (messages of their own, a Gradio "thought" title).
REPLIES = "#chatbot .message.bot:not(:has(.thought-group))"
REPLY_STATS = "#chatbot .message.bot .thought-group"


@pytest.fixture(scope="module")
def screens(tmp_path_factory):
    folder = tmp_path_factory.mktemp("browser-screenshots")
    print(f"\nbrowser screenshots: {folder}")
    return folder


@pytest.fixture(scope="module")
def playwright():
    """One Playwright driver for the module: its sync API allows only one per thread at a time."""
    with sync_playwright() as driver:
        yield driver


@contextmanager
def browser_page(playwright, url: str, last_screenshot: Path):
    """A Chromium page on `url`; a screenshot of where it ended is kept."""
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto(url)
    try:
        yield page
    finally:
        page.screenshot(path=last_screenshot, full_page=True)
        browser.close()


@pytest.fixture(scope="module")
def page(playwright, launched_server, screens):
    with browser_page(playwright, launched_server.url, screens / "last.png") as page:
        yield page


def shot(page: Page, screens, name: str) -> None:
    page.screenshot(path=screens / f"{name}.png", full_page=True)


def open_tab(page: Page, name: str) -> None:
    page.get_by_role("tab", name=name, exact=True).click()
