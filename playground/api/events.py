"""The manager's blocking `stream()` as an async iterator for the API handlers.

A worker thread drives the manager's generator and posts its events to the event loop, so the loop never
blocks on the model. When the consumer stops early (the client disconnected, the handler was cancelled)
the generation's handle is cancelled: the manager stops within one token, or leaves the queue at once.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, AsyncIterator, Awaitable, TypeVar

from fastapi import Request

from playground.api.http_errors import ClientDisconnected
from playground.generation.events import GenerationEvent
from playground.manager import GenerationHandle, ModelManager

T = TypeVar("T")
_END = object()
API_OWNER = "api"


async def generation_events(manager: ModelManager, **stream_kwargs: Any) -> AsyncIterator[GenerationEvent]:
    """`manager.stream(**stream_kwargs)`, event by event; the manager's errors are re-raised here."""
    handle = GenerationHandle(API_OWNER)
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue = asyncio.Queue()

    def post(item: object) -> None:
        try:
            loop.call_soon_threadsafe(inbox.put_nowait, item)
        except RuntimeError:  # the loop has closed: nobody will read the rest
            handle.cancel()

    def drive() -> None:
        try:
            for event in manager.stream(handle=handle, **stream_kwargs):
                post(event)
        except BaseException as exc:  # noqa: BLE001  (handed to the consumer, never lost in the thread)
            post(exc)
        finally:
            post(_END)

    threading.Thread(target=drive, name=f"api-generation-{handle.id}", daemon=True).start()
    try:
        while (item := await inbox.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        handle.cancel()  # a no-op after a normal end; frees the model and the queue when the consumer left


async def _disconnected(request: Request) -> None:
    # After the body has been read, receive() only returns once the client has gone.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`; if the client disconnects first, cancel it and raise ClientDisconnected."""
    work_task = asyncio.ensure_future(work)
    watch_task = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch_task.cancel()
        if not work_task.done():
            work_task.cancel()
    if work_task.cancelled() or not work_task.done():
        try:
            await work_task  # let the cancellation run the generators' cleanup before answering
        except asyncio.CancelledError:
            pass
        raise ClientDisconnected()
    return work_task.result()


async def collect(events: AsyncIterator[GenerationEvent]) -> tuple[GenerationEvent, list]:
    """Drain a generation: its `done` event and every token it reported (for logprobs)."""
    tokens: list = []
    async for event in events:
        tokens.extend(event.tokens)
        if event.kind == "done":
            return event, tokens
    raise RuntimeError("the generation ended without a done event")  # pragma: no cover



async def first_event(request: Request, events: AsyncIterator[GenerationEvent]) -> GenerationEvent:
    """The first event, awaited before a stream's 200 goes out: a request the manager rejects (over-long
    prompt, no model) still gets its HTTP error status."""

    async def first() -> GenerationEvent:
        return await anext(events)

    return await unless_disconnected(request, first())
