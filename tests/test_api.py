"""The HTTP APIs against the launched server: the tutorial's POST /, and /v1/* through the official client."""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import openai
import pytest

from harness import ServedApp, ServerChecks, cached_when_repeated
from playground.api.openai_api import Envelope, sse_body
from playground.config import parse_args
from playground.generation.events import GenerationEvent, GenerationStats

API_KEY = "test-key-123"
CHAT = [{"role": "user", "content": "Name three colours."}]
ERROR_FIELDS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def server(launched_server) -> ServerChecks:
    return launched_server


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model_id(server) -> str:
    return server.status()["name"]


@pytest.fixture(scope="module")
def side_servers(embedded_manager):
    """An app with --api-key (sharing the session's loaded model) and one whose model cannot load."""
    keyed = ServedApp("--api-key", API_KEY, manager=embedded_manager)
    broken = ServedApp("--model", "/nonexistent/model")
    try:
        keyed.wait_until(("ready",))
        broken.wait_until(("error",))
        yield keyed, broken
    finally:
        keyed.stop()
        broken.stop()


def post(server: ServerChecks, path: str, body=None, content: str | None = None, **kwargs) -> httpx.Response:
    if content is not None:
        kwargs.update(content=content, headers={"Content-Type": "application/json", **kwargs.get("headers", {})})
    else:
        kwargs["json"] = body
    return httpx.post(f"{server.url}{path}", timeout=60, **kwargs)


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == ERROR_FIELDS
    assert error["message"]
    if param is not None:
        assert error["param"] == param
    return error


def wait_for(server: ServerChecks, running: int, queued: int, timeout: float = 5) -> dict:
    """Poll /healthz until the manager shows `running` and `queued` generations."""
    deadline = time.monotonic() + timeout
    while True:
        status = server.status()
        if (status["running"], status["queued"]) == (running, queued):
            return status
        assert time.monotonic() < deadline, f"expected running {running}, queued {queued}: {status}"
        time.sleep(0.05)


# ---------------------------------------------------------------------------------- the prompt endpoint


def test_seed_endpoint_answers_greedily_and_extends_history(server):
    body = {
        "prompt": "What is my name?",
        "history": [
            {"role": "user", "content": "My name is Bob."},
            {"role": "assistant", "content": "Nice to meet you, Bob!"},
        ],
        "max_new_tokens": 16,
    }
    first = post(server, "/", body)
    assert first.status_code == 200, first.text
    answer = first.json()
    assert answer["status"] == 200
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", answer["time"])
    assert "Bob" in answer["response"]  # the history reached the model
    assert "<|im_end|>" not in answer["response"]
    assert answer["history"] == [*body["history"], {"role": "user", "content": body["prompt"]},
                                 {"role": "assistant", "content": answer["response"]}]
    # Greedy by default, so the tutorial's style of history (alternating strings) gives the same reply.
    strings = [turn["content"] for turn in body["history"]]
    second = post(server, "/", {**body, "history": strings}).json()
    assert second["response"] == answer["response"]
    assert second["history"] == [*strings, body["prompt"], answer["response"]]
    # ...and so do [user, assistant] pairs.
    third = post(server, "/", {**body, "history": [strings]}).json()
    assert third["response"] == answer["response"]
    assert third["history"] == [strings, [body["prompt"], answer["response"]]]


def test_seed_endpoint_does_not_take_over_the_ui(server):
    page = httpx.get(f"{server.url}/", timeout=30)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "gradio" in page.text.lower()


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "Hi", "max_tokens": 4}, "max_tokens"),  # a misspelt field is named, not ignored
        ({"prompt": "Hi", "temperature": -1}, "temperature"),
        ({"prompt": "Hi", "history": ["only the user's turn"]}, "history"),
        ({"prompt": ""}, "prompt"),
    ],
)
def test_seed_endpoint_rejects_bad_fields(server, body, param):
    assert_error(post(server, "/", body), 400, param)


# --------------------------------------------------------------------------- OpenAI-compatible, happy paths


def test_models_lists_the_loaded_model(client, model_id):
    assert [model.id for model in client.models.list()] == [model_id]


