"""One reply as a tab shows it while it streams: what the chat and the lab's cards both do with the manager's
queued / delta / done events, written once."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from playground.generation.events import GenerationEvent, GenerationStats, TokenInfo
from playground.insight import mean_logprob, routing_to_state, tokens_to_state
from playground.structured import ResponseFormat, checked_reply

NOT_STARTED = "Waiting for its turn"
GENERATING = "Generating…"


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


__all__ = ["GENERATING", "NOT_STARTED", "StreamedReply"]
