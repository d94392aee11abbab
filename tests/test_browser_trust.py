"""A real browser (Debian's Chromium through Playwright) on the states a careful user checks: the chat never lies about
what it holds, every run ends in a finished state, a reply can be reproduced from its saved settings.

The app is served from this process with a data folder of its own (the session's loaded model), so the steps can
read what was saved. The steps run in order on one page, as one person's session: each says which item of the
issue it shows. Screenshots are kept in a temporary folder, printed at the start (run with -s to see it).
"""

from __future__ import annotations

import json
import re

import pytest
from playwright.sync_api import Page, expect

from browser_support import REPLIES, REPLY_STATS, browser_page, open_tab, playwright, screens, shot  # noqa: F401
from harness import ServedApp, wait_for

from playground.storage import Storage

pytestmark = pytest.mark.slow

LONG_ASK = "Write a very long story about a dragon and a knight."


@pytest.fixture(scope="module")
def app(embedded_manager, tmp_path_factory):
    data = tmp_path_factory.mktemp("trust") / "data"
    server = ServedApp("--data-dir", str(data), manager=embedded_manager)
    server.data_dir = data
    yield server
    server.stop()


@pytest.fixture(scope="module")
def page(playwright, app, screens):
    with browser_page(playwright, app.url, screens / "trust-last.png") as page:
        yield page


def saved_chats(app) -> list[dict]:
    store = Storage(app.data_dir)
    try:
        return store.list_chats()
    finally:
        store.close()


def setting(page: Page, name: str):
    """The box of one of the chat's settings."""
    return page.locator(f"#sampling-{name} input, #sampling-{name} textarea").first


def set_setting(page: Page, name: str, value) -> None:
    field = setting(page, name)
    field.fill(str(value))
    field.press("Tab")


def send(page: Page, text: str) -> None:
    page.evaluate("() => { const s = document.querySelector('#chat-status'); if (s) s.dataset.before = s.innerText; }")
    box = page.locator("#chat-input textarea")
    box.fill(text)
    box.press("Enter")


def status_text(page: Page) -> str:
    """The chat's status line as written (not the progress timer Gradio lays over it while an event runs)."""
    return page.locator("#chat-status p, #chat-status .prose").first.inner_text().strip() \
        if page.locator("#chat-status p").count() else ""


def chat_done(page: Page) -> None:
    """Until the reply to the message just sent is done (its own "Done:" line, not the one before it)."""
    wait_for(lambda: status_text(page).startswith("Done:") and status_text(page) != page.evaluate(
        "() => document.querySelector('#chat-status').dataset.before || ''").strip(), 120, "the reply", every=0.2)
    expect(page.locator("#chat-send")).to_be_enabled(timeout=30_000)


def messages(page: Page, role: str) -> list[str]:
    return [text.strip() for text in page.locator(REPLIES if role == "bot" else f"#chatbot .message.{role}")
            .all_inner_texts()]


def test_1_the_model_panel_says_how_to_serve_yuan(page, screens):
    """Item 4: without --models-root the panel gives the commands, not a Load that does nothing."""
    expect(page.locator("#stand-in-banner")).to_contain_text("Model", timeout=30_000)
    page.locator("#model-panel").get_by_text("Model", exact=True).first.click()
    help_text = page.locator("#model-panel-help")
    expect(help_text).to_contain_text("To serve Yuan2.0-M32")
    expect(help_text).to_contain_text("python launch.py --model /models/Yuan2-M32-hf-int4")
    expect(help_text).to_contain_text("--load-format yuan")
    expect(page.locator("#model-load")).to_be_hidden()
    shot(page, screens, "trust-1-model-panel")
    page.locator("#model-panel").get_by_text("Model", exact=True).first.click()


def test_2_settings_read_as_words(page, screens):
    """Item 10: labels people read, in a column that fits the window better."""
    open_tab(page, "Chat")
    expect(page.locator("#sampling-temperature")).to_contain_text("Temperature")
    expect(page.locator("#sampling-no_repeat_ngram_size")).to_contain_text("No-repeat n-gram size")
    column = page.locator("#chat-settings").bounding_box()
    assert column and column["height"] < 1450, column
    shot(page, screens, "trust-2-settings")


