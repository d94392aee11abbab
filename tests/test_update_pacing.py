"""A streaming reply redraws the page at most UPDATES_PER_SECOND times a second, and no text is lost between updates:
the queue place, the first words and the end always show."""

from __future__ import annotations

import time

from playground.generation.events import GenerationEvent
from playground.ui.chat_tab import stream_reply
from playground.ui.controls import control_values
from playground.params import SamplingParams
from playground.ui.replies import UPDATES_PER_SECOND, UpdatePacer


def test_text_is_due_at_most_once_an_interval_and_the_rest_always():
    pacer = UpdatePacer(per_second=10)
    assert pacer.due(GenerationEvent("queued", position=1))
    assert pacer.due(GenerationEvent("delta", text="first"))  # the first words at once
    assert not pacer.due(GenerationEvent("delta", text=" second"))  # within 0.1 s of the first
    assert pacer.due(GenerationEvent("done"))  # the end always
    time.sleep(0.11)
    assert pacer.due(GenerationEvent("delta", text=" later"))
    assert not pacer.due(GenerationEvent("delta", text=" again"))


def test_a_chat_reply_streams_paced_and_its_last_update_holds_the_whole_reply(embedded_manager):
    controls = control_values(SamplingParams(temperature=0, max_new_tokens=40, seed=1))
    history = [{"role": "user", "content": "Write three sentences about the sea."}]
    started = time.monotonic()
    updates = list(stream_reply(embedded_manager, None, history, [], [], "", controls, request=None))
    seconds = time.monotonic() - started
    reference = embedded_manager.generate(messages=history, params=SamplingParams(temperature=0, max_new_tokens=40))
    assert reference.stats.new_tokens >= 20  # a reply of many tokens
    shown, _, _, line, _ = updates[-1]
    assert line.startswith("Done:")
    assert [m["content"] for m in shown if m["role"] == "assistant" and not m.get("metadata")] == [reference.text]
    # A bubble at once, then text at most ten times a second, then the end: not one update per token.
    assert 3 <= len(updates) <= seconds * UPDATES_PER_SECOND + 3, (len(updates), seconds)
