"""What a generation yields, for every backend: events, per-token details, expert routing and the final stats."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # of the prompt's, taken from the prompt cache instead of computed
    new_tokens: int = 0
    queue_wait_s: float = 0.0
    time_to_first_token_s: float | None = None
    decode_tokens_per_s: float | None = None
    total_s: float = 0.0
    finish_reason: str = "stop"  # stop, length, cancelled, error
    seed: int | None = None
    error: str | None = None
    # Who failed: None (this process), "remote" (the remote engine), "remote-timeout" (it stayed silent) or
    # "remote-rejected" (it refused the request itself, e.g. a prompt longer than its context).
    error_source: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """The line shown under a reply, in words a person reads at a glance."""
        parts = [count(self.new_tokens, "token")]
        if self.decode_tokens_per_s:
            parts.append(f"{self.decode_tokens_per_s:.1f} tokens/s")
        if self.queue_wait_s >= QUEUE_WAIT_SHOWN_S:  # the wait is part of what the user waited for
            parts.append(f"waited {self.queue_wait_s:.1f} s in the queue")
        if self.time_to_first_token_s is not None:
            parts.append(f"first token after {self.time_to_first_token_s:.2f} s")
        parts.append(f"prompt {count(self.prompt_tokens, 'token')}" +
                     (f" ({self.cached_tokens} from the cache)" if self.cached_tokens else ""))
        if self.seed is not None:
            parts.append(f"seed {self.seed}")
        parts.append(FINISH_WORDS.get(self.finish_reason, self.finish_reason))
        return " · ".join(parts)


QUEUE_WAIT_SHOWN_S = 0.5  # shorter waits are not worth a word


def count(number: int, noun: str) -> str:
    """`1 token`, `2 tokens`."""
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def openai_finish_reason(reason: str | None) -> str:
    """OpenAI's two finish reasons for ours or an engine's (anything but "length" ended the reply itself: "stop")."""
    return "length" if reason == "length" else "stop"


# How each finish reason reads under a reply (a bare "stop" reads like a button).
FINISH_WORDS = {"stop": "ended by the model", "length": "ended at the token limit", "cancelled": "stopped by you",
                "error": "failed"}
# The same in a table's narrow column: the card's words where they are short, the reason itself where it is clear.
FINISH_SHORT = {"stop": "stop", "length": "length", "cancelled": "stopped by you", "error": "failed"}


@dataclass
class TokenInfo:
    """One generated token; logprob fields are filled only when the caller asked for them."""

    id: int
    text: str
    logprob: float | None = None  # under the model's raw distribution
    sampled_logprob: float | None = None  # under the distribution after the sampling settings
    top: list[tuple[int, str, float]] = field(default_factory=list)  # raw top alternatives
    sampled_top: list[tuple[int, str, float]] = field(default_factory=list)


@dataclass
class ExpertRouting:
    """Which experts each token went to, per layer (Mixture-of-Experts models, when asked for).

    `experts` and `weights` are [layers, tokens, chosen experts] over the prompt's tokens then the reply's; `token_ids`
    names those tokens.
    """

    experts: torch.Tensor
    weights: torch.Tensor
    token_ids: list[int]
    prompt_tokens: int
    num_experts: int


@dataclass
class GenerationEvent:
    """What a stream yields: `queued` (position), `delta` (text, tokens) and finally `done` (stats)."""

    kind: str
    text: str = ""  # delta text for "delta", the full clean reply for "done"
    position: int | None = None
    tokens: list[TokenInfo] = field(default_factory=list)
    stats: GenerationStats | None = None
    routing: ExpertRouting | None = None  # on "done", when the stream was asked to capture routing


@dataclass
class GenerationResult:
    text: str
    stats: GenerationStats
    tokens: list[TokenInfo]


def finish_timing(stats: GenerationStats, started: float, first_at: float | None, last_at: float | None) -> None:
    """Time to first token and decode speed from the arrival times of the first and last token (perf_counter);
    `stats.new_tokens` must be set. One rule for the local and the remote backends."""
    stats.time_to_first_token_s = (first_at - started) if first_at else None
    if first_at and last_at and last_at > first_at and stats.new_tokens > 1:
        stats.decode_tokens_per_s = (stats.new_tokens - 1) / (last_at - first_at)


def text_extension(emitted: str, clean: str, hold: bool = False) -> str:
    """The text that extends what was already sent: "" while held back, or when cleaning rewrote earlier text."""
    return clean[len(emitted):] if not hold and clean.startswith(emitted) else ""


__all__ = [
    "ExpertRouting",
    "GenerationEvent",
    "GenerationResult",
    "GenerationStats",
    "TokenInfo",
    "finish_timing",
    "text_extension",
]
