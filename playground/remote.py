"""A remote OpenAI-compatible engine (vLLM, another playground, ...) behind the model manager.

The manager keeps its queue and its events; only the tokens come from elsewhere, streamed through OpenAI's client
(retries, timeouts and errors worded here). Streams run on one asyncio loop per engine so that a stop can cancel a request while it waits for the remote's next byte (a
blocking read could not be interrupted), which also closes the connection and lets the engine drop the request.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from typing import Any, Iterator

import httpx
import openai

from playground.defaults import CHAT_FORMATS, DEFAULT_CONCURRENCY, DEFAULT_TIMEOUT_S
from playground.errors import ParameterError, PlaygroundError
from playground.params import EXTENSION_FIELDS, SAMPLING_FIELDS, VLLM_EXTENSIONS, SamplingParams, to_wire
from playground.structured import ResponseFormat

# Extensions beyond OpenAI's standard fields, by the engine's `owned_by` in GET /v1/models (the registry says
# which; this server's /v1 request schema takes the same ones as vLLM's).
EXTENSIONS_BY_OWNER = {"vllm": VLLM_EXTENSIONS, "yuan-playground": VLLM_EXTENSIONS}
# Before any token arrives a request can be sent again safely: a refused connection, or an engine that says it
# is overloaded or restarting. A few tries only, with back-off; Retry-After is honoured up to a cap.
RETRIES = 2
BACKOFF_S = 0.5
RETRY_AFTER_CAP_S = 10.0
RETRY_STATUSES = {429, 502, 503, 504}
CANCEL_POLL_S = 0.1
OPENAI_FORMATS = ("json_object", "json_schema")  # the response formats of OpenAI's API, which vLLM takes too


class RemoteError(PlaygroundError):
    """The remote engine failed; the message says how, in words."""


class RemoteUnreachable(RemoteError):
    """The engine could not be reached or did not answer in time; trying again later may work."""


class RemoteTimeout(RemoteUnreachable):
    """The engine stayed silent for longer than the timeout."""


class RemoteRejected(RemoteError):
    """The engine refused the request itself (400/413/422: a prompt longer than its context, say)."""


def metrics_url(base_url: str) -> str:
    """vLLM serves Prometheus metrics at the server root, not under /v1."""
    root = base_url.rstrip("/")
    return (root[: -len("/v1")] if root.endswith("/v1") else root) + "/metrics"


def parse_prometheus(text: str) -> dict[str, float]:
    """Prometheus text format -> {name: value}; samples of one name (different labels) are summed."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "{" in line:  # name{labels} value [timestamp]
            name_part, value_text = line[: line.index("{")], line[line.rindex("}") + 1:].split()
        else:
            name_part, *value_text = line.split()
        try:
            value = float(value_text[0])
        except (IndexError, ValueError):
            continue
        values[name_part] = values.get(name_part, 0.0) + value
    return values


def _local_format(name: str):
    """A prompt format built here and sent to /v1/completions (for engines without a chat template)."""
    if name == "yuan":
        from playground.models.yuan.prompt import YuanChatFormat
        from playground.models.yuan.tokenization_yuan import EOD_TOKEN

        chat_format = YuanChatFormat()
        chat_format.stop_strings = [EOD_TOKEN]
        return chat_format
    return None


class RemoteEngine:
    def __init__(self, base_url: str, api_key: str | None = None, model: str | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S, concurrency: int = DEFAULT_CONCURRENCY,
                 chat_format: str = "auto", extensions: set[str] | None = None):
        if chat_format not in CHAT_FORMATS:
            raise ParameterError(f"unknown remote chat format {chat_format!r}; use {', '.join(CHAT_FORMATS)}",
                                 field="remote_chat_format")
        unknown = sorted(set(extensions or ()) - set(EXTENSION_FIELDS))
        if unknown:
            raise ParameterError(f"unknown sampling extension(s) {', '.join(unknown)}; "
                                 f"choose from {', '.join(EXTENSION_FIELDS)}", field="remote_extensions")
        # None: decided by the engine's owned_by; a set: what the user says the engine takes (SGLang, llama.cpp...).
        self.declared_extensions = None if extensions is None else set(extensions)
        self.base_url = base_url.rstrip("/")
        self.timeout_s = float(timeout_s)
        self.concurrency = max(1, int(concurrency))
        self.requested_chat_format = chat_format
        self.chat_format = "server"
        self.local_format = None
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        timeout = httpx.Timeout(connect=5.0, read=self.timeout_s, write=30.0, pool=self.timeout_s)
        self.client = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)  # short calls
        self._openai = openai.AsyncOpenAI(
            base_url=self.base_url, api_key=api_key or "EMPTY", timeout=timeout, max_retries=0,  # retried here
            http_client=httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(
                max_connections=self.concurrency + 2, max_keepalive_connections=self.concurrency)),
        )
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name="remote-http", daemon=True)
        self._loop_thread.start()
        self.requested_model = model
        self.model = model or ""
        self.owner = ""
        self.metrics_error: str | None = None
        self.context_length = 0  # 0: the engine did not say
        # The outcome of the latest request, for /healthz: when the engine last answered, and its latest failure.
        self.last_success_at: float | None = None
        self.last_failure: dict[str, Any] | None = None

    # ------------------------------------------------------------------------------------------ checks

    def connect(self) -> None:
        """GET /v1/models: is the engine there, does it take the key, does it serve the model asked for."""
        try:
            response = self.client.get("/models")
        except httpx.TimeoutException:
            raise RemoteTimeout(f"the remote engine at {self.base_url} did not answer in time") from None
        except httpx.HTTPError as exc:
            raise RemoteUnreachable(f"cannot reach the remote engine at {self.base_url}: {exc}") from None
        if response.status_code in RETRY_STATUSES:
            raise RemoteUnreachable(f"the remote engine at {self.base_url} is not ready ({response.status_code})")
        self._raise_for_status(response)
        try:
            models = response.json().get("data") or []
        except (ValueError, AttributeError):
            raise RemoteError(f"{self.base_url}/models did not answer with an OpenAI model list") from None
        if not models:
            raise RemoteError(f"the remote engine at {self.base_url} serves no model")
        chosen = next((m for m in models if m.get("id") == self.requested_model), None) if self.requested_model \
            else models[0]
        if chosen is None:
            names = ", ".join(str(m.get("id")) for m in models)
            raise RemoteError(f"the remote engine serves {names}, not {self.requested_model!r}")
        self.model = chosen["id"]
        self.owner = str(chosen.get("owned_by") or "")
        try:  # vLLM lists the context length it serves; others may not say
            self.context_length = int(chosen.get("max_model_len") or 0)
        except (TypeError, ValueError):
            self.context_length = 0
        self.chat_format = self._choose_chat_format()
        self.local_format = _local_format(self.chat_format)

    def _choose_chat_format(self) -> str:
        if self.requested_chat_format != "auto":
            return self.requested_chat_format
        # The Yuan2-M32 release's vLLM fork has no chat template (its chat endpoint refuses every request), so
        # a Yuan model on vLLM gets its prompt built here and sent to /v1/completions.
        return "yuan" if self.owner == "vllm" and "yuan" in self.model.lower() else "server"

    def _raise_for_status(self, response: httpx.Response) -> None:
        if response.status_code in (401, 403):
            raise RemoteError("the remote engine refused the API key (--remote-api-key)")
        if response.status_code >= 400:
            detail = _error_detail(response)
            hint = ""
            if "template" in detail.lower():
                hint = " (an engine without a chat template needs --remote-chat-format, e.g. yuan)"
            kind = RemoteRejected if response.status_code in (400, 413, 422) and not hint else RemoteError
            raise kind(f"the remote engine answered {response.status_code}: {detail[:500]}{hint}")

    def extensions(self) -> set[str]:
        if self.declared_extensions is not None:
            return self.declared_extensions
        return EXTENSIONS_BY_OWNER.get(self.owner, set())

    def unavailable_params(self) -> list[str]:
        return [name for name in EXTENSION_FIELDS if name not in self.extensions()]

    def request_fields(self, params: SamplingParams) -> dict[str, Any]:
        """SamplingParams -> the API's fields; a non-default value the engine cannot take is an error.

        Extensions the engine takes are always sent, so it applies what the controls show rather than its own
        defaults (vLLM's top_k default is off, the playground's is 50).
        """
        for name in self.unavailable_params():
            default = SAMPLING_FIELDS[name].default
            if getattr(params, name) != default:
                raise ParameterError(f"{name} is not available on the remote engine ({self.owner or 'unknown'}); "
                                     f"set it back to {default}", field=name)
        body = to_wire(params, [name for name in SAMPLING_FIELDS if name not in self.unavailable_params()])
        if self.owner == "vllm" and body.get("top_k") == 0:
            body["top_k"] = -1  # vLLM's "off" is -1, the playground's (and transformers') is 0
        return body

    def check_response_format(self, response_format: ResponseFormat | None) -> None:
        """OpenAI's formats go to any engine (vLLM decodes them under a grammar); regex and grammar, this server's
        own extensions, only to another playground."""
        if response_format is None or response_format.type in OPENAI_FORMATS or self.owner == "yuan-playground":
            return
        raise ParameterError(f"response_format type {response_format.type} is not available on the remote engine "
                             f"({self.owner or 'unknown'}); it takes {' and '.join(OPENAI_FORMATS)}",
                             field="response_format")

    def build_request(self, messages: list[dict[str, Any]] | None, prompt: str | None, params: SamplingParams,
                      logprobs: int | None, response_format: ResponseFormat | None = None
                      ) -> tuple[str, dict[str, Any], bool]:
        """(path, JSON body, chat-shaped answer?) for one streamed request."""
        body = {"model": self.model, "stream": True, "stream_options": {"include_usage": True},
                **self.request_fields(params)}
        if response_format is not None:  # vLLM takes it on both endpoints
            body["response_format"] = response_format.to_wire()
        if messages is not None and self.local_format is None:
            body["messages"] = messages
            if logprobs is not None:
                body["logprobs"], body["top_logprobs"] = True, logprobs
            return "/chat/completions", body, True
        if messages is not None:
            prompt = self.local_format.build_prompt(messages)
        body["prompt"] = prompt
        if logprobs is not None:
            body["logprobs"] = logprobs
        if self.local_format is not None:
            body["stop"] = [*body.get("stop", []), *self.local_format.stop_strings]
            if self.owner == "vllm":
                body["skip_special_tokens"] = False  # Yuan writes line breaks as the special token <n>
        return "/completions", body, False

    # -------------------------------------------------------------------------------------- streaming

    def stream(self, messages: list[dict[str, Any]] | None, prompt: str | None, params: SamplingParams,
               logprobs: int | None, cancelled: threading.Event,
               response_format: ResponseFormat | None = None) -> Iterator[tuple[str, Any]]:
        """Yield ("delta", (text, [token dicts])) then ("usage", dict) / ("finish", reason) from one streamed request.

        Token dicts: {"text", "logprob", "top": [(text, logprob)]}. Raises RemoteError on failure. Setting
        `cancelled` (or closing the iterator) ends the request within CANCEL_POLL_S, even while the remote is silent.
        """
        path, body, chat = self.build_request(messages, prompt, params, logprobs, response_format)
        items: queue.SimpleQueue = queue.SimpleQueue()
        future = asyncio.run_coroutine_threadsafe(self._produce(path, body, chat, items.put), self._loop)
        try:
            while True:
                try:
                    kind, value = items.get(timeout=CANCEL_POLL_S)
                except queue.Empty:
                    if cancelled.is_set():
                        return
                    continue
                if kind == "end":
                    return
                if kind == "error":
                    raise value
                yield kind, value
                if cancelled.is_set():
                    return
        finally:
            future.cancel()  # cancels the request on the loop, which closes its connection

    async def _produce(self, path: str, body: dict[str, Any], chat: bool, put) -> None:
        try:
            await self._stream_into(path, body, chat, put)
            self.last_success_at = time.time()
            put(("end", None))
        except Exception as exc:  # anything still ends the reply with a message, never a hang
            if not isinstance(exc, RemoteError):
                exc = RemoteError(f"the remote engine's answer could not be read ({type(exc).__name__}: {exc})")
            if not isinstance(exc, RemoteRejected):  # a refused request says nothing about the engine's health
                self.last_failure = {"at": time.time(), "error": str(exc)}
            put(("error", exc))

    async def _stream_into(self, path: str, body: dict[str, Any], chat: bool, put) -> None:
        for attempt in range(RETRIES + 1):
            last_try = attempt == RETRIES
            answered = False  # once the engine has answered, a failure is never sent again
            try:
                # OpenAI's own client reads the stream (SSE framing, error events); the chunks stay plain dicts, as
                # engines differ in what they put in them (vLLM 0.4's logprobs).
                stream = await self._openai.post(path, body=body, cast_to=object, stream=True,
                                                 stream_cls=openai.AsyncStream[object])
                answered = True
                async with stream:  # its connection is closed however this ends (a stop cancels this task)
                    async for data in stream:
                        for item in _chunk_items(data, chat):
                            put(item)
                return
            except openai.APIStatusError as exc:
                if exc.status_code in RETRY_STATUSES and not last_try:
                    await asyncio.sleep(_retry_delay(attempt, exc.response))
                    continue
                self._raise_for_status(exc.response)
                raise RemoteError(f"the remote engine answered {exc.status_code}") from None
            except (openai.APITimeoutError, httpx.TimeoutException):
                raise RemoteTimeout(
                    f"the remote engine at {self.base_url} sent nothing for {self.timeout_s:g} s "
                    "(--remote-timeout); it may be overloaded") from None
            except (openai.APIConnectionError, httpx.TransportError) as exc:
                if answered:
                    raise RemoteError("the remote engine went away mid-reply") from None
                if last_try:  # nothing was sent back: it was safe to send again, up to here
                    raise RemoteUnreachable(f"cannot reach the remote engine at {self.base_url} after {RETRIES + 1} "
                                            f"tries: {exc.__cause__ or exc}") from None
                await asyncio.sleep(BACKOFF_S * 2 ** attempt)
            except openai.APIError as exc:  # an error event in the stream
                raise RemoteError(f"the remote engine failed: {exc.message}") from None

    def metrics(self) -> dict[str, float] | None:
        """The engine's Prometheus metrics, or None when it has none; `metrics_error` says which when unreachable."""
        try:
            response = self.client.get(metrics_url(self.base_url), timeout=2.0)
        except httpx.HTTPError as exc:
            self.metrics_error = f"cannot reach {metrics_url(self.base_url)}: {type(exc).__name__}"
            return None
        self.metrics_error = None
        if response.status_code != 200 or "text/plain" not in response.headers.get("content-type", "text/plain"):
            return None
        return parse_prometheus(response.text) or None

    def close(self) -> None:
        async def shut():
            await self._openai.close()

        if self._loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(shut(), self._loop).result(timeout=5)
            except Exception:  # closing must not fail the caller
                pass
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._loop_thread.join(timeout=5)
        self.client.close()