def test_3_undo_gives_the_message_back_and_a_sent_message_can_be_edited(page, screens):
    """Item 14."""
    set_setting(page, "temperature", 0)
    set_setting(page, "max_new_tokens", 12)
    send(page, "Say hi to Ada.")
    chat_done(page)
    page.locator("#chat-undo").click()
    expect(page.locator("#chat-input textarea")).to_have_value("Say hi to Ada.")
    expect(page.locator("#chatbot .message")).to_have_count(0)
    page.locator("#chat-input textarea").press("Enter")
    chat_done(page)
    first_reply = messages(page, "bot")[-1]
    # Edit the sent message in place: the conversation from it on is answered again.
    user_message = page.locator("#chatbot .message.user").last
    user_message.hover()
    page.locator("#chatbot button[aria-label='Edit']").last.click()
    editor = page.locator("#chatbot textarea").last
    editor.fill("Say hi to Grace.")
    before = status_text(page)
    page.locator("#chatbot").get_by_role("button", name=re.compile("Submit|Save", re.I)).last.click()
    wait_for(lambda: (status := status_text(page)) != before and status.startswith("Done:"), 120,
             "the edited message's reply")
    assert messages(page, "user") == ["Say hi to Grace."]
    assert len(messages(page, "bot")) == 1 and messages(page, "bot")[-1] != first_reply
    shot(page, screens, "trust-3-edited")


def test_4_the_bin_during_a_reply_clears_for_good(page, app, screens):
    """Item 1: the Chatbot's bin while a reply streams stops it, and the chat stays empty."""
    set_setting(page, "max_new_tokens", 400)
    set_setting(page, "temperature", 0.8)
    send(page, LONG_ASK)
    expect(page.locator("#chat-status")).to_contain_text("Generating", timeout=60_000)
    chats_before = len(saved_chats(app))
    page.locator("#chatbot button[aria-label='Clear']").first.click()
    expect(page.locator("#chatbot .message")).to_have_count(0, timeout=30_000)  # a busy machine delays the stop
    expect(page.locator("#chat-status")).to_contain_text("Cleared", timeout=30_000)
    # For the next two seconds nothing comes back (it came back after about 0.7 s).
    for _ in range(10):
        page.wait_for_timeout(200)
        assert page.locator("#chatbot .message").count() == 0
    expect(page.locator("#chat-send")).to_be_enabled()
    set_setting(page, "max_new_tokens", 8)
    set_setting(page, "temperature", 0)
    send(page, "Hello!")
    chat_done(page)
    assert messages(page, "user") == ["Hello!"]
    chats = saved_chats(app)
    assert len(chats) == chats_before + 1 and chats[0]["messages"] == 2  # a new chat, not the cleared one
    shot(page, screens, "trust-4-cleared")


def test_5_settings_survive_a_reload_and_a_reopened_chat_brings_its_own(page, screens):
    """Item 7: every setting is kept in the browser, and saved with each reply (reopening restores them)."""
    page.locator("#chat-clear").click()  # a chat of its own, titled by its message
    set_setting(page, "top_k", 7)
    set_setting(page, "max_new_tokens", 9)
    send(page, "Name a bird.")
    chat_done(page)
    page.reload()
    open_tab(page, "Chat")
    expect(setting(page, "top_k")).to_have_value("7", timeout=30_000)
    expect(setting(page, "max_new_tokens")).to_have_value("9")
    set_setting(page, "top_k", 40)  # changed after the reply: reopening the chat brings back the reply's
    open_tab(page, "History")
    page.locator("#history-refresh").click()
    page.locator("#history-chats").get_by_text("Name a bird.", exact=True).filter(visible=True).first.click()
    page.locator("#history-open-chat").click()
    expect(page.locator("#chat-status")).to_contain_text("Reopened your chat", timeout=30_000)
    expect(setting(page, "top_k")).to_have_value("7", timeout=30_000)
    shot(page, screens, "trust-5-settings-restored")


def test_6_insight_after_a_reload_says_why_reopened_replies_have_no_details(page, screens):
    """Item 13."""
    page.reload()
    expect(page.locator(REPLIES).last).to_be_visible(timeout=30_000)
    open_tab(page, "Insight")
    page.locator("#insight-inspect").click()
    expect(page.locator("#insight-heading")).to_contain_text("reopened from saved history", timeout=30_000)
    shot(page, screens, "trust-6-insight-after-reload")


def test_7_greedy_tokens_read_as_certain_and_no_nan(page, screens):
    """Item 5: a greedy reply's tokens were chosen with certainty; blank, never NaN, where nothing is listed."""
    open_tab(page, "Chat")
    set_setting(page, "temperature", 0)
    set_setting(page, "max_new_tokens", 8)
    send(page, "What is the capital of France?")
    chat_done(page)
    open_tab(page, "Insight")
    page.locator("#insight-inspect").click()
    expect(page.locator("#insight-heading")).to_contain_text("Chat reply", timeout=30_000)
    expect(page.locator("#insight-tokens")).not_to_contain_text("nan")
    expect(page.locator("#insight-alternatives")).not_to_contain_text("nan")
    shot(page, screens, "trust-7-greedy-inspector")


