"""One reply as a tab shows it while it streams: what the chat and the lab's cards both do with the manager's
queued / delta / done events, written once."""

from __future__ import annotations

import functools
import inspect
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from playground.generation.events import GenerationEvent, GenerationStats, TokenInfo
from playground.insight import mean_logprob, routing_to_state, tokens_to_state
from playground.structured import ResponseFormat, checked_reply
from playground.ui.controls import session_owner

NOT_STARTED = "Waiting for its turn"
GENERATING = "Generating…"
# How often a streaming reply redraws the page. Each update sends and re-renders the whole Chatbot (or every lab
# card): per token, that cost the browser and the server about as much CPU as computing the token (measured with
# the embedded model); at a GPU's speed it would outrun the page. Text between two updates arrives with the next.
UPDATES_PER_SECOND = 10


@dataclass
class StreamedReply:
    """A reply's text, tokens and the line that says where it is; `take` each event of `manager.stream`."""

    response_format: ResponseFormat | None = None  # a structured reply is pretty-printed and checked when done
    tokenizer: Any = None  # for the expert routing's token texts (models with experts)
    text: str = ""
    line: str = NOT_STARTED
    tokens: list[TokenInfo] = field(default_factory=list)
    stats: GenerationStats | None = None  # set when it is done
    summary: str = ""  # the stats in words (and the structured-output verdict), when done
    details: dict[str, Any] | None = None  # tokens and routing for the Insight tab, when done
    mean_logprob: float | None = None

    @property
    def generating(self) -> bool:
        return self.stats is None and self.line == GENERATING

    @property
    def failed(self) -> bool:
        return self.stats is not None and self.stats.finish_reason == "error"

    def take(self, event: GenerationEvent) -> None:
        self.tokens.extend(event.tokens)
        if event.kind == "queued":
            self.line = f"Waiting: place {event.position} in the queue"
        elif event.kind == "delta":
            self.text += event.text
            self.line = GENERATING
        elif event.kind == "done":
            self._finish(event)

    def _finish(self, event: GenerationEvent) -> None:
        self.stats = stats = event.stats
        self.text = event.text
        if stats.finish_reason == "error":
            self.line = f"⚠️ {stats.error}"
            return
        token_state = tokens_to_state(self.tokens)
        self.mean_logprob = mean_logprob(token_state)
        self.summary = stats.summary()
        if self.response_format is not None:  # pretty-printed for people, and checked against the schema
            self.text, verdict = checked_reply(event.text, self.response_format)
            self.summary += f" · {verdict}"
        self.line = self.summary
        self.details = {"tokens": token_state, "routing": routing_to_state(event.routing, self.tokenizer)}


class UpdatePacer:
    """Whether a streaming reply's event is worth an update of the page: a queue place, the first text and the end
    always are; further text at most `per_second` times a second (a slower model updates on every token)."""

    def __init__(self, per_second: float = UPDATES_PER_SECOND):
        self.interval = 1.0 / per_second
        self._last_text = -float("inf")

    def due(self, event: GenerationEvent) -> bool:
        if event.kind != "delta":
            return True
        now = time.monotonic()
        if now - self._last_text < self.interval:
            return False
        self._last_text = now
        return True


class ClearableReplies:
    """The replies each page is streaming, so that Clear (and Stop) ends them and answers only after their last update.

    Gradio's `cancels` runs beside Clear, not before it: an update a reply sent just then would land after the
    emptied chat and bring the reply back. Clear instead marks the page's replies, cancels them in the manager and
    waits until each has ended; a marked reply sends nothing more.
    """

    def __init__(self, manager, wait_s: float = 15.0):
        self._manager = manager
        self._wait_s = wait_s  # a bound, for a reply Gradio dropped without closing it
        self._changed = threading.Condition()
        self._running: dict[str, set[int]] = {}  # page (session) -> its replies' ids
        self._cleared: set[int] = set()
        self._ids = itertools.count()

    def clearable(self, reply_fn: Callable[..., Iterator]) -> Callable[..., Iterator]:
        """`reply_fn`, a handler yielding UI updates with a `request` parameter, as one that `clear` can end."""
        signature = inspect.signature(reply_fn)

        @functools.wraps(reply_fn)  # Gradio reads the handler's parameters (request, named inputs) through it
        def reply(*args, **kwargs):
            owner = session_owner(signature.bind(*args, **kwargs).arguments.get("request"))
            reply_id = self._started(owner)
            updates = reply_fn(*args, **kwargs)
            try:
                for update in updates:
                    with self._changed:
                        if reply_id in self._cleared:
                            return
                    yield update
            finally:
                updates.close()  # a reply stopped mid-stream lets its generation go
                self._ended(owner, reply_id)

        return reply

    def clear(self, owner: str | None) -> None:
        """End the page's replies, queued or streaming, and return once each has sent its last update."""
        self._end(owner, silenced=True)

    def stop(self, owner: str | None) -> bool:
        """Stop the page's replies and return once each has sent its last update, the line saying it was stopped
        (whatever the caller then shows comes after it, not under it); whether anything was running."""
        return self._end(owner, silenced=False)

    def _end(self, owner: str | None, silenced: bool) -> bool:
        if owner is None:
            return False
        with self._changed:
            replies = set(self._running.get(owner, ()))
            if silenced:
                self._cleared |= replies
        cancelled = self._manager.cancel(owner)
        with self._changed:
            self._changed.wait_for(lambda: not replies & self._running.get(owner, set()), timeout=self._wait_s)
        return bool(replies or cancelled)

    def _started(self, owner: str | None) -> int:
        with self._changed:
            reply_id = next(self._ids)
            self._running.setdefault(owner, set()).add(reply_id)
            return reply_id

    def _ended(self, owner: str | None, reply_id: int) -> None:
        with self._changed:
            self._running[owner].discard(reply_id)
            if not self._running[owner]:
                del self._running[owner]
            self._cleared.discard(reply_id)
            self._changed.notify_all()


__all__ = ["ClearableReplies", "GENERATING", "NOT_STARTED", "StreamedReply", "UpdatePacer"]
