"""The Chat tab's conversation as shown: each reply's stats line is a message of its own (never part of the reply's
text, so copying a reply copies the reply), and positions in the shown list map back to the history."""

from __future__ import annotations

from playground.ui.chat_tab import display, history_index

HISTORY = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
           {"role": "user", "content": "A JSON object?"}, {"role": "assistant", "content": '{"a": 1}'}]
STATS = ["2 tokens · 9.1 tokens/s", "6 tokens · 8.7 tokens/s"]


def test_each_reply_is_followed_by_its_stats_line_and_keeps_its_own_text():
    shown = display(HISTORY, STATS)
    assert [m["content"] for m in shown if not m.get("metadata")] == [m["content"] for m in HISTORY]
    assert [m["metadata"]["title"] for m in shown if m.get("metadata")] == STATS
    assert [bool(m.get("metadata")) for m in shown] == [False, False, True, False, False, True]
    assert all(m["role"] == "assistant" and m["content"] == "" for m in shown if m.get("metadata"))


def test_a_reply_without_stats_gets_no_line():
    shown = display(HISTORY, STATS[:1])  # a reopened reply saved without stats
    assert len(shown) == len(HISTORY) + 1 and not shown[-1].get("metadata")


def test_shown_positions_map_back_to_the_history():
    # user 0, reply 1, stats, user 2, reply 3, stats
    assert [history_index(HISTORY, STATS, i) for i in range(6)] == [0, 1, None, 2, 3, None]
    assert history_index(HISTORY, STATS, 6) is None and history_index(HISTORY, STATS, -1) is None