def _retry_delay(attempt: int, response: httpx.Response) -> float:
    try:
        return min(RETRY_AFTER_CAP_S, max(0.0, float(response.headers["retry-after"])))
    except (KeyError, ValueError):
        return BACKOFF_S * 2 ** attempt


def _error_detail(response: httpx.Response) -> str:
    """The message of an OpenAI-style error ({"error": {"message"}}), vLLM 0.4's ({"message"}) or FastAPI's."""
    try:
        data = response.json()
    except ValueError:
        return response.text
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        for key in ("message", "detail"):
            if data.get(key):
                return str(data[key])
        if isinstance(error, str):
            return error
    return response.text


def _chunk_items(data: dict[str, Any], chat: bool) -> Iterator[tuple[str, Any]]:
    for choice in data.get("choices") or []:
        text = (choice.get("delta") or {}).get("content") or "" if chat else choice.get("text") or ""
        tokens = _logprob_tokens(choice.get("logprobs"))
        if text or tokens:
            yield "delta", (text, tokens)
        if choice.get("finish_reason"):
            yield "finish", choice["finish_reason"]
    if data.get("usage"):
        yield "usage", data["usage"]


def _logprob_tokens(logprobs: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Token dicts from either logprobs shape: chat's {"content": [...]} or the completions (and vLLM 0.4 chat)
    {"tokens", "token_logprobs", "top_logprobs"}."""
    if not logprobs:
        return []
    if "content" in logprobs:
        return [{"text": entry.get("token", ""), "logprob": entry.get("logprob"),
                 "top": [(alt.get("token", ""), alt.get("logprob")) for alt in entry.get("top_logprobs") or []]}
                for entry in logprobs.get("content") or []]
    tops = logprobs.get("top_logprobs") or []
    return [{"text": text, "logprob": value, "top": list((tops[i] or {}).items()) if i < len(tops) else []}
            for i, (text, value) in enumerate(zip(logprobs.get("tokens") or [], logprobs.get("token_logprobs") or []))]
