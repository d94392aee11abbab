"""The remote backend against a fake vLLM-shaped engine: slow, overloaded, unreachable, late to start, busy,
without a chat template, and with Prometheus metrics; plus a real remote playground killed mid-stream."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import openai
import pytest
from gradio_client import Client

from fake_engine import FakeEngine
from harness import LaunchedServer, ServedApp, chat_call, chat_reply, free_port, wait_for
from playground.errors import PlaygroundError
from playground.manager import GenerationHandle, ModelManager
from playground.models.yuan.prompt import YuanChatFormat
from playground.remote import BACKOFF_S

pytestmark = pytest.mark.slow

CHAT_DEFAULTS = dict(temperature=0.0, top_p=0.9, top_k=50, min_p=0.0, typical_p=1.0, repetition_penalty=1.0,
                     no_repeat_ngram_size=0, max_new_tokens=12, seed=1, stop="")
FRONT_TIMEOUT_S = 2


@pytest.fixture(scope="module")
def engine():
    with FakeEngine() as fake:
        yield fake


@pytest.fixture(autouse=True)
def calm_engine(request):
    """Each test starts from a well-behaved engine, whatever the previous one set."""
    if "engine" in request.fixturenames:
        fake = request.getfixturevalue("engine")
        fake.first_token_delay_s = fake.token_delay_s = 0.0
        fake.failures.clear()
        fake.serve_metrics = True
    yield


@pytest.fixture(scope="module")
def front(engine, tmp_path_factory):
    server = ServedApp("--backend", "openai", "--base-url", engine.base_url,
                       "--remote-timeout", str(FRONT_TIMEOUT_S), "--remote-concurrency", "2")
    try:
        server.wait_until(("ready",), timeout=90)
        yield server
    finally:
        server.stop()


def chat(front, message: str) -> tuple[str, str]:
    history, status, _ = Client(front.url, verbose=False).predict(**chat_call(message, **CHAT_DEFAULTS),
                                                                   api_name="/chat")
    return chat_reply(history or []), status


def connected(new_manager, engine: FakeEngine, **kwargs) -> ModelManager:
    manager = new_manager()
    manager.load_remote(engine.base_url, **kwargs)
    return manager


# --------------------------------------------------------------------------------------------- slow remote


def test_slow_remote_fails_with_a_clear_message_and_the_front_stays_up(front, engine):
    engine.first_token_delay_s = FRONT_TIMEOUT_S + 8
    started = time.monotonic()
    _, status = chat(front, "Hello?")
    assert f"sent nothing for {FRONT_TIMEOUT_S} s" in status and "--remote-timeout" in status
    # It gave up at the timeout, not at the reply (the margin is a busy machine's, for the client's own round trip).
    assert time.monotonic() - started < FRONT_TIMEOUT_S + 6
    with pytest.raises(openai.APIStatusError) as answer:
        openai.OpenAI(base_url=front.url + "/v1", api_key="x", max_retries=0).chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert answer.value.status_code == 504 and "sent nothing" in answer.value.message
    engine.first_token_delay_s = 0
    status = front.status()
    assert status["state"] == "ready" and status["running"] == 0 and status["queued"] == 0
    assert "sent nothing" in status["remote_last_failure"]["error"]
    reply, _ = chat(front, "Hello again")
    assert reply == "Hello there, friend."
    assert front.status()["remote_last_success_at"] > status["remote_last_failure"]["at"]


def test_a_request_the_remote_refuses_is_a_400_not_a_gateway_error(front, engine):
    engine.failures[:] = [(400, None)]  # e.g. a prompt longer than the engine's context
    with pytest.raises(openai.BadRequestError) as answer:
        openai.OpenAI(base_url=front.url + "/v1", api_key="x", max_retries=0).chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert "the remote engine refused the request" in answer.value.message and "answered 400" in answer.value.message
    engine.failures[:] = [(404, None)]  # not the caller's fault: a gateway error
    answer = httpx.post(front.url + "/", json={"prompt": "Hi", "max_new_tokens": 4}, timeout=30)
    assert answer.status_code == 502 and "answered 404" in answer.json()["error"]["message"]
    assert front.status()["state"] == "ready"


def test_stop_while_the_remote_is_silent_ends_at_once(new_manager, engine):
    manager = connected(new_manager, engine, timeout_s=60)
    engine.first_token_delay_s = 30
    disconnects = engine.disconnects
    result = {}
    handle = GenerationHandle("session-a")
    worker = threading.Thread(target=lambda: result.update(
        done=manager.generate(prompt="Hi", params={"max_new_tokens": 4}, handle=handle)))
    worker.start()
    while not engine.active:
        time.sleep(0.02)
    started = time.monotonic()
    assert manager.cancel("session-a") == 1
    worker.join(5)
    assert not worker.is_alive() and time.monotonic() - started < 3  # not the 30 s the remote stays silent
    assert result["done"].stats.finish_reason == "cancelled"
    deadline = time.monotonic() + 5
    while engine.disconnects == disconnects and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.disconnects == disconnects + 1 and engine.active == 0  # the connection was closed, so the engine dropped it


# ------------------------------------------------------------------------------------- retries and back-off


def test_overloaded_remote_is_retried_with_back_off(new_manager, engine):
    manager = connected(new_manager, engine)
    engine.failures[:] = [(503, "0.3"), (429, None)]
    before = len(engine.requests)
    result = manager.generate(prompt="Hi", params={"max_new_tokens": 8})
    assert result.text == "Hello there, friend." and result.stats.finish_reason == "stop"
    tries = engine.requests[before:]
    assert len(tries) == 3
    assert tries[1]["at"] - tries[0]["at"] >= 0.3  # Retry-After was honoured
    assert tries[2]["at"] - tries[1]["at"] >= BACKOFF_S * 2  # then the back-off doubled
    engine.failures[:] = [(503, None)] * 3
    before = len(engine.requests)
    result = manager.generate(prompt="Hi", params={"max_new_tokens": 8})
    assert result.stats.finish_reason == "error" and "answered 503" in result.stats.error
    assert len(engine.requests) - before == 3  # a few tries, not forever


def test_refused_connections_are_retried_then_reported(new_manager, engine):
    late = FakeEngine(port=free_port()).start()
    manager = connected(new_manager, late)
    late.stop()
    restarted = FakeEngine(port=late.port)
    starter = threading.Timer(0.3, restarted.start)
    starter.start()
    try:
        started = time.monotonic()
        result = manager.generate(prompt="Hi", params={"max_new_tokens": 8})
        assert result.text == "Hello there, friend."  # the second or third try reached it
        assert time.monotonic() - started >= BACKOFF_S
    finally:
        starter.join()
        restarted.stop()
    started = time.monotonic()
    result = manager.generate(prompt="Hi", params={"max_new_tokens": 8})
    elapsed = time.monotonic() - started
    assert result.stats.finish_reason == "error" and result.stats.error_source == "remote"
    assert "cannot reach the remote engine" in result.stats.error and "after 3 tries" in result.stats.error
    assert BACKOFF_S * 3 <= elapsed < 5  # 0.5 s then 1 s of back-off between the three tries


def test_front_keeps_connecting_to_a_remote_that_starts_later(tmp_path):
    port = free_port()
    server = ServedApp("--backend", "openai", "--base-url", f"http://127.0.0.1:{port}/v1")
    late = FakeEngine(port=port)
    try:
        status = server.wait_until(("error",), timeout=90)
        assert "cannot reach" in status["last_error"] and "trying again in" in status["last_error"]
        late.start()
        status = server.wait_until(("ready",), timeout=30)
        assert status["name"] == "fake-model" and status["kind"] == "remote"
    finally:
        server.stop()
        late.stop()


# ------------------------------------------------------------------------------------------ concurrency


def test_the_remote_gets_concurrency_requests_at_once_the_rest_wait_in_order(new_manager, engine):
    manager = connected(new_manager, engine, concurrency=2)
    engine.token_delay_s = 0.15
    before = len(engine.requests)
    engine.max_active = 0
    results, positions = {}, {}

    def ask(name: str) -> None:
        for event in manager.stream(prompt=name, params={"max_new_tokens": 8}, owner=name):
            if event.kind == "queued":
                positions.setdefault(name, event.position)
            if event.kind == "done":
                results[name] = event.text

    names = [f"caller-{i}" for i in range(5)]
    threads = []
    for arrived, name in enumerate(names, start=1):
        threads.append(threading.Thread(target=ask, args=(name,)))
        threads[-1].start()
        # The next caller starts once this one holds its place (running or queued): they arrive in this order.
        wait_for(lambda: manager.status()["running"] + manager.status()["queued"] >= arrived, 10,
                 f"{name} to join the queue", every=0.01)
    for thread in threads:
        thread.join(30)
    assert results == {name: "Hello there, friend." for name in names}
    assert engine.max_active == 2  # the engine batched two of this playground's callers, never more
    assert [r["body"]["prompt"] for r in engine.requests[before:]] == names  # served in arrival order
    assert positions["caller-2"] >= 1 and positions["caller-4"] >= 1
    assert manager.status()["running"] == 0 and manager.status()["queued"] == 0


def test_lab_settings_go_to_the_remote_at_once(front, engine):
    engine.token_delay_s = 0.2
    engine.max_active = 0
    before = len(engine.requests)
    headers = ["temperature", "top_p", "top_k", "min_p", "typical_p", "repetition_penalty", "no_repeat_ngram_size",
               "max_new_tokens", "seed"]
    rows = [[0.0, 0.9, 50, 0, 1, 1, 0, 8, 1], [0.7, 0.9, 50, 0, 1, 1, 0, 8, 2], [1.0, 0.9, 50, 0, 1, 1, 0, 8, 3],
            [0.7, 0.9, 50, 0, 0.5, 1, 0, 8, 4]]  # the last asks for typical_p, which vLLM lacks
    out = Client(front.url, verbose=False).predict("Name a colour.", {"headers": headers, "data": rows},
                                                   api_name="/lab_run")
    texts, notes, status = out[:4], out[6:10], out[14]
    assert status == "Done: 3 of 4 settings"
    assert [text["value"] for text in texts[:3]] == ["Hello there, friend."] * 3
    assert "typical_p is not available on the remote engine (vllm)" in notes[3]["value"]
    assert engine.max_active == 2  # batched up to --remote-concurrency, not one after another
    assert len(engine.requests) - before == 3  # the refused setting never reached the engine


def test_closing_stream_each_on_a_remote_cancels_every_request(new_manager, engine):
    manager = connected(new_manager, engine, concurrency=4)
    engine.token_delay_s = 0.5
    disconnects = engine.disconnects
    events = manager.stream_each([dict(prompt=f"p{i}", params={"max_new_tokens": 8}) for i in range(3)])
    next(item for _, item in events if item.kind == "delta")
    while engine.active < 3:
        time.sleep(0.02)
    events.close()  # a lab run whose page went away
    deadline = time.monotonic() + 5
    while (engine.disconnects < disconnects + 3 or manager.status()["running"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.disconnects == disconnects + 3 and engine.active == 0
    assert manager.status()["running"] == 0 and manager.status()["queued"] == 0


# ------------------------------------------------------------------------------- Yuan on the vLLM fork


@pytest.fixture()
def yuan_engine():
    with FakeEngine(model="Yuan2-M32-hf", owned_by="vllm") as fake:
        fake.chat_template = False  # the release's vLLM fork: "No chat template provided"
        fake.tokens = ["Hi", "<", "n>", "there", "<eod>", "junk"]
        yield fake


def test_yuan_prompt_is_built_here_for_a_vllm_without_chat_template(new_manager, yuan_engine):
    manager = connected(new_manager, yuan_engine)
    assert manager.status()["chat_format"] == "yuan"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello\nworld"}]
    deltas, done = [], None
    for event in manager.stream(messages=messages, params={"top_k": 0, "max_new_tokens": 16}):
        if event.kind == "delta":
            deltas.append(event.text)
        elif event.kind == "done":
            done = event
    assert done.text == "Hi\nthere" and "".join(deltas) == done.text
    assert not any("<" in delta for delta in deltas)  # a half-received <n> is never shown
    sent = yuan_engine.requests[-1]
    assert sent["path"] == "/completions"
    assert sent["body"]["prompt"] == YuanChatFormat().build_prompt(messages) == "Be brief.<n>Hello<n>world<sep>"
    assert "<eod>" in sent["body"]["stop"] and sent["body"]["skip_special_tokens"] is False
    assert sent["body"]["top_k"] == -1  # vLLM's "off"
    manager.generate(messages=messages, params={"max_new_tokens": 4})
    assert yuan_engine.requests[-1]["body"]["top_k"] == 50  # the playground's default is sent, not vLLM's


def test_server_chat_format_against_an_engine_without_template_says_what_to_do(new_manager, yuan_engine):
    manager = connected(new_manager, yuan_engine, chat_format="server")
    result = manager.generate(messages=[{"role": "user", "content": "Hi"}], params={"max_new_tokens": 4})
    assert result.stats.finish_reason == "error"
    assert "No chat template provided" in result.stats.error and "--remote-chat-format" in result.stats.error


def test_unknown_chat_format_is_refused(new_manager, engine):
    with pytest.raises(PlaygroundError, match="unknown remote chat format 'chatml'"):
        new_manager().load_remote(engine.base_url, chat_format="chatml")


def test_declared_extensions_override_the_owner_table(new_manager):
    with FakeEngine(owned_by="sglang") as other:  # an engine the owner table does not know
        manager = connected(new_manager, other)
        assert manager.status()["context_length"] == 4096  # from the engine's model card
        assert manager.unavailable_params() == ["top_k", "min_p", "typical_p", "repetition_penalty",
                                                "no_repeat_ngram_size"]
        manager.generate(prompt="Hi", params={"max_new_tokens": 2})
        assert not {"top_k", "min_p"} & set(other.requests[-1]["body"])  # defaults not sent, nothing invented
        manager = connected(new_manager, other, extensions={"top_k", "typical_p"})  # --remote-extensions top_k,typical_p
        assert manager.unavailable_params() == ["min_p", "repetition_penalty", "no_repeat_ngram_size"]
        manager.generate(prompt="Hi", params={"max_new_tokens": 2, "typical_p": 0.5})
        sent = other.requests[-1]["body"]
        assert sent["typical_p"] == 0.5 and sent["top_k"] == 50 and "min_p" not in sent
        with pytest.raises(PlaygroundError, match=r"min_p is not available on the remote engine \(sglang\)"):
            manager.generate(prompt="Hi", params={"min_p": 0.1})
    with pytest.raises(PlaygroundError, match="unknown sampling extension"):
        new_manager().load_remote(other.base_url, extensions={"top_z"})


def test_vllm_0_4_chat_logprobs_are_read(new_manager, engine):
    manager = connected(new_manager, engine)
    engine.legacy_chat_logprobs = True
    try:
        result = manager.generate(messages=[{"role": "user", "content": "Hi"}], params={"max_new_tokens": 3},
                                  logprobs=2)
    finally:
        engine.legacy_chat_logprobs = False
    assert [t.text for t in result.tokens] == ["Hello", " there", ","]
    assert all(abs(t.logprob - -0.5108) < 1e-3 and len(t.top) == 2 for t in result.tokens)


# ----------------------------------------------------------------------------------- metrics in the panel


def test_remote_metrics_are_plotted_in_the_memory_panel(front, engine):
    engine.token_delay_s = 0.3  # a reply spanning a few samples, so the token counter grows between them
    started = time.monotonic()
    reply, _ = chat(front, "Tell me something")
    assert reply == "Hello there, friend."
    client = Client(front.url, verbose=False)

    # The panel shows the last minutes, earlier tests' traffic to this engine included: look at this test's samples.
    def series(update) -> dict[str, list[float]]:
        assert update["visible"] is True
        window_s = time.monotonic() - started
        columns, values = update["value"]["columns"], {}
        for row in update["value"]["data"]:
            if -row[columns.index("seconds")] <= window_s:  # "seconds" is negative: how long ago
                values.setdefault(row[columns.index("series")], []).append(row[columns.index("value")])
        return values

    def sampled_twice():  # a tick once two samples of the reply's token rate are in (the counter grew between them)
        tick = client.predict(api_name="/memory_tick")
        rates = series(tick[4]).get("generated tokens/s", []) if "KV cache used" in tick[1] else []
        return tick if len(rates) >= 2 else None

    _, report, kv_plot, requests_plot, tokens_plot = wait_for(sampled_twice, 15, "two samples of the engine's figures",
                                                              every=0.3)
    assert "KV cache used **37.5%**" in report and "requests waiting **0**" in report
    assert "this playground's process only" in report

    assert set(series(kv_plot)) == {"KV cache used"} and set(series(kv_plot)["KV cache used"]) == {37.5}
    assert set(series(requests_plot)) == {"requests running", "requests waiting"}
    assert max(series(requests_plot)["requests running"]) <= 2
    rates = series(tokens_plot)["generated tokens/s"]
    assert max(rates) > 0 and len(rates) >= 2  # the counter grew while the reply streamed
    engine.serve_metrics = False
    wait_for(lambda: "The remote engine serves no metrics" in client.predict(api_name="/memory_tick")[1], 10,
             "a memory sample taken after the engine stopped serving metrics", every=0.3)


# ----------------------------------------------------------------------------- a real remote, killed


def test_remote_killed_mid_stream_through_a_launched_front(tmp_path):
    remote = LaunchedServer(log_dir=tmp_path)
    try:
        remote.wait_until(("ready",))
        front = ServedApp("--backend", "openai", "--base-url", remote.url + "/v1")
        try:
            front.wait_until(("ready",), timeout=90)
            client = openai.OpenAI(base_url=front.url + "/v1", api_key="x", max_retries=0)
            stream = client.chat.completions.create(
                model=front.status()["name"], messages=[{"role": "user", "content": "Tell me a long story."}],
                max_tokens=2000, temperature=1.0, seed=1, stream=True)
            received = ""
            with pytest.raises(openai.APIError, match="went away mid-reply"):
                for chunk in stream:
                    received += (chunk.choices[0].delta.content or "") if chunk.choices else ""
                    if len(received) > 20 and remote.process.poll() is None:
                        os.killpg(remote.process.pid, signal.SIGKILL)  # the remote dies mid-reply
            assert received
            status = front.status()  # the front is still up, with nothing stuck in its queue
            assert status["state"] == "ready" and status["running"] == 0 and status["queued"] == 0
            assert "went away mid-reply" in status["remote_last_failure"]["error"]  # /healthz tells operators
            reply, chat_status = chat(front, "Are you there?")
            assert "cannot reach the remote engine" in chat_status and "after 3 tries" in chat_status
            panel = Client(front.url, verbose=False)
            wait_for(lambda: "The remote engine cannot be reached now" in panel.predict(api_name="/memory_tick")[1],
                     10, "a memory sample taken after the kill", every=0.3)
            assert httpx.get(front.url + "/", timeout=10).status_code == 200
        finally:
            front.stop()
    finally:
        remote.stop()


# ------------------------------------------------------------------------------------------- the options


def test_remote_options_and_their_environment_variables(monkeypatch, capsys):
    from playground.config import parse_args

    for name in ("PLAYGROUND_BACKEND", "PLAYGROUND_BASE_URL", "PLAYGROUND_REMOTE_TIMEOUT",
                 "PLAYGROUND_REMOTE_CONCURRENCY", "PLAYGROUND_REMOTE_CHAT_FORMAT", "PLAYGROUND_REMOTE_EXTENSIONS"):
        monkeypatch.delenv(name, raising=False)
    defaults = parse_args([])
    assert (defaults.remote_timeout, defaults.remote_concurrency, defaults.remote_chat_format) == (120.0, 16, "auto")
    monkeypatch.setenv("PLAYGROUND_BACKEND", "openai")
    monkeypatch.setenv("PLAYGROUND_BASE_URL", "http://gpu-host:8000/v1")
    monkeypatch.setenv("PLAYGROUND_REMOTE_TIMEOUT", "30")
    monkeypatch.setenv("PLAYGROUND_REMOTE_CONCURRENCY", "64")
    monkeypatch.setenv("PLAYGROUND_REMOTE_CHAT_FORMAT", "yuan")
    settings = parse_args([])
    assert (settings.backend, settings.base_url, settings.remote_timeout, settings.remote_concurrency,
            settings.remote_chat_format) == ("openai", "http://gpu-host:8000/v1", 30.0, 64, "yuan")
    assert parse_args(["--remote-concurrency", "4"]).remote_concurrency == 4  # options win over the environment
    assert defaults.remote_extensions is None  # known from the engine's owned_by
    assert parse_args(["--remote-extensions", "top_k, min_p"]).remote_extensions == {"top_k", "min_p"}
    monkeypatch.setenv("PLAYGROUND_REMOTE_EXTENSIONS", "none")
    assert parse_args([]).remote_extensions == set()
    for bad, words in ((["--remote-timeout", "0"], "must be greater than 0"),
                       (["--remote-concurrency", "many"], "'many' is not a number"),
                       (["--remote-chat-format", "chatml"], "invalid choice"),
                       (["--remote-extensions", "top_k,top_z"], "unknown field(s) top_z")):
        with pytest.raises(SystemExit):
            parse_args(bad)
        assert words in capsys.readouterr().err


def test_inspector_uses_the_remote_logprobs_and_routing_says_why_it_is_off(front):
    client = Client(front.url, verbose=False)
    client.predict(**chat_call("Hi there", **CHAT_DEFAULTS), api_name="/chat")
    heading, view, tokens, alternatives, heatmap, load, routing_note = client.predict(
        "Chat reply", 0, api_name="/insight_inspect")
    columns, rows = tokens["headers"], tokens["data"]
    assert heading.startswith("**Chat reply 1**: 5 tokens")
    shown = [row[columns.index("token")].replace("␣", " ") for row in rows]  # spaces are drawn visible
    assert shown == ["Hello", " there", ",", " friend", "."]
    assert all(abs(row[columns.index("model p")] - 0.6) < 1e-6 for row in rows)  # the engine's own logprobs
    first = {header: [row[i] for row in alternatives["data"]] for i, header in enumerate(alternatives["headers"])}
    assert first["model token"] == ["Hello", "HELLO!"] and first["model p"] == pytest.approx([0.6, 0.3])
    assert first["model chosen"] == [True, False]  # matched by text: the engine sends no token ids
    assert "runs on a remote engine" in routing_note and front.status()["base_url"] in routing_note and heatmap == ""
