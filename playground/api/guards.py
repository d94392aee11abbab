"""ASGI middleware in front of every route, the UI's included: request size, HTTP methods, hidden pages, and open
streams ended cleanly at shutdown.

Each answers in OpenAI's error shape (`http_errors.ApiError`) before a route runs, so a refused request costs
neither the model's time nor memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from typing import Any, Awaitable, Callable

from playground.api.http_errors import ApiError

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Asgi = Callable[[Scope, Receive, Send], Awaitable[None]]


async def send_error(send: Send, error: ApiError) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(name.lower().encode(), value.encode()) for name, value in (error.headers or {}).items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class RequestSizeLimit:
    """Refuse a request body over `max_bytes` with a 413: at once when Content-Length says so, else as soon as
    the bytes received pass the limit (a chunked upload), before a handler has parsed any of it."""

    def __init__(self, app: Asgi, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def too_large(self, size: str) -> ApiError:
        return ApiError(413, f"the request body is {size}; the limit is {self.max_bytes} bytes "
                             "(the server's --max-request-bytes)", code="request_too_large")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            return await send_error(send, self.too_large(f"{int(length)} bytes"))
        received = 0
        started = refused = False

        async def counted_receive() -> Message:
            # Past the limit the handler is told the client left: whatever it answers then is dropped below.
            nonlocal received, started, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    refused = True
                    if not started:
                        started = True
                        await send_error(send, self.too_large(f"more than {self.max_bytes} bytes"))
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, counted_receive, guarded_send)


class MethodGuard:
    """On the API routes, a method a route does not take is a 405 naming the ones it does (the Gradio app mounted
    at "/" would otherwise answer 404), and HEAD is answered wherever GET is: monitors probe with HEAD.

    `routes` maps each API path to its methods; `hidden` paths answer 404 (the schema pages under an API key).
    """

    def __init__(self, app: Asgi, routes: dict[str, set[str]], hidden: set[str] = frozenset()):
        self.app = app
        self.routes = routes
        self.hidden = set(hidden)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope["path"], scope["method"]
        if path in self.hidden:
            return await send_error(send, ApiError(404, "Not Found", code="not_found"))
        methods = self.routes.get(path)
        if methods is None or method in methods:
            return await self.app(scope, receive, send)
        if method == "HEAD" and "GET" in methods:
            return await self.app({**scope, "method": "GET"}, receive, without_body(send))
        allowed = ", ".join(sorted(methods | ({"HEAD"} if "GET" in methods else set())))
        await send_error(send, ApiError(405, f"{method} is not allowed on {path}; use {allowed}",
                                        code="method_not_allowed", headers={"Allow": allowed}))


def without_body(send: Send) -> Send:
    """A HEAD answer: GET's status and headers, no body."""

    async def head_send(message: Message) -> None:
        if message["type"] == "http.response.body":
            message = {**message, "body": b""}
        await send(message)

    return head_send


# The login page's copy of the API description: Gradio writes it into the page before anyone has logged in.
API_INFO = re.compile(rb"(gradio_api_info = ).*?(;</script>)", re.S)  # the JSON escapes "<", so it cannot hold ";</script>"
LOGIN_PAGE = re.compile(rb'"auth_required":\s*true')


class LoginPageGuard:
    """Behind a login, the page served before login lists no endpoint, preset or folder name: its embedded API
    description is blanked (the UI fetches it again, through the login, once the user is in)."""

    def __init__(self, app: Asgi):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "GET" or scope["path"] != "/":
            return await self.app(scope, receive, send)
        start: Message | None = None
        chunks: list[bytes] = []

        async def buffered_send(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            body = b"".join(chunks)
            if LOGIN_PAGE.search(body):
                body = API_INFO.sub(rb"\1null\2", body, count=1)
            headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
            headers.append((b"content-length", str(len(body)).encode()))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, buffered_send)


class ShutdownSignal:
    """Set once, when the server starts to stop; the middleware below waits on it (from the server's event loop)."""

    def __init__(self):
        self._event: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def event(self) -> asyncio.Event:
        if self._event is None:  # made in the server's loop, on its first request
            self._event, self._loop = asyncio.Event(), asyncio.get_running_loop()
        return self._event

    def set(self) -> None:
        """From the signal handler (any thread): wake every open stream."""
        if self._event is not None and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._event.set)


class EndStreamsOnShutdown:
    """At shutdown, end the responses still open (the UI's event streams, a reply being streamed) at once and
    cleanly: the response is closed as a finished one. Otherwise the server waits for them until its graceful
    timeout and then cancels them, with an error and a traceback per stream in the terminal."""

    def __init__(self, app: Asgi, shutdown: ShutdownSignal):
        self.app = app
        self.shutdown = shutdown

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = {"started": False, "finished": False}

        async def tracked(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["started"] = True
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                state["finished"] = True
            await send(message)

        handler = asyncio.ensure_future(self.app(scope, receive, tracked))
        stopping = asyncio.ensure_future(self.shutdown.event().wait())
        try:
            await asyncio.wait({handler, stopping}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the server cancels this request: the handler goes with it
            handler.cancel()
            raise
        finally:
            stopping.cancel()
        if handler.done():
            handler.result()  # its own outcome, errors included
            return
        handler.cancel()
        with contextlib.suppress(BaseException):
            await handler
        if not state["started"]:
            await send_error(send, ApiError(503, "the server is stopping", code="server_stopping"))
        elif not state["finished"]:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
