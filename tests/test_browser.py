"""A real browser (Debian's Chromium through Playwright) on the launched app: tabs, a streamed chat reply, stop,
a lab run and its CSV download, the memory plot growing, and an invalid input's message.

Screenshots of each step are kept in a temporary folder, printed at the start (run with -s to see it).
"""

from __future__ import annotations

import csv
import io
import re
import time

import pytest
from playwright.sync_api import Page, expect

from browser_support import (REPLIES, REPLY_STATS, TABS, browser_page, open_tab, page, playwright,  # noqa: F401
                             screens, shot)
from fake_engine import FakeEngine
from harness import ServedApp, wait_for

pytestmark = pytest.mark.slow


def chat_status(page: Page) -> str:
    return page.locator("#chat-status").inner_text()


def last_reply(page: Page) -> str:
    replies = page.locator(REPLIES)
    return replies.last.inner_text() if replies.count() else ""


def sampling_input(page: Page, name: str):
    """The chat's box for one sampling field."""
    return page.locator(f"#sampling-{name} input, #sampling-{name} textarea").first


def set_max_new_tokens(page: Page, value: int) -> None:
    """Through the chat's Sampling accordion (the first on the page), as a user would."""
    accordion = page.get_by_text("Sampling", exact=True).first
    field = sampling_input(page, "max_new_tokens")
    if not field.is_visible():
        accordion.click()
    field.fill(str(value))
    field.press("Tab")


def send(page: Page, text: str) -> None:
    box = page.locator("#chat-input textarea")
    box.fill(text)
    box.press("Enter")


def test_1_app_loads_with_all_tabs(page, screens):
    expect(page.get_by_role("tab", name="Chat", exact=True)).to_be_visible()
    names = [tab.inner_text().strip() for tab in page.get_by_role("tab").all()]
    assert set(TABS) <= set(names), names
    expect(page.locator("#model-status")).to_contain_text("SmolLM2-135M-Instruct", timeout=30_000)
    shot(page, screens, "1-loaded")


def test_2_chat_reply_streams_in(page, screens):
    open_tab(page, "Chat")
    set_max_new_tokens(page, 40)
    send(page, "Write three sentences about the sea.")
    lengths = []
    deadline = time.monotonic() + 60
    while not chat_status(page).startswith("Done:"):
        assert time.monotonic() < deadline, chat_status(page)
        text = last_reply(page)
        if text and (not lengths or len(text) != lengths[-1]):
            lengths.append(len(text))
        time.sleep(0.2)  # gentle polling: the browser and the model share the CPU
    # it grew in steps: streamed (a partial reply's rendered Markdown may drop a trailing space or two meanwhile)
    assert len(lengths) >= 3 and lengths[-1] > lengths[0], lengths
    assert all(later >= earlier - 3 for earlier, later in zip(lengths, lengths[1:])), lengths
    stats = page.locator(REPLY_STATS).last.inner_text()
    assert "tokens/s" in stats and "tokens/s" not in last_reply(page)  # under the finished reply, not in its text
    shot(page, screens, "2-chat-streamed")


def test_3_stop_stops_the_reply(page, screens):
    set_max_new_tokens(page, 1000)
    send(page, "Write a very long story about a dragon and a knight, with many chapters.")
    deadline = time.monotonic() + 60
    while len(last_reply(page)) < 40 or "Generating" not in chat_status(page):
        assert time.monotonic() < deadline, chat_status(page)
        time.sleep(0.2)  # gentle polling: the browser and the model share the CPU
    page.locator("#chat-stop").click()
    expect(page.locator("#chat-status")).to_contain_text("stopped by you", timeout=30_000)
    shot(page, screens, "3-chat-stopped")


def test_4_lab_run_and_csv_download(page, screens):
    open_tab(page, "Sampling lab")
    page.locator("#lab-prompt textarea").fill("Name a colour.")
    page.locator("#lab-run").click()
    expect(page.locator("#lab-status")).to_contain_text("Done: 2 of 2 settings", timeout=120_000)
    link = page.locator("#lab-csv a").first
    expect(link).to_be_visible()
    with page.expect_download() as download_info:
        link.click()
    path = download_info.value.path()
    rows = list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"))))
    assert len(rows) == 2 and {"temperature", "seed", "output"} <= set(rows[0])
    assert all(row["output"] for row in rows)
    shot(page, screens, "4-lab-done")


def plotted_points(page: Page) -> int:
    """Vertices of the memory plot's lines (Vega draws each as an SVG path: M x,y L x,y ...)."""
    paths = page.locator("#memory-plot g.mark-line path")
    return sum(len(re.findall(r"[ML]", path.get_attribute("d") or "")) for path in paths.all())


