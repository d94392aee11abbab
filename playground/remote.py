"""A remote OpenAI-compatible engine (vLLM, another playground, ...) behind the model manager.

The manager keeps its queue and its events; only the tokens come from elsewhere, over HTTP streaming.
"""

from __future__ import annotations

import json
import time
from typing import Any, Iterator

import httpx

from playground.errors import ParameterError, PlaygroundError
from playground.params import SamplingParams

# Extensions beyond OpenAI's standard fields, by the engine's `owned_by` in GET /v1/models.
EXTENSIONS_BY_OWNER = {
    "vllm": {"top_k", "min_p", "repetition_penalty"},
    "yuan-playground": {"top_k", "min_p", "repetition_penalty"},  # what its /v1 request schema accepts
}
EXTENSION_FIELDS = ["top_k", "min_p", "typical_p", "repetition_penalty", "no_repeat_ngram_size"]
CONNECT_TRIES = 3  # connection errors before any token: retried with back-off, a few times only
BACKOFF_S = 0.5
TIMEOUT = httpx.Timeout(connect=5.0, read=120.0, write=30.0, pool=10.0)


class RemoteError(PlaygroundError):
    """The remote engine failed; the message says how, in words."""


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


class RemoteEngine:
    def __init__(self, base_url: str, api_key: str | None = None, model: str | None = None,
                 timeout: httpx.Timeout = TIMEOUT):
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)
        self.requested_model = model
        self.model = model or ""
        self.owner = ""

    # ------------------------------------------------------------------------------------------ checks

    def connect(self) -> None:
        """GET /v1/models: is the engine there, does it take the key, does it serve the model asked for."""
        try:
            response = self.client.get("/models")
        except httpx.TimeoutException:
            raise RemoteError(f"the remote engine at {self.base_url} did not answer in time") from None
        except httpx.HTTPError as exc:
            raise RemoteError(f"cannot reach the remote engine at {self.base_url}: {exc}") from None
        self._raise_for_status(response)
        models = response.json().get("data") or []
        if not models:
            raise RemoteError(f"the remote engine at {self.base_url} serves no model")
        chosen = next((m for m in models if m.get("id") == self.requested_model), None) if self.requested_model \
            else models[0]
        if chosen is None:
            names = ", ".join(str(m.get("id")) for m in models)
            raise RemoteError(f"the remote engine serves {names}, not {self.requested_model!r}")
        self.model = chosen["id"]
        self.owner = str(chosen.get("owned_by") or "")

    def _raise_for_status(self, response: httpx.Response) -> None:
        if response.status_code == 401 or response.status_code == 403:
            raise RemoteError("the remote engine refused the API key (--remote-api-key)")
        if response.status_code >= 400:
            try:
                detail = response.json().get("error", {}).get("message") or response.text
            except ValueError:
                detail = response.text
            raise RemoteError(f"the remote engine answered {response.status_code}: {detail[:500]}")

    def extensions(self) -> set[str]:
        return EXTENSIONS_BY_OWNER.get(self.owner, set())

    def unavailable_params(self) -> list[str]:
        return [name for name in EXTENSION_FIELDS if name not in self.extensions()]

    def request_fields(self, params: SamplingParams) -> dict[str, Any]:
        """SamplingParams -> the API's fields; a non-default value the engine cannot take is an error."""
        body: dict[str, Any] = {"temperature": params.temperature, "top_p": params.top_p,
                                "max_tokens": params.max_new_tokens}
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = params.stop
        defaults = SamplingParams()
        for name in EXTENSION_FIELDS:
            value = getattr(params, name)
            if value == getattr(defaults, name):
                continue  # defaults are not sent: the engine applies its own
            if name not in self.extensions():
                raise ParameterError(
                    f"{name} is not available on the remote engine ({self.owner or 'unknown'}); "
                    f"set it back to {getattr(defaults, name)}", field=name,
                )
            body[name] = value
        return body

    # -------------------------------------------------------------------------------------- streaming

    def stream(self, messages: list[dict[str, Any]] | None, prompt: str | None, params: SamplingParams,
               logprobs: int | None, cancelled) -> Iterator[tuple[str, Any]]:
        """Yield ("delta", (text, [token dicts])) then ("usage", dict) / ("finish", reason) from one streamed request.

        Token dicts: {"text", "logprob", "top": [(text, logprob)]}. Raises RemoteError on failure.
        """
        body = {"model": self.model, "stream": True, "stream_options": {"include_usage": True},
                **self.request_fields(params)}
        if messages is not None:
            path, body["messages"] = "/chat/completions", messages
            if logprobs is not None:
                body["logprobs"], body["top_logprobs"] = True, logprobs
        else:
            path, body["prompt"] = "/completions", prompt
            if logprobs is not None:
                body["logprobs"] = logprobs
        received = False
        for attempt in range(CONNECT_TRIES):
            try:
                with self.client.stream("POST", path, json=body) as response:
                    if response.status_code >= 400:
                        response.read()
                        self._raise_for_status(response)
                    for data in _sse_data(response.iter_lines()):
                        if cancelled.is_set():
                            return  # leaving the with-block closes the HTTP stream
                        for item in _chunk_items(data, chat=messages is not None):
                            received = received or item[0] == "delta"
                            yield item
                return
            except httpx.ConnectError as exc:
                if received or attempt == CONNECT_TRIES - 1:
                    raise RemoteError(f"cannot reach the remote engine at {self.base_url}: {exc}") from None
                time.sleep(BACKOFF_S * 2 ** attempt)
            except httpx.TimeoutException:
                raise RemoteError(f"the remote engine at {self.base_url} did not answer in time") from None
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.NetworkError):
                raise RemoteError("the remote engine went away mid-reply") from None

    def metrics(self) -> dict[str, float] | None:
        """The engine's Prometheus metrics, or None when it has none."""
        try:
            response = self.client.get(metrics_url(self.base_url), timeout=2.0)
        except httpx.HTTPError:
            return None
        if response.status_code != 200 or "text/plain" not in response.headers.get("content-type", "text/plain"):
            return None
        return parse_prometheus(response.text) or None

    def close(self) -> None:
        self.client.close()


