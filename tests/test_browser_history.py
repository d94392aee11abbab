"""A real browser (Debian's Chromium through Playwright) on the History tab: a chat sent from the Chat tab is found by
search, renamed and deleted (a second click confirms), a lab run is reopened in the lab, and nothing empty (file
boxes, tables, a run view) is on show before there is something to show.

Screenshots of each step are kept in a temporary folder, printed at the start (run with -s to see it).
"""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import Page, expect

from browser_support import TABS, browser_page, open_tab, page, playwright, screens, shot  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow

CHAT_TEXT = "Say hello to the quokka."
LAB_PROMPT = "Name a fruit."
RUN_TITLE = f"{LAB_PROMPT} · temperature 0 / 0.7"  # an untitled run: its prompt and what its settings vary


def cell(page: Page, table: str, text: str):
    """A title cell (the first column) of a History list as shown (the table also keeps hidden copies of its cells
    for measuring; a search's "found" column may hold the same words)."""
    titles = page.locator(f"#{table}").get_by_test_id(re.compile(r"^cell-\d+-0$"))
    return titles.get_by_text(text, exact=True).filter(visible=True)


def search(page: Page, query: str) -> None:
    page.locator("#history-search input").fill(query)


def set_max_new_tokens(page: Page, value: int) -> None:
    """The chat's own box for it, opening its Sampling accordion where the settings are folded away."""
    field = page.locator("#sampling-max_new_tokens input").first
    if not field.is_visible():
        page.get_by_text("Sampling", exact=True).first.click()
    field.fill(str(value))
    field.press("Tab")


def nothing_empty_on_show(page: Page) -> None:
    for hidden in ("#history-chat-file", "#history-run-file", "#history-run", "#history-run-results",
                   "#history-chat-actions", "#history-run-actions"):
        expect(page.locator(hidden)).to_be_hidden()
    for kind in ("chats", "runs"):  # a list is shown only when it has rows; its caption says when it has none
        table = expect(page.locator(f"#history-{kind}"))
        if page.locator(f"#history-{kind}-caption").inner_text().startswith("No "):
            table.to_be_hidden()
        else:
            table.to_be_visible()


def test_1_nothing_empty_is_shown_before_there_is_content(page, screens):
    open_tab(page, "History")
    expect(page.locator("#history-chats-caption")).to_contain_text("chat")
    nothing_empty_on_show(page)
    shot(page, screens, "history-1-first-look")


