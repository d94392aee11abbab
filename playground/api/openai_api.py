"""OpenAI-compatible routes: GET /v1/models, POST /v1/chat/completions, POST /v1/completions.

The model id is the loaded model's name. Replies, streamed or not, come from the shared manager, so API
requests queue with the chat tab's in arrival order.
"""

from __future__ import annotations

import time
import uuid
from contextlib import aclosing, contextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterator

from fastapi import APIRouter, Depends, Request

from playground.api import sse
from playground.api.http_errors import ApiError, ApiRoute, from_parameter_error, generation_failed, to_api_error
from playground.api.dependencies import current_manager
from playground.api.events import collect, first_event, generation_events, unless_disconnected
from playground.api.openai_schemas import ChatCompletionRequest, CompletionRequest
from playground.errors import ParameterError
from playground.generation.events import GenerationEvent, GenerationStats, TokenInfo, openai_finish_reason
from playground.manager import ModelManager

router = APIRouter(prefix="/v1", route_class=ApiRoute, tags=["OpenAI-compatible"])

ChoiceForEvent = Callable[[GenerationEvent], dict[str, Any] | None]


def serving_model(manager: ModelManager, requested: str | None) -> str:
    """The loaded model's id; 503 while none is ready, 404 when the request names another model."""
    name = manager.require_model().name
    if requested and requested != name:
        raise ApiError(
            404, f"the model {requested!r} does not exist here; this server serves {name!r} (GET /v1/models)",
            param="model", code="model_not_found",
        )
    return name


def finish_reason(stats: GenerationStats) -> str:
    """OpenAI's finish_reason; a failed generation becomes an error answer instead."""
    if stats.finish_reason == "error":
        raise generation_failed(stats)
    # "cancelled" only happens when the client has gone, so no client reads it; "stop" is the honest rest.
    return openai_finish_reason(stats.finish_reason)


def usage(stats: GenerationStats) -> dict[str, Any]:
    return {
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.new_tokens,
        "total_tokens": stats.prompt_tokens + stats.new_tokens,
        # OpenAI's field for prompt tokens served from its prompt cache: here, the playground's.
        "prompt_tokens_details": {"cached_tokens": stats.cached_tokens},
    }


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def _token_bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def chat_logprobs(tokens: list[TokenInfo]) -> dict[str, Any]:
    """OpenAI's chat logprobs: each token's logprob under the model's raw distribution, with alternatives."""
    return {
        "content": [
            {
                "token": token.text,
                "logprob": token.logprob,
                "bytes": _token_bytes(token.text),
                "top_logprobs": [
                    {"token": text, "logprob": logprob, "bytes": _token_bytes(text)} for _, text, logprob in token.top
                ],
            }
            for token in tokens
        ]
    }


@dataclass
class TextOffsets:
    """Where each token starts in the completion text, for the legacy completions logprobs."""

    position: int = 0

    def logprobs(self, tokens: list[TokenInfo]) -> dict[str, Any]:
        offsets = []
        for token in tokens:
            offsets.append(self.position)
            self.position += len(token.text)
        return {
            "tokens": [token.text for token in tokens],
            "token_logprobs": [token.logprob for token in tokens],
            "top_logprobs": [{text: logprob for _, text, logprob in token.top} for token in tokens],
            "text_offset": offsets,
        }