def test_8_structured_output_is_said_beside_the_chat_and_keeps_its_indentation(page, screens):
    """Item 9."""
    open_tab(page, "Chat")
    set_setting(page, "max_new_tokens", 40)
    page.locator("#chat-structured").get_by_text("Structured output", exact=True).first.click()
    schema = '{"type": "object", "properties": {"colour": {"type": "string", "maxLength": 12}}, "required": ["colour"]}'
    page.locator("#chat-schema .cm-content").fill(schema)
    expect(page.locator("#chat-schema-on")).to_contain_text("Structured output is on")
    try:
        send(page, "Name a colour as JSON.")
        expect(page.locator("#chat-status")).to_contain_text("valid JSON matching the schema", timeout=120_000)
        # Waited for, not read at once: on a busy machine the last bubble was once still Gradio's pending "•••" when
        # the status line already said the reply was done.
        reply = page.locator(REPLIES).last
        expect(reply).to_contain_text('"colour"')
        assert '\n  "colour"' in reply.inner_text()  # two spaces of indentation, as printed
        # Item 2: the stats line is shown under the reply but is not part of it: the reply's copy button copies JSON
        # that parses.
        expect(page.locator(REPLY_STATS).last).to_contain_text("tokens")
        page.context.grant_permissions(["clipboard-read", "clipboard-write"])
        reply.hover()
        page.locator(f"#chatbot .message-row:has({REPLIES.removeprefix('#chatbot ')}) + .message-buttons "
                     "button[aria-label='Copy message']").last.click()
        copied = page.evaluate("navigator.clipboard.readText()")
        assert json.loads(copied)["colour"], copied
        shot(page, screens, "trust-8-structured")
    finally:  # the later steps share this page: they must not inherit the schema
        page.locator("#chat-schema .cm-content").fill("")
    expect(page.locator("#chat-schema-on")).to_be_hidden()


def plotted_points(page: Page) -> int:
    paths = page.locator("#memory-plot g.mark-line path")
    return sum(len(re.findall(r"[ML]", path.get_attribute("d") or "")) for path in paths.all())


def test_9_the_memory_panel_refreshes_only_while_shown(page, screens):
    """Item 15: its timer stops on the other tabs (each tick redraws plots, on a machine that is generating)."""
    open_tab(page, "Memory")
    wait_for(lambda: plotted_points(page) >= 4, 20, "the memory plot's first points", every=0.5)
    open_tab(page, "Chat")
    before = plotted_points(page)
    page.wait_for_timeout(3000)  # three ticks' time on another tab
    assert plotted_points(page) <= before + 2  # each series may take one sample as the tab is left, no more
    open_tab(page, "Memory")
    wait_for(lambda: plotted_points(page) > before + 2, 20, "the plot to grow again once shown", every=0.5)
    shot(page, screens, "trust-9-memory")


def fill_sweep(page: Page, values: str) -> None:
    """The lab's table filled with a temperature sweep over `values`, waited for: the table is the server's answer,
    and what is clicked before it arrives acts on the previous table."""
    page.locator("#lab-sweep-values input, #lab-sweep-values textarea").first.fill(values)
    page.get_by_role("button", name="Fill table with sweep").click()
    expect(page.locator("#lab-status")).to_contain_text(f"Sweep of temperature: {values}", timeout=30_000)


def test_10_a_stopped_lab_run_finishes_every_card(page, screens):
    """Items 3 and 11: four settings in two rows of two, Stop red only while running, and a stopped run leaves no
    card waiting, no NaN and no one-point chart."""
    open_tab(page, "Sampling lab")
    stop = page.locator("#lab-stop")
    expect(stop).to_be_disabled()
    fill_sweep(page, "0.2, 0.5, 0.8, 1.1")
    page.locator("#lab-prompt textarea").fill(LONG_ASK)
    page.locator("#lab-run").click()
    expect(stop).to_be_enabled(timeout=30_000)
    expect(page.locator("#lab-note-1")).to_contain_text("Generating", timeout=60_000)
    boxes = [page.locator(f"#lab-card-{number}").bounding_box() for number in range(1, 5)]
    assert abs(boxes[0]["y"] - boxes[1]["y"]) < 2 and boxes[2]["y"] > boxes[0]["y"] + 20, boxes  # 2 x 2
    assert abs(boxes[0]["width"] - boxes[2]["width"]) < 2, boxes  # one width for all
    shot(page, screens, "trust-10a-lab-running")
    stop.click()
    expect(page.locator("#lab-status")).to_contain_text("stopped", timeout=60_000)
    expect(stop).to_be_disabled(timeout=30_000)
    for number in range(2, 5):
        expect(page.locator(f"#lab-note-{number}")).to_contain_text("Not run: the run was stopped")
    expect(page.locator("#lab-results")).not_to_contain_text("nan")
    expect(page.locator("#lab-results")).to_contain_text("stopped by you")
    expect(page.locator("#lab-sweep")).to_be_hidden()  # one point is no chart
    shot(page, screens, "trust-10b-lab-stopped")


