"""The playground in front of a remote OpenAI-compatible engine: here a second playground is the remote."""

from __future__ import annotations

import httpx
import pytest
from gradio_client import Client

from fake_engine import FakeEngine
from harness import ServedApp, chat_call, chat_reply, count_tokens, free_port
from playground.errors import ParameterError, PlaygroundError
from playground.remote import RemoteEngine, metrics_url, parse_prometheus

pytestmark = pytest.mark.slow

GREEDY = dict(temperature=0.0, top_p=0.9, top_k=50, min_p=0.0, typical_p=1.0, repetition_penalty=1.0,
              no_repeat_ngram_size=0, max_new_tokens=12, seed=1, stop="")


@pytest.fixture(scope="module")
def front(launched_server):
    server = ServedApp("--backend", "openai", "--base-url", launched_server.url + "/v1")
    try:
        server.wait_until(("ready",), timeout=60)
        yield server
    finally:
        server.stop()


def test_status_names_the_remote(front, launched_server):
    status = front.status()
    assert status["kind"] == "remote" and status["device"] == "remote"
    assert status["base_url"] == launched_server.url + "/v1"
    assert status["name"] == launched_server.status()["name"]
    assert status["remote_owner"] == "yuan-playground"


def test_openai_api_through_the_front_matches_the_remote(front, launched_server):
    from openai import OpenAI

    ask = dict(model=front.status()["name"], messages=[{"role": "user", "content": "Say hi."}],
               temperature=0, max_tokens=10, seed=1)
    via_front = OpenAI(base_url=front.url + "/v1", api_key="x").chat.completions.create(**ask)
    direct = OpenAI(base_url=launched_server.url + "/v1", api_key="x").chat.completions.create(**ask)
    assert via_front.choices[0].message.content == direct.choices[0].message.content
    assert via_front.usage.completion_tokens == direct.usage.completion_tokens
    streamed = OpenAI(base_url=front.url + "/v1", api_key="x").chat.completions.create(**ask, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == direct.choices[0].message.content
    text = OpenAI(base_url=front.url + "/v1", api_key="x").completions.create(
        model=ask["model"], prompt="The sky is", max_tokens=6, temperature=0, logprobs=2)
    assert text.choices[0].text and len(text.choices[0].logprobs.tokens) >= 1


def test_chat_and_lab_through_the_front(front):
    client = Client(front.url, verbose=False)
    chat, status, _ = client.predict(**chat_call("Say hi.", **GREEDY), api_name="/chat")
    reply = chat_reply(chat)
    assert reply.strip() and "tok" in status
    table = {"headers": ["temperature", "top_p", "top_k", "min_p", "typical_p", "repetition_penalty",
                         "no_repeat_ngram_size", "max_new_tokens", "seed"],
             "data": [[0.0, 0.9, 50, 0, 1, 1, 0, 12, 1]]}
    out = client.predict("Write a haiku about rain.", table, api_name="/lab_run")
    assert out[0]["value"] and out[14] == "Done: 1 of 1 settings"


def test_seed_endpoint_and_langchain_through_the_front(front):
    from playground.integrations.langchain import PlaygroundChatModel

    reply = PlaygroundChatModel(base_url=front.url, temperature=0, max_tokens=8).invoke("Name a colour.")
    assert reply.content.strip()


def test_unavailable_field_is_rejected_not_dropped(front):
    # The remote (a playground's /v1) takes no typical_p: the front refuses it by name, on its API and in its UI.
    answer = httpx.post(front.url + "/", timeout=30, json={"prompt": "Hi", "max_new_tokens": 4, "typical_p": 0.5})
    assert answer.status_code == 400
    assert "typical_p is not available on the remote engine (yuan-playground)" in answer.json()["error"]["message"]
    settings = {**GREEDY, "typical_p": 0.5}
    chat, status, _ = Client(front.url, verbose=False).predict(**chat_call("Hi", **settings), api_name="/chat")
    assert "typical_p is not available on the remote engine" in status
    assert httpx.post(front.url + "/", timeout=30, json={"prompt": "Hi", "max_new_tokens": 4,
                                                         "typical_p": 1.0}).status_code == 200  # its default is fine


# -------------------------------------------------------------------------------- a fake vLLM remote


@pytest.fixture(scope="module")
def fake_vllm():
    with FakeEngine(owned_by="vllm") as engine:
        engine.waiting = 2
        yield engine.base_url


def test_min_p_is_rejected_by_a_vllm_remote(new_manager, fake_vllm):
    manager = new_manager()
    status = manager.load_remote(fake_vllm)
    assert status["name"] == "fake-model" and status["remote_owner"] == "vllm"
    assert manager.unavailable_params() == ["typical_p", "no_repeat_ngram_size"]
    with pytest.raises(ParameterError, match=r"typical_p is not available on the remote engine \(vllm\)"):
        list(manager.stream(prompt="Hi", params={"typical_p": 0.5}))
    with pytest.raises(PlaygroundError, match="remote"):
        count_tokens(manager, "Hi")
    with pytest.raises(PlaygroundError, match="remote"):
        manager.next_token_logits(prompt="Hi")


def test_unknown_owner_takes_no_extensions(fake_vllm):
    engine = RemoteEngine(fake_vllm)
    engine.connect()
    engine.owner = "someone-else"
    from playground.params import SamplingParams

    with pytest.raises(ParameterError, match=r"min_p is not available on the remote engine \(someone-else\)"):
        engine.request_fields(SamplingParams(min_p=0.1))
    assert "min_p" not in engine.request_fields(SamplingParams())  # defaults are simply not sent


def test_metrics_of_a_vllm_remote(fake_vllm):
    engine = RemoteEngine(fake_vllm)
    assert metrics_url(fake_vllm) == fake_vllm[: -len("/v1")] + "/metrics"
    metrics = engine.metrics()
    assert metrics["vllm:num_requests_waiting"] == 2.0 and metrics["vllm:gpu_cache_usage_perc"] == 0.375


def test_prometheus_parser_on_fake_text():
    text = ('# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage.\n# TYPE vllm:gpu_cache_usage_perc gauge\n'
            'vllm:gpu_cache_usage_perc{model_name="yuan"} 0.5\n'
            'vllm:num_requests_running{model_name="yuan",le="x}"} 3 1700000000\n'
            'process_open_fds 12\n\nbroken_line\n')
    assert parse_prometheus(text) == {"vllm:gpu_cache_usage_perc": 0.5, "vllm:num_requests_running": 3.0,
                                      "process_open_fds": 12.0}


# ------------------------------------------------------------------------------------------------ faults


def test_remote_down_at_start_up_keeps_the_front_up():
    dead = f"http://127.0.0.1:{free_port()}/v1"
    server = ServedApp("--backend", "openai", "--base-url", dead)
    try:
        status = server.wait_until(("error",), timeout=60)
        assert dead in status["last_error"] and "cannot reach" in status["last_error"]
        assert httpx.get(server.url + "/", timeout=10).status_code == 200  # the UI is still served
    finally:
        server.stop()


def test_wrong_key_is_named(embedded_manager, new_manager):
    remote = ServedApp("--api-key", "right", manager=embedded_manager)
    try:
        remote.wait_until(("ready",))
        manager = new_manager()
        with pytest.raises(PlaygroundError, match="refused the API key"):
            manager.load_remote(remote.url + "/v1", api_key="wrong")
        assert manager.load_remote(remote.url + "/v1", api_key="right")["kind"] == "remote"
    finally:
        remote.stop()


def test_memory_report_shows_remote_metrics():
    from playground.ui.memory_tab import remote_report

    status = {"name": "yuan", "base_url": "http://127.0.0.1:8000/v1"}
    text = remote_report(status, parse_prometheus('vllm:gpu_cache_usage_perc{a="b"} 0.25\n'
                                                  'vllm:num_requests_running 2\nvllm:num_requests_waiting 0\n'))
    assert "KV cache used **25.0%**" in text and "requests running **2**" in text and "requests waiting **0**" in text
    assert "serves no metrics" in remote_report(status, None)