@dataclass
class Envelope:
    """The fields every response object and stream chunk of one request repeats."""

    object: str
    model: str
    id: str
    created: int = field(default_factory=lambda: int(time.time()))

    def wrap(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {
            "id": self.id, "object": self.object, "created": self.created, "model": self.model,
            "system_fingerprint": None, "choices": choices, **extra,
        }


async def sse_body(
    head: GenerationEvent,
    events: AsyncIterator[GenerationEvent],
    envelope: Envelope,
    choice_for: ChoiceForEvent,
    final_choice: Callable[[str], dict[str, Any]],
    include_usage: bool,
    opening: dict[str, Any] | None = None,
) -> AsyncIterator[str]:
    """A generation as OpenAI stream chunks: one per delta, a finish chunk, usage if asked, then [DONE]."""
    extra = {"usage": None} if include_usage else {}

    def chunk(choices: list[dict[str, Any]], **fields: Any) -> str:
        return sse.event(envelope.wrap(choices, **{**extra, **fields}))

    async with aclosing(events):  # however this body ends, the generation ends with it
        if opening:
            yield chunk([opening])
        event = head
        while True:
            if event.kind == "queued":
                yield sse.comment(f"queued, position {event.position}")
            elif event.kind == "delta":
                choice = choice_for(event)
                if choice is not None:
                    yield chunk([choice])
            elif event.kind == "done":
                try:
                    reason = finish_reason(event.stats)
                except ApiError as error:  # the 200 has gone out: report it the way OpenAI streams do
                    yield sse.event(error.body())
                    break
                yield chunk([final_choice(reason)])
                if include_usage:
                    yield chunk([], usage=usage(event.stats))
                break
            try:
                event = await anext(events)
            except Exception as exc:  # the manager failed mid-stream: tell the client rather than cut it off
                error = to_api_error(exc) or ApiError(500, f"{type(exc).__name__}: {exc}", type="server_error")
                yield sse.event(error.body())
                break
    yield sse.DONE


@contextmanager
def prompt_errors_named(field_name: str) -> Iterator[None]:
    """The manager calls the prompt "prompt" in its errors (over-long, empty); name the request's field."""
    try:
        yield
    except ParameterError as exc:
        raise from_parameter_error(exc, {"prompt": field_name}) from None


# ----------------------------------------------------------------------------------------------- routes


@router.get("/models")
def list_models(manager: ModelManager = Depends(current_manager)) -> dict[str, Any]:
    """The one model this server serves: the loaded one."""
    loaded = manager.require_model()
    return {
        "object": "list",
        "data": [{"id": loaded.name, "object": "model", "created": int(loaded.loaded_at),
                  "owned_by": "yuan-playground"}],
    }


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request,
                           manager: ModelManager = Depends(current_manager)):
    """Chat with the loaded model through its own chat format; `stream: true` for server-sent events."""
    model = serving_model(manager, body.model)
    envelope = Envelope("chat.completion.chunk" if body.stream else "chat.completion", model, new_id("chatcmpl"))
    events = generation_events(
        manager, messages=body.message_dicts(), params=body.sampling_params(), logprobs=body.logprobs_count,
        response_format=body.response_format,
    )
    if body.stream:
        with prompt_errors_named("messages"):
            head = await first_event(request, events)

        def choice_for(event: GenerationEvent) -> dict[str, Any] | None:
            if not event.text and not event.tokens:
                return None
            return {
                "index": 0, "delta": {"content": event.text},
                "logprobs": chat_logprobs(event.tokens) if body.logprobs else None, "finish_reason": None,
            }

        return sse.response(sse_body(
            head, events, envelope, choice_for,
            final_choice=lambda reason: {"index": 0, "delta": {}, "logprobs": None, "finish_reason": reason},
            include_usage=body.include_usage,
            opening={
                "index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None,
            },
        ))

    with prompt_errors_named("messages"):
        done, tokens = await unless_disconnected(request, collect(events))
    return envelope.wrap(
        [{
            "index": 0,
            "message": {"role": "assistant", "content": done.text, "refusal": None},
            "logprobs": chat_logprobs(tokens) if body.logprobs else None,
            "finish_reason": finish_reason(done.stats),
        }],
        usage=usage(done.stats),
    )


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request, manager: ModelManager = Depends(current_manager)):
    """Continue raw prompt text (no chat format); `stream: true` for server-sent events."""
    model = serving_model(manager, body.model)
    envelope = Envelope("text_completion", model, new_id("cmpl"))
    events = generation_events(manager, prompt=body.prompt_text, params=body.sampling_params(),
                               logprobs=body.logprobs, response_format=body.response_format)
    with_logprobs = body.logprobs is not None
    offsets = TextOffsets()
    if body.stream:
        with prompt_errors_named("prompt"):
            head = await first_event(request, events)

        def choice_for(event: GenerationEvent) -> dict[str, Any] | None:
            if not event.text and not event.tokens:
                return None
            return {
                "index": 0, "text": event.text,
                "logprobs": offsets.logprobs(event.tokens) if with_logprobs else None, "finish_reason": None,
            }

        return sse.response(sse_body(
            head, events, envelope, choice_for,
            final_choice=lambda reason: {"index": 0, "text": "", "logprobs": None, "finish_reason": reason},
            include_usage=body.include_usage,
        ))

    with prompt_errors_named("prompt"):
        done, tokens = await unless_disconnected(request, collect(events))
    return envelope.wrap(
        [{
            "index": 0, "text": done.text,
            "logprobs": offsets.logprobs(tokens) if with_logprobs else None,
            "finish_reason": finish_reason(done.stats),
        }],
        usage=usage(done.stats),
    )