def test_11_history_runs_tell_apart_find_and_reopen_with_results(page, screens):
    """Item 8 (and 17: the import button says this server's limit)."""
    open_tab(page, "Sampling lab")
    page.locator("#lab-prompt textarea").fill("Name a fruit.")
    fill_sweep(page, "0, 0.7")
    page.locator("#lab-run").click()
    expect(page.locator("#lab-status")).to_contain_text("Done: 2 of 2", timeout=120_000)
    open_tab(page, "History")
    page.locator("#history-refresh").click()
    runs = page.locator("#history-runs")
    expect(runs).to_contain_text("Name a fruit. · temperature 0 / 0.7")
    page.locator("#history-search input").fill("fruit")
    expect(page.locator("#history-runs-caption")).to_contain_text("with “fruit”", timeout=30_000)

    def found() -> list[str]:  # the runs' "found" cells once the search's list is drawn: where it matched
        cells = runs.get_by_test_id(re.compile(r"^cell-\d+-1$")).filter(visible=True).all_inner_texts()
        return cells if cells and all("fruit" in text.lower() for text in cells) else []

    wait_for(found, 30, "the found column of the searched runs", every=0.3)
    runs.get_by_text(re.compile(r"^Name a fruit\. · temperature")).filter(visible=True).first.click()
    page.locator("#history-open-run").click()
    expect(page.locator("#lab-results-box")).to_be_visible(timeout=30_000)
    expect(page.locator("#lab-status")).to_contain_text("Saved run of")
    expect(page.locator("#lab-sweep-1")).to_contain_text("Temperature")  # the x axis names the swept parameter
    shot(page, screens, "trust-11-run-reopened-with-results")
    open_tab(page, "History")
    expect(page.get_by_role("button", name=re.compile(r"Import chats \(\.json, up to 7\.9 MB\)"))).to_be_visible()


def test_12_a_message_that_waits_in_the_queue_gets_its_bubble_at_once(page, app, screens):
    """Item 12: another page's long reply holds the model; this page's message shows a reply bubble with its place
    in the queue, and the stats line says how long it waited."""
    open_tab(page, "Chat")
    page.locator("#chat-clear").click()
    set_setting(page, "max_new_tokens", 6)
    other = page.context.new_page()  # another visitor: its own session, the same model
    try:
        other.goto(app.url)
        # The settings this browser remembers are put in the new page's boxes when it loads: wait for them first, or
        # they would overwrite the ones set below.
        expect(other.locator("#sampling-max_new_tokens input")).to_have_value("6", timeout=30_000)
        # Long enough that it does not end before this page's message arrives (the model may end a story earlier).
        for name, value in (("max_new_tokens", "1000"), ("seed", "3")):  # seed 3: a story that goes on
            box = other.locator(f"#sampling-{name} input, #sampling-{name} textarea").first
            box.fill(value)
            box.press("Tab")
        other.locator("#chat-input textarea").fill(LONG_ASK)
        other.locator("#chat-input textarea").press("Enter")
        expect(other.locator("#chat-status")).to_contain_text("Generating", timeout=60_000)
        send(page, "Hi!")
        expect(page.locator(REPLIES).last).to_contain_text("Waiting: place 1 in the queue", timeout=30_000)
        shot(page, screens, "trust-12-queued-bubble")
        stop = other.locator("#chat-stop")
        if stop.is_enabled():
            stop.click()  # no need to wait for the whole story
        chat_done(page)
        assert "waited" in status_text(page) and "in the queue" in status_text(page)
    finally:
        other.close()


def test_13_the_lab_adds_a_setting_with_one_click(page, screens):
    """Item 11: an "Add a setting" button beside the table, up to six."""
    open_tab(page, "Sampling lab")
    fill_sweep(page, "0, 0.7")
    add = page.locator("#lab-add-setting")
    for rows in range(3, 7):
        add.click()
        expect(page.locator("#lab-status")).to_contain_text(f"Setting {rows} added")
    add.click()
    expect(page.locator("#lab-status")).to_contain_text("at most 6 settings")
    shot(page, screens, "trust-13-six-settings")
