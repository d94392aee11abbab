"""Clear and Stop during a streaming reply (`ClearableReplies`): the reply is cancelled in the manager and Clear answers
only after the reply's last update, so nothing of the reply can arrive after the emptied chat; Stop lets that last
update say the reply was stopped, and answers after it."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

from playground.ui.replies import ClearableReplies


class CancelRecorder:
    """The manager's side of Clear: who was cancelled."""

    def __init__(self):
        self.cancelled = []

    def cancel(self, owner):
        self.cancelled.append(owner)
        return 1


def endless_reply(closed: threading.Event):
    """A handler that keeps sending updates whatever the manager does (like an update already under way)."""

    def reply(text, request=None, **sampling):
        try:
            for count in range(100_000):
                time.sleep(0.005)
                yield f"{text} {count}"
        finally:
            closed.set()

    return reply


def drive(updates, delivered: list, lock: threading.Lock) -> threading.Thread:
    """What Gradio does with a streaming handler: each update is sent before the next is asked for."""

    def run():
        for update in updates:
            with lock:
                delivered.append(update)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_clear_answers_after_the_replys_last_update_and_ends_it():
    manager, closed, delivered, lock = CancelRecorder(), threading.Event(), [], threading.Lock()
    replies = ClearableReplies(manager, wait_s=5)
    reply = replies.clearable(endless_reply(closed))
    driver = drive(reply("hi", request=SimpleNamespace(session_hash="page-1"), temperature=0.7), delivered, lock)
    time.sleep(0.2)
    assert delivered, "the reply streams"
    started = time.monotonic()
    replies.clear("page-1")
    with lock:
        delivered.append("Cleared")  # Clear's own answer goes out now
    waited = time.monotonic() - started
    driver.join(timeout=5)
    assert not driver.is_alive() and closed.is_set(), "the reply's handler was closed"
    assert delivered[-1] == "Cleared", delivered[-3:]  # nothing of the reply came after Clear
    assert manager.cancelled == ["page-1"] and waited < 2, waited


def test_clear_leaves_other_pages_and_later_replies_alone():
    manager, delivered, lock = CancelRecorder(), [], threading.Lock()
    replies = ClearableReplies(manager, wait_s=5)
    other_closed = threading.Event()
    other = drive(replies.clearable(endless_reply(other_closed))("other", SimpleNamespace(session_hash="page-2")),
                  delivered, lock)
    replies.clear("page-1")  # nothing of page 1 runs: answers at once
    time.sleep(0.1)
    assert not other_closed.is_set() and other.is_alive()
    later_closed = threading.Event()
    later = replies.clearable(endless_reply(later_closed))("later", SimpleNamespace(session_hash="page-1"))
    assert next(later) == "later 0"  # a reply started after Clear is not a cleared one
    later.close()
    replies.clear("page-2")
    other.join(timeout=5)
    assert not other.is_alive() and other_closed.is_set() and later_closed.is_set()


def test_a_reply_closed_by_gradio_while_clear_waits_lets_clear_answer():
    manager, closed = CancelRecorder(), threading.Event()
    replies = ClearableReplies(manager, wait_s=5)
    reply = replies.clearable(endless_reply(closed))("hi", SimpleNamespace(session_hash="page-1"))
    next(reply)  # suspended after an update, as Gradio leaves it between two
    threading.Timer(0.2, reply.close).start()  # Gradio's own cancel closes it
    started = time.monotonic()
    replies.clear("page-1")
    assert closed.is_set() and time.monotonic() - started < 2


def test_stop_answers_after_the_replys_own_last_update_which_is_delivered():
    """Stop (unlike Clear) lets the reply say it was stopped, and answers only after that last update: a "Stopping…"
    answered earlier could land after it and stay on the page."""
    stopped = threading.Event()
    manager = SimpleNamespace(cancel=lambda owner: 0 if stopped.is_set() else stopped.set() or 1)  # how many it stopped
    delivered, lock = [], threading.Lock()
    replies = ClearableReplies(manager, wait_s=5)

    def reply(text, request=None):
        for count in range(100_000):
            if stopped.is_set():
                time.sleep(0.3)  # the generation takes a moment to notice
                yield "Done: stopped by you"
                return
            time.sleep(0.005)
            yield f"{text} {count}"

    driver = drive(replies.clearable(reply)("hi", request=SimpleNamespace(session_hash="page-1")), delivered, lock)
    time.sleep(0.2)
    assert replies.stop("page-1") is True
    with lock:
        assert delivered[-1] == "Done: stopped by you"  # already sent when Stop answers
    driver.join(timeout=5)
    assert replies.stop("page-1") is False  # nothing running any more