def test_2_search_rename_copy_and_delete_a_chat(page, screens, tmp_path):
    open_tab(page, "Chat")
    set_max_new_tokens(page, 8)
    box = page.locator("#chat-input textarea")
    box.fill(CHAT_TEXT)
    box.press("Enter")
    expect(page.locator("#chat-status")).to_contain_text("Done:", timeout=120_000)

    open_tab(page, "History")
    search(page, "QUOKKA")  # any case
    expect(page.locator("#history-chats-caption")).to_contain_text("1 chat with “QUOKKA”")
    expect(page.locator("#history-runs-caption")).to_contain_text("No run has “QUOKKA”")
    expect(page.locator("#history-runs")).to_be_hidden()
    shot(page, screens, "history-2-search")

    cell(page, "history-chats", CHAT_TEXT).click()
    expect(page.locator("#history-chat-actions")).to_be_visible()
    expect(page.locator("#history-status")).to_contain_text(f"Selected {CHAT_TEXT}")
    page.locator("#history-chat-title input").fill("Quokka greetings")
    page.locator("#history-rename-chat").click()
    expect(page.locator("#history-status")).to_contain_text("Renamed to Quokka greetings")
    expect(cell(page, "history-chats", "Quokka greetings")).to_be_visible()
    expect(cell(page, "history-chats", CHAT_TEXT)).to_have_count(0)
    shot(page, screens, "history-3-renamed")

    # export it and import the file again: the copy says it is one
    expect(page.locator("#history-chat-file")).to_be_hidden()
    page.locator("#history-export-chat").click()
    link = page.locator("#history-chat-file a").first
    expect(link).to_be_visible()
    with page.expect_download() as download:
        link.click()
    exported = tmp_path / "quokka.json"
    download.value.save_as(exported)
    with page.expect_file_chooser() as chooser:
        page.locator("#history-import").click()
    chooser.value.set_files(exported)
    expect(page.locator("#history-status")).to_contain_text("Imported 1 chat: Quokka greetings")
    expect(cell(page, "history-chats", "Quokka greetings (imported)")).to_be_visible()
    expect(page.locator("#history-chats-caption")).to_contain_text("2 chats with “QUOKKA”")
    shot(page, screens, "history-4-imported")

    cell(page, "history-chats", "Quokka greetings").click()  # the original
    delete = page.locator("#history-delete-chat")
    delete.click()  # the first click only asks
    expect(delete).to_have_text("Click again to delete")
    expect(page.locator("#history-status")).to_contain_text("Delete this chat for good?")
    expect(cell(page, "history-chats", "Quokka greetings")).to_be_visible()
    page.wait_for_timeout(500)  # the button's change of colour is animated
    shot(page, screens, "history-5-confirm-delete")
    delete.click()
    expect(page.locator("#history-status")).to_contain_text("Deleted the chat Quokka greetings")
    expect(page.locator("#history-chats-caption")).to_contain_text("1 chat with “QUOKKA”")
    expect(cell(page, "history-chats", "Quokka greetings")).to_have_count(0)
    expect(cell(page, "history-chats", "Quokka greetings (imported)")).to_be_visible()
    expect(page.locator("#history-chat-actions")).to_be_hidden()
    shot(page, screens, "history-6-deleted")

    # it was the chat open in the Chat tab: that tab lets it go, and its next message starts a new chat
    open_tab(page, "Chat")
    expect(page.locator("#chat-status")).to_contain_text("deleted in the History tab")
    expect(page.locator("#chatbot .message")).to_have_count(0)


def test_3_a_lab_run_reopens_in_the_lab(page, screens):
    open_tab(page, "Sampling lab")
    page.locator("#lab-prompt textarea").fill(LAB_PROMPT)
    page.locator("#lab-run").click()
    expect(page.locator("#lab-status")).to_contain_text("Done", timeout=180_000)
    # change the lab afterwards: a third setting, another prompt
    page.get_by_role("button", name="Fill table with sweep").click()
    expect(page.locator("#lab-settings").get_by_text("1.2", exact=True).filter(visible=True)).to_have_count(1)
    page.locator("#lab-prompt textarea").fill("Something else entirely.")

    open_tab(page, "History")
    search(page, "")
    cell(page, "history-runs", RUN_TITLE).first.click()
    expect(page.locator("#history-run")).to_contain_text("Setting 2")
    expect(page.locator("#history-run-results")).to_be_visible()
    page.locator("#history-export-run").click()
    expect(page.locator("#history-run-file")).to_be_visible()
    shot(page, screens, "history-7-run-shown")
    page.locator("#history-refresh").click()  # what an earlier action showed goes with it
    expect(page.locator("#history-run-file")).to_be_hidden()
    expect(page.locator("#history-run")).to_be_hidden()
    expect(page.locator("#history-run-status")).to_have_text("")

    cell(page, "history-runs", RUN_TITLE).first.click()
    page.locator("#history-open-run").click()
    expect(page.get_by_role("tab", name="Sampling lab", exact=True)).to_have_attribute("aria-selected", "true")
    expect(page.locator("#lab-prompt textarea")).to_have_value(LAB_PROMPT)
    settings = page.locator("#lab-settings")
    expect(settings.get_by_text("1.2", exact=True).filter(visible=True)).to_have_count(0)  # two settings again
    expect(settings.get_by_text("0.7", exact=True).filter(visible=True)).to_have_count(1)
    expect(page.locator("#lab-results-box")).to_be_visible()  # with its results, as when it finished
    expect(page.locator("#lab-status")).to_contain_text("Saved run of")
    shot(page, screens, "history-8-open-in-lab")