def test_chat_completion_and_its_stream_agree(client, model_id, server):
    request = dict(model=model_id, messages=CHAT, max_tokens=12, temperature=0)
    whole = client.chat.completions.create(**request)
    choice = whole.choices[0]
    assert choice.message.role == "assistant" and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    usage = whole.usage
    assert 0 < usage.completion_tokens <= 12 and usage.prompt_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    if choice.finish_reason == "length":
        assert usage.completion_tokens == 12

    chunks = list(client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == choice.message.content  # greedy: the same reply either way
    finishes = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
    assert finishes == [choice.finish_reason]
    assert chunks[-1].choices == []  # the usage chunk comes last
    streamed = chunks[-1].usage
    assert (streamed.prompt_tokens, streamed.completion_tokens) == (usage.prompt_tokens, usage.completion_tokens)
    # The same prompt again: all of it but its last token (in the model's resume steps) came from the prompt cache.
    assert streamed.prompt_tokens_details.cached_tokens == cached_when_repeated(server.status(), usage.prompt_tokens)
    assert all(chunk.usage is None for chunk in chunks[:-1])


def test_chat_logprobs_follow_openais_shape(client, model_id):
    reply = client.chat.completions.create(
        model=model_id, messages=[{"role": "user", "content": "Count from 1 to 20."}],
        max_tokens=8, temperature=0, logprobs=True, top_logprobs=3,
    )
    choice = reply.choices[0]
    content = choice.logprobs.content
    assert len(content) == reply.usage.completion_tokens  # one entry per generated token
    for entry in content:
        assert entry.logprob <= 0 and entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 3
        alternatives = [alt.logprob for alt in entry.top_logprobs]
        assert alternatives == sorted(alternatives, reverse=True)
        # Greedy: the chosen token is the most likely one under the raw distribution.
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
    if choice.finish_reason == "length":
        assert "".join(entry.token for entry in content) == choice.message.content

    streamed = client.chat.completions.create(
        model=model_id, messages=[{"role": "user", "content": "Count from 1 to 20."}],
        max_tokens=8, temperature=0, logprobs=True, top_logprobs=3, stream=True,
    )
    tokens = [entry.token for chunk in streamed if chunk.choices and chunk.choices[0].logprobs
              for entry in chunk.choices[0].logprobs.content]
    assert tokens == [entry.token for entry in content]


def test_completions_are_reproducible_with_a_seed(client, model_id):
    request = dict(model=model_id, prompt="Once upon a time", max_tokens=12, temperature=1.0, top_p=1.0, seed=7)
    first = client.completions.create(**request)
    second = client.completions.create(**request)
    assert first.choices[0].text.strip()
    assert first.choices[0].text == second.choices[0].text
    assert first.usage.completion_tokens == second.usage.completion_tokens
    streamed = client.completions.create(**request, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == first.choices[0].text


def test_stop_strings_end_the_completion(client, model_id):
    request = dict(model=model_id, prompt="1, 2, 3, 4, 5,", max_tokens=10, temperature=0)
    free = client.completions.create(**request).choices[0]
    assert "," in free.text  # without a stop string it keeps counting
    stopped = client.completions.create(**request, stop=[","]).choices[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text.split(",")[0]
    streamed = client.completions.create(**request, stop=",", stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed) == stopped.text


def test_completion_logprobs_use_the_legacy_shape(client, model_id):
    reply = client.completions.create(model=model_id, prompt="The capital of France is", max_tokens=4,
                                      temperature=0, logprobs=2)
    logprobs = reply.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == reply.usage.completion_tokens
    assert all(len(alternatives) <= 2 for alternatives in logprobs.top_logprobs)
    assert logprobs.text_offset[0] == 0


# ------------------------------------------------------------------------------------------ error cases


def test_unknown_model_is_404(client, server):
    with pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(model="gpt-4o", messages=CHAT, max_tokens=4)
    assert raised.value.body["code"] == "model_not_found" and "gpt-4o" in raised.value.body["message"]
    assert_error(post(server, "/v1/completions", {"model": "nope", "prompt": "Hi"}), 404, "model")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": CHAT, "n": 2}, "n"),
        ({"messages": CHAT, "presence_penalty": 0.5}, "presence_penalty"),
        ({"messages": CHAT, "frequency_penalty": -1}, "frequency_penalty"),
        ({"messages": CHAT, "temperature": 9}, "temperature"),
        ({"messages": CHAT, "max_tokens": 0}, "max_tokens"),
        ({"messages": CHAT, "top_p": "lots"}, "top_p"),
        ({"messages": CHAT, "top_logprobs": 2}, "top_logprobs"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": "word " * 9000}], "max_tokens": 4}, "messages"),
    ],
)
def test_bad_chat_requests_are_400_naming_the_field(server, body, param):
    error = assert_error(post(server, "/v1/chat/completions", body), 400, param)
    assert error["message"].startswith(f"{param}:") or "prompt" in error["message"]


def test_penalties_of_zero_are_accepted(client, model_id):
    reply = client.chat.completions.create(model=model_id, messages=CHAT, max_tokens=2, temperature=0,
                                           presence_penalty=0, frequency_penalty=0, n=1)
    assert reply.usage.completion_tokens > 0


def test_over_long_completion_prompt_is_400(server):
    error = assert_error(post(server, "/v1/completions", {"prompt": "word " * 9000, "max_tokens": 4}), 400, "prompt")
    assert "context" in error["message"]


def test_malformed_json_is_400(server):
    for path in ("/v1/chat/completions", "/v1/completions", "/"):
        error = assert_error(post(server, path, content='{"messages": ['), 400)
        assert error["code"] == "invalid_json" and "JSON" in error["message"]


def test_openai_client_surfaces_bad_requests(client, model_id):
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=model_id, messages=CHAT, n=3)
    assert raised.value.body["param"] == "n"


def test_no_model_is_503_with_the_reason(side_servers):
    _, broken = side_servers
    assert broken.status()["state"] == "error"
    for path, body in (("/v1/chat/completions", {"messages": CHAT}), ("/v1/completions", {"prompt": "Hi"}),
                       ("/", {"prompt": "Hi"})):
        error = assert_error(post(broken, path, body), 503)
        assert "does not exist" in error["message"]
    assert_error(httpx.get(f"{broken.url}/v1/models", timeout=30), 503)


def _render(head: GenerationEvent, rest: list) -> list[str]:
    async def events():
        for item in rest:
            if isinstance(item, Exception):
                raise item
            yield item

    async def run():
        body = sse_body(head, events(), Envelope("chat.completion.chunk", "m", "id-1"),
                        lambda event: {"delta": {"content": event.text}}, lambda reason: {"finish_reason": reason},
                        include_usage=False)
        return [chunk async for chunk in body]

    return asyncio.run(run())


def test_a_generation_failing_mid_stream_is_reported_in_the_stream():
    failed = _render(GenerationEvent("delta", text="Hi"), [RuntimeError("device lost")])
    assert json.loads(failed[0].removeprefix("data: "))["choices"][0]["delta"]["content"] == "Hi"
    error = json.loads(failed[1].removeprefix("data: "))["error"]
    assert "device lost" in error["message"] and error["type"] == "server_error"
    assert failed[-1] == "data: [DONE]\n\n"
    errored = _render(GenerationEvent("delta", text="Hi"),
                      [GenerationEvent("done", stats=GenerationStats(finish_reason="error", error="out of memory"))])
    assert "out of memory" in json.loads(errored[1].removeprefix("data: "))["error"]["message"]


# ------------------------------------------------------------------------------------------- API key


def test_api_key_option_and_environment_variable(monkeypatch):
    assert parse_args([]).api_key is None
    assert parse_args(["--api-key", "k1"]).api_key == "k1"
    monkeypatch.setenv("PLAYGROUND_API_KEY", "k2")
    assert parse_args([]).api_key == "k2"


def test_api_key_is_required_when_set(side_servers):
    keyed, _ = side_servers
    good = {"Authorization": f"Bearer {API_KEY}"}
    requests = (("/v1/chat/completions", {"messages": CHAT, "max_tokens": 2}),
                ("/", {"prompt": "Hi", "max_new_tokens": 2}))
    for path, body in requests:
        assert assert_error(post(keyed, path, body), 401)["type"] == "authentication_error"
        assert_error(post(keyed, path, body, headers={"Authorization": "Bearer wrong"}), 401)
        assert post(keyed, path, body, headers=good).status_code == 200
    assert_error(httpx.get(f"{keyed.url}/v1/models", timeout=30), 401)
    # The key covers the health check too; the browser UI stays open (--auth protects it).
    assert_error(httpx.get(f"{keyed.url}/healthz", timeout=30), 401)
    assert httpx.get(f"{keyed.url}/healthz", timeout=30, headers=good).json()["state"] == "ready"
    assert httpx.get(f"{keyed.url}/", timeout=30).status_code == 200

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{keyed.url}/v1", api_key="wrong", max_retries=0).models.list()
    keyed_client = openai.OpenAI(base_url=f"{keyed.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    assert len(keyed_client.models.list().data) == 1


def test_api_key_is_off_by_default(server):
    assert httpx.get(f"{server.url}/v1/models", timeout=30).status_code == 200


# ------------------------------------------------------------------------------ cancelling on disconnect


def _read_lines(lines, count: int) -> list[str]:
    """The next `count` non-empty lines. Takes the response's line iterator, not the response: an abandoned
    iter_lines() generator closes the connection when it is collected, which would cancel the stream."""
    got = []
    while len(got) < count:
        line = next(lines)
        if line:
            got.append(line)
    return got


def test_disconnect_mid_stream_frees_the_queue(server, model_id):
    long_request = {"messages": [{"role": "user", "content": "Write a long story about a dragon."}],
                    "max_tokens": 500, "stream": True}
    url = f"{server.url}/v1/chat/completions"
    with httpx.Client(timeout=60) as running, httpx.Client(timeout=60) as waiting:
        with running.stream("POST", url, json=long_request) as first:
            first_lines = first.iter_lines()
            got = _read_lines(first_lines, 3)
            assert all(line.startswith("data: ") for line in got)
            json.loads(got[-1].removeprefix("data: "))
            # A second request waits in line; leaving while queued frees its place at once.
            with waiting.stream("POST", url, json=long_request) as second:
                second_lines = second.iter_lines()
                assert _read_lines(second_lines, 2)[-1].startswith(": queued")
                assert server.status()["queued"] == 1
            wait_for(server, running=1, queued=0)
        # The streaming client has gone too: its generation stops within a token.
        wait_for(server, running=0, queued=0)
    reply = httpx.post(url, json={"messages": CHAT, "max_tokens": 4, "model": model_id}, timeout=60)
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"]


def test_v1_takes_the_fields_only_transformers_has():
    from playground.api.openai_schemas import ChatCompletionRequest, CompletionRequest

    body = {"messages": CHAT, "typical_p": 0.5, "no_repeat_ngram_size": 3}
    params = ChatCompletionRequest(**body).sampling_params()
    assert (params.typical_p, params.no_repeat_ngram_size) == (0.5, 3)  # not dropped to 1.0 and 0
    params = CompletionRequest(prompt="Hi", typical_p=0.25, no_repeat_ngram_size=2).sampling_params()
    assert (params.typical_p, params.no_repeat_ngram_size) == (0.25, 2)


def test_no_repeat_ngram_size_reaches_the_model_through_v1(server, model_id):
    body = {"model": model_id, "prompt": "List the numbers: one, two, three, one, two, three, one, two,",
            "max_tokens": 24, "temperature": 0, "logprobs": 1}
    free = post(server, "/v1/completions", body).json()["choices"][0]["logprobs"]["tokens"]
    held = post(server, "/v1/completions", {**body, "no_repeat_ngram_size": 1}).json()["choices"][0]["logprobs"]
    assert len(set(free)) < len(free)  # greedy repeats itself here
    assert len(set(held["tokens"])) == len(held["tokens"])  # no token twice: the field was applied


@pytest.mark.parametrize("body, param", [({"typical_p": 0}, "typical_p"), ({"no_repeat_ngram_size": 65},
                                                                             "no_repeat_ngram_size")])
def test_v1_checks_the_transformers_only_fields(server, model_id, body, param):
    assert_error(post(server, "/v1/chat/completions", {"model": model_id, "messages": CHAT, **body}), 400, param)
