"""The remote backend's generation: one streamed request to an OpenAI-compatible engine (`playground.remote`),
as the same events a local generation yields. The engine's own errors end the reply with an error stat."""

from __future__ import annotations

import time
from typing import Iterator

from playground.generation.events import (
    GenerationEvent,
    GenerationStats,
    TokenInfo,
    finish_timing,
    openai_finish_reason,
    text_extension,
)
from playground.generation.scheduling import GenerationHandle
from playground.params import SamplingParams
from playground.remote import RemoteError, RemoteRejected, RemoteTimeout
from playground.structured import ResponseFormat


def stream_remote(loaded, messages, prompt, params: SamplingParams, handle: GenerationHandle, queue_wait: float,
                  logprobs: int | None, response_format: ResponseFormat | None = None) -> Iterator[GenerationEvent]:
    """One reply from the remote engine, as the same events a local generation yields; `response_format` is sent
    along (the engine does the constrained decoding)."""
    engine, chat_format = loaded.model, loaded.chat_format
    stats = GenerationStats(queue_wait_s=queue_wait, seed=params.seed)
    started = time.perf_counter()
    first_at = last_at = None
    raw, emitted, deltas, reason = "", "", 0, None
    items = engine.stream(messages, prompt, params, logprobs, handle.cancelled, response_format)
    try:
        for kind, value in items:
            if kind == "delta":
                delta, token_dicts = value
                last_at = time.perf_counter()
                first_at = first_at or last_at
                deltas += max(1, len(token_dicts))
                raw += delta
                tokens = [TokenInfo(id=-1, text=t["text"], logprob=t["logprob"],
                                    top=[(-1, alt, lp) for alt, lp in t["top"]]) for t in token_dicts]
                # A prompt format built here (Yuan's) comes back with its special tokens: clean as locally,
                # holding back a special token that is only half received.
                text = text_extension(emitted, chat_format.clean_output(raw), hold=partial_special_token(raw, chat_format))
                emitted += text
                if text or tokens:
                    yield GenerationEvent("delta", text=text, tokens=tokens)
            elif kind == "finish":
                reason = value
            elif kind == "usage":
                stats.prompt_tokens = int(value.get("prompt_tokens") or 0)
                stats.new_tokens = int(value.get("completion_tokens") or 0)
                # vLLM reports the prompt tokens its prefix cache served, as OpenAI does.
                stats.cached_tokens = int((value.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    except RemoteError as exc:
        stats.finish_reason, stats.error = "error", str(exc)
        stats.error_source = ("remote-timeout" if isinstance(exc, RemoteTimeout)
                              else "remote-rejected" if isinstance(exc, RemoteRejected) else "remote")
    except BaseException:  # the consumer went away: closing the generator closes the HTTP stream
        handle.cancel()
        items.close()
        raise
    finally:
        items.close()
    stats.total_s = time.perf_counter() - started
    stats.new_tokens = stats.new_tokens or deltas
    finish_timing(stats, started, first_at, last_at)
    if stats.finish_reason != "error":
        if handle.cancelled.is_set():
            stats.finish_reason = "cancelled"
        elif reason is None:
            stats.finish_reason, stats.error = "error", "the remote engine went away mid-reply"
            stats.error_source = "remote"
        else:
            stats.finish_reason = openai_finish_reason(reason)
    held_back = text_extension(emitted, chat_format.clean_output(raw))
    if held_back:  # so the deltas add up to the reply
        yield GenerationEvent("delta", text=held_back, tokens=[])
        emitted += held_back
    yield GenerationEvent("done", text=emitted, stats=stats)


def partial_special_token(text: str, chat_format) -> bool:
    """Whether the text ends inside a `<...>` special token of a format that writes them as text."""
    if chat_format.skip_special_tokens:
        return False
    opening = text.rfind("<", max(0, len(text) - 16))
    return opening >= 0 and ">" not in text[opening:]


__all__ = ["stream_remote"]