def _sse_data(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    for line in lines:
        if not line.startswith("data:"):
            continue  # blank separators and ": comment" lines (queue positions)
        payload = line[len("data:"):].strip()
        if payload == "[DONE]":
            return
        data = json.loads(payload)
        if "error" in data and "choices" not in data:
            message = data["error"].get("message") if isinstance(data["error"], dict) else data["error"]
            raise RemoteError(f"the remote engine failed: {message}")
        yield data


def _chunk_items(data: dict[str, Any], chat: bool) -> Iterator[tuple[str, Any]]:
    for choice in data.get("choices") or []:
        text = (choice.get("delta") or {}).get("content") or "" if chat else choice.get("text") or ""
        tokens = _chat_tokens(choice.get("logprobs")) if chat else _completion_tokens(choice.get("logprobs"))
        if text or tokens:
            yield "delta", (text, tokens)
        if choice.get("finish_reason"):
            yield "finish", choice["finish_reason"]
    if data.get("usage"):
        yield "usage", data["usage"]


def _chat_tokens(logprobs: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not logprobs:
        return []
    return [{"text": entry.get("token", ""), "logprob": entry.get("logprob"),
             "top": [(alt.get("token", ""), alt.get("logprob")) for alt in entry.get("top_logprobs") or []]}
            for entry in logprobs.get("content") or []]


def _completion_tokens(logprobs: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not logprobs:
        return []
    tops = logprobs.get("top_logprobs") or []
    return [{"text": text, "logprob": value, "top": list((tops[i] or {}).items()) if i < len(tops) else []}
            for i, (text, value) in enumerate(zip(logprobs.get("tokens") or [], logprobs.get("token_logprobs") or []))]