def test_5_memory_plot_gains_points(page, screens):
    open_tab(page, "Memory")
    expect(page.locator("#memory-report")).to_contain_text("Process RSS")
    deadline = time.monotonic() + 20
    while plotted_points(page) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    before = plotted_points(page)
    shot(page, screens, "5a-memory")
    after = wait_for(lambda: plotted_points(page) > before and plotted_points(page), 20, "the plot's next point",
                     every=0.5)
    assert after > before, (before, after)
    shot(page, screens, "5b-memory-later")


def test_6_invalid_input_shows_its_message(page, screens):
    open_tab(page, "Chat")
    send(page, "   ")
    expect(page.locator("#chat-status")).to_contain_text("The message is empty")
    expect(page.get_by_text("Type a message first.")).to_be_visible()  # the warning toast
    shot(page, screens, "6-invalid-input")


# ------------------------------------------------------------------------- in front of a remote engine


@pytest.fixture(scope="module")
def remote_page(playwright, screens, tmp_path_factory):
    """A front (`--backend openai`) before a fake vLLM, in its own browser."""
    with FakeEngine(owned_by="vllm") as engine:
        engine.token_delay_s = 0.1
        front = ServedApp("--backend", "openai", "--base-url", engine.base_url)
        try:
            front.wait_until(("ready",), timeout=90)
            with browser_page(playwright, front.url, screens / "remote-last.png") as page:
                yield page
        finally:
            front.stop()


def test_7_remote_engine_greys_out_what_it_cannot_take(remote_page, screens):
    page = remote_page
    expect(page.locator("#model-status")).to_contain_text("fake-model", timeout=30_000)
    accordion = page.get_by_text("Sampling", exact=True).first
    if not sampling_input(page, "temperature").is_visible():
        accordion.click()
    # vLLM takes no typical_p or no_repeat_ngram_size: greyed out, with the reason next to them.
    for name in ("typical_p", "no_repeat_ngram_size"):
        expect(sampling_input(page, name)).to_be_disabled(timeout=15_000)
    for name in ("temperature", "top_k", "min_p", "repetition_penalty"):
        expect(sampling_input(page, name)).to_be_enabled()
    expect(page.get_by_text("not available on the remote engine").first).to_be_visible()
    shot(page, screens, "7a-remote-greyed")
    send(page, "Hello?")
    expect(page.locator("#chat-status")).to_contain_text("Done:", timeout=30_000)
    assert last_reply(page).startswith("Hello there, friend.")
    open_tab(page, "Memory")
    expect(page.locator("#memory-report")).to_contain_text("KV cache used **37.5%**".replace("**", ""))
    expect(page.locator("#remote-plot-0 g.mark-line path").first).to_be_attached(timeout=15_000)
    shot(page, screens, "7b-remote-memory")
    # Switching to a local model (the embedded one, from the model panel) brings the controls back.
    page.locator("#model-panel").get_by_text("Model", exact=True).first.click()
    page.locator("#model-load").click()
    # The status names the model while it loads too: wait for the load to end (the int4 conversion takes seconds).
    expect(page.locator("#model-status")).to_contain_text("Ready: SmolLM2-135M-Instruct", timeout=60_000)
    open_tab(page, "Chat")
    for name in ("typical_p", "no_repeat_ngram_size"):
        expect(sampling_input(page, name)).to_be_enabled(timeout=15_000)
    expect(page.get_by_text("not available on the remote engine")).to_have_count(0)
    shot(page, screens, "7c-local-again")


# ------------------------------------------------------------------------------- the chat as people use it


def chat_box(page: Page):
    return page.locator("#chat-input textarea")


def user_messages(page: Page) -> list[str]:
    return [text.strip() for text in page.locator("#chatbot .message.user").all_inner_texts()]


def test_8_settings_in_view_without_opening_anything(page, screens):
    page.reload()
    open_tab(page, "Chat")
    for element in (sampling_input(page, "temperature"), sampling_input(page, "max_new_tokens"),
                    page.locator("#preset-choice")):
        expect(element).to_be_visible()
        box = element.bounding_box()
        assert box and box["y"] + box["height"] <= 1000, box  # inside the first screen of a 1400x1000 window
    expect(sampling_input(page, "seed")).to_have_value("")  # empty means random, and looks empty
    expect(page.locator("#chat-stop button, button#chat-stop").first).to_be_disabled()  # nothing to stop yet
    expect(page.locator("#stand-in-banner")).to_contain_text("stand-in")
    shot(page, screens, "8-settings-in-view")


