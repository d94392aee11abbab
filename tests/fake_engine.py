"""A small OpenAI-compatible engine on loopback for the remote-backend tests, shaped like vLLM.

It streams a fixed list of tokens, and its knobs (attributes, changed while it runs) make it slow, refuse
requests, go without a chat template or serve Prometheus metrics. It records what it was sent and counts
requests in flight, so the tests see what the playground in front of it really did.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from harness import free_port


class FakeEngine:
    def __init__(self, port: int | None = None, model: str = "fake-model", owned_by: str = "vllm"):
        self.port = port or free_port()
        self.model = model
        self.owned_by = owned_by
        self.tokens = ["Hello", " there", ",", " friend", "."]
        self.first_token_delay_s = 0.0
        self.token_delay_s = 0.0
        self.failures: list[tuple[int, str | None]] = []  # (status, Retry-After) answered to the next requests
        self.chat_template = True  # False: the chat endpoint refuses, as the Yuan release's vLLM fork does
        self.legacy_chat_logprobs = False  # True: chat logprobs in vLLM 0.4's completions shape
        self.serve_metrics = True
        self.kv_cache_usage = 0.375
        self.waiting = 0
        self.requests: list[dict[str, Any]] = []  # {"path", "body", "at"} of every completion request
        self.active = 0
        self.max_active = 0
        self.disconnects = 0
        self.generated_tokens = 0
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return self.root + "/v1"

    # ----------------------------------------------------------------------------------------- serving

    def start(self) -> "FakeEngine":
        config = uvicorn.Config(self._app(), host="127.0.0.1", port=self.port, log_level="warning",
                                lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="fake-engine", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the fake engine did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            self._server.force_exit = True  # do not wait for open streams
            self._thread.join(timeout=10)

    def __enter__(self) -> "FakeEngine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/v1/models")
        def models():
            return {"object": "list", "data": [{"id": self.model, "object": "model", "owned_by": self.owned_by,
                                                "max_model_len": 4096}]}

        @app.get("/metrics")
        def metrics():
            if not self.serve_metrics:
                return PlainTextResponse("not found", status_code=404)
            return PlainTextResponse(
                "# HELP vllm:num_requests_running Number of requests running.\n"
                "# TYPE vllm:num_requests_running gauge\n"
                f'vllm:num_requests_running{{model_name="{self.model}"}} {float(self.active)}\n'
                f'vllm:num_requests_waiting{{model_name="{self.model}"}} {float(self.waiting)}\n'
                f'vllm:gpu_cache_usage_perc{{model_name="{self.model}"}} {self.kv_cache_usage}\n'
                f'vllm:generation_tokens_total{{model_name="{self.model}"}} {float(self.generated_tokens)}\n'
            )

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await request.json()
            if not self.chat_template:
                return JSONResponse({"object": "error", "type": "BadRequestError", "code": 400,
                                     "message": "No chat template provided. Chat API will not work."}, 400)
            return await self._answer("/chat/completions", body, chat=True)

        @app.post("/v1/completions")
        async def completions(request: Request):
            return await self._answer("/completions", await request.json(), chat=False)

        return app

    async def _answer(self, path: str, body: dict[str, Any], chat: bool):
        self.requests.append({"path": path, "body": body, "at": time.monotonic()})
        if self.failures:
            status, retry_after = self.failures.pop(0)
            headers = {"Retry-After": retry_after} if retry_after else {}
            return JSONResponse({"error": {"message": f"overloaded ({status})", "type": "server_error"}},
                                status, headers=headers)
        return StreamingResponse(self._stream(body, chat), media_type="text/event-stream")

    async def _stream(self, body: dict[str, Any], chat: bool):
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        finished = False
        try:
            await asyncio.sleep(self.first_token_delay_s)
            stops = body.get("stop") or []
            stops = [stops] if isinstance(stops, str) else stops
            reason, sent = "stop", 0
            for token in self.tokens:
                if token in stops:
                    break
                if sent == int(body.get("max_tokens") or 16):
                    reason = "length"
                    break
                if sent:
                    await asyncio.sleep(self.token_delay_s)
                sent += 1
                self.generated_tokens += 1
                yield _sse(self._chunk(token, body, chat, None))
            yield _sse(self._chunk("", body, chat, reason))
            if (body.get("stream_options") or {}).get("include_usage"):
                yield _sse({"id": "x", "object": "chunk", "model": self.model, "choices": [],
                            "usage": {"prompt_tokens": 3, "completion_tokens": sent, "total_tokens": 3 + sent}})
            yield "data: [DONE]\n\n"
            finished = True
        finally:
            self.active -= 1
            if not finished:
                self.disconnects += 1  # the client went away before the end

    def _chunk(self, token: str, body: dict[str, Any], chat: bool, reason: str | None) -> dict[str, Any]:
        logprobs = None
        top = body.get("top_logprobs") if chat else body.get("logprobs")
        if token and body.get("logprobs") not in (None, False):
            alternatives = {token: math.log(0.6), token.upper() + "!": math.log(0.3)}
            chosen = list(alternatives.items())[: max(1, int(top or 1))]
            if chat and not self.legacy_chat_logprobs:
                logprobs = {"content": [{"token": token, "logprob": math.log(0.6), "top_logprobs": [
                    {"token": t, "logprob": v} for t, v in chosen]}]}
            else:
                logprobs = {"tokens": [token], "token_logprobs": [math.log(0.6)], "top_logprobs": [dict(chosen)],
                            "text_offset": [0]}
        if chat:
            choice = {"index": 0, "delta": {"content": token} if token else {}, "logprobs": logprobs,
                      "finish_reason": reason}
        else:
            choice = {"index": 0, "text": token, "logprobs": logprobs, "finish_reason": reason}
        return {"id": "x", "object": "chunk", "model": self.model, "choices": [choice]}


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"