def test_9_draft_survives_a_streaming_reply_and_a_second_message_is_not_lost(page, screens):
    set_max_new_tokens(page, 60)
    send(page, "Tell me a short story about a cat.")
    expect(page.locator("#chat-status")).to_contain_text("Generating", timeout=60_000)
    expect(page.locator("#chat-send")).to_be_disabled()
    expect(page.locator("#chat-stop")).to_be_enabled()
    box = chat_box(page)
    box.fill("And now one about a dog.")
    box.press("Enter")  # while the reply streams: refused with a reason, the text stays
    expect(page.get_by_text("A reply is still being written").first).to_be_visible(timeout=10_000)
    shot(page, screens, "9a-draft-while-streaming")
    expect(page.locator("#chat-status")).to_contain_text("Done:", timeout=120_000)
    expect(box).to_have_value("And now one about a dog.")  # never wiped by the reply's updates
    expect(page.locator("#chat-send")).to_be_enabled()
    expect(page.locator("#chat-stop")).to_be_disabled()
    assert user_messages(page)[-1] == "Tell me a short story about a cat."
    box.press("Enter")  # now it goes
    expect(page.locator("#chatbot .message.user").last).to_contain_text("about a dog", timeout=30_000)
    expect(page.locator("#chat-send")).to_be_enabled(timeout=120_000)  # the second reply is done
    assert user_messages(page)[-2:] == ["Tell me a short story about a cat.", "And now one about a dog."]
    shot(page, screens, "9b-second-message-sent")


def test_10_chat_is_restored_after_a_reload(page, screens):
    before = user_messages(page)
    assert before
    page.reload()
    open_tab(page, "Chat")
    expect(page.locator("#chatbot .message.user").last).to_contain_text(before[-1], timeout=30_000)
    assert user_messages(page) == before
    expect(page.locator("#chat-status")).to_contain_text("Reopened your chat")
    shot(page, screens, "10-restored-after-reload")


def test_11_the_chatbots_bin_really_clears(page, screens):
    set_max_new_tokens(page, 8)
    page.locator("#chatbot button[aria-label='Clear']").first.click()
    expect(page.locator("#chatbot .message")).to_have_count(0)
    send(page, "Hello!")
    expect(page.locator("#chat-status")).to_contain_text("Done:", timeout=60_000)
    assert user_messages(page) == ["Hello!"]  # the old conversation did not come back
    # ... and the model did not see it: a one-message prompt is short
    prompt_tokens = int(re.search(r"prompt (\d+) tokens", chat_status(page)).group(1))
    assert prompt_tokens < 40, chat_status(page)
    page.reload()
    expect(page.locator("#chatbot .message.user").last).to_contain_text("Hello!", timeout=30_000)
    assert user_messages(page) == ["Hello!"]  # a reload shows the new chat, not the cleared one
    shot(page, screens, "11-cleared")


def test_12_out_of_range_is_refused_not_clamped_and_the_field_is_marked(page, screens):
    expect(page.locator("#sampling-temperature")).to_contain_text("Temperature")  # a label people read
    field = sampling_input(page, "temperature")
    field.fill("99")
    field.press("Tab")
    send(page, "Hi")
    expect(page.locator("#chat-status")).to_contain_text("temperature: must be between 0 and 5", timeout=30_000)
    expect(field).to_have_value("99")  # not clamped behind the user's back
    expect(chat_box(page)).to_have_value("Hi")  # the message is given back
    expect(page.locator("#sampling-temperature")).to_have_class(re.compile(r"\brefused\b"))  # and the field says so
    shot(page, screens, "12-refused-not-clamped")
    field.fill("0.7")
    field.press("Tab")
    set_max_new_tokens(page, 8)
    send(page, "Hi")
    expect(page.locator("#chat-status")).to_contain_text("Done:", timeout=60_000)
    expect(page.locator("#sampling-temperature")).not_to_have_class(re.compile(r"\brefused\b"))


def test_13_structured_output_is_shown_pretty_and_checked(page, screens):
    set_max_new_tokens(page, 40)
    page.get_by_text("Structured output", exact=True).first.click()
    schema = '{"type": "object", "properties": {"colour": {"type": "string", "maxLength": 12}}, "required": ["colour"]}'
    page.locator("#chat-schema .cm-content").fill(schema)
    send(page, "Name a colour as JSON.")
    expect(page.locator("#chat-status")).to_contain_text("valid JSON matching the schema", timeout=120_000)
    assert '"colour"' in last_reply(page)
    shot(page, screens, "13-structured-output")
    page.locator("#chat-schema .cm-content").fill("")
