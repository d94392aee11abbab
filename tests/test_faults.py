"""Faults the playground survives: broken model folders at start and at reload, running out of memory mid-reply,
a stop with others waiting, and two loads at once."""

from __future__ import annotations

import shutil
import threading
import time

import httpx
import pytest
import torch
from gradio_client import Client

import playground.generation.scheduling as scheduling
from harness import ServedApp, chat_call
from playground.errors import LoadInProgressError

GREEDY = {"temperature": 0, "max_new_tokens": 12}


# ------------------------------------------------------------------------------ out of memory mid-reply


def test_out_of_memory_in_generation_is_reported_and_the_next_request_works(new_manager, tiny_folder, monkeypatch):
    manager = new_manager()
    manager.load(tiny_folder)
    model = manager.loaded.model
    real_forward = model.forward
    calls = {"forward": 0, "freed": 0}

    def forward_that_runs_out(*args, **kwargs):
        calls["forward"] += 1
        if calls["forward"] == 3:  # two tokens in, as a long prompt or reply would on a full GPU
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_forward(*args, **kwargs)

    real_free = scheduling.free_device_memory

    def counting_free():
        calls["freed"] += 1
        real_free()

    monkeypatch.setattr(model, "forward", forward_that_runs_out)
    monkeypatch.setattr(scheduling, "free_device_memory", counting_free)
    failed = manager.generate(prompt="Hello there", params=GREEDY)
    assert failed.stats.finish_reason == "error"
    assert "out of memory" in failed.stats.error and "caches were freed" in failed.stats.error
    assert failed.stats.new_tokens == 2  # what came before the failure is kept, nothing after
    assert calls["freed"] >= 1
    status = manager.status()
    assert status["state"] == "ready" and status["running"] == status["queued"] == 0

    monkeypatch.setattr(model, "forward", real_forward)
    after = manager.generate(prompt="Hello there", params=GREEDY)
    assert after.stats.finish_reason in ("stop", "length") and after.stats.new_tokens > 0


# --------------------------------------------------------------------------- stop with others waiting


def test_stop_frees_the_queue_for_the_next_caller(new_manager, tiny_folder, monkeypatch):
    manager = new_manager()
    manager.load(tiny_folder)
    model = manager.loaded.model
    real_forward = model.forward
    passes = []  # each makes one token: the stop is measured against the passes made, as the reader may trail them

    def paced_forward(*args, **kwargs):  # a real model's pace
        passes.append(1)
        time.sleep(0.02)
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", paced_forward)
    long = {"temperature": 0, "max_new_tokens": 400}
    first_events = []
    first_stream = manager.stream(prompt="Once upon a time", params=long, owner="first")
    first_events.append(next(first_stream))  # the first caller is generating
    while first_events[-1].kind != "delta":
        first_events.append(next(first_stream))
    second: list = []
    waiter = threading.Thread(target=lambda: second.append(
        manager.generate(prompt="Hello", params=GREEDY, owner="second")))
    waiter.start()
    deadline = time.monotonic() + 10
    while manager.status()["queued"] != 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert manager.cancel("first") == 1
    cancelled_at = len(passes)
    rest = list(first_stream)
    done = rest[-1]
    assert done.kind == "done" and done.stats.finish_reason == "cancelled"
    assert done.stats.new_tokens <= cancelled_at + 1 < long["max_new_tokens"]  # stopped within one token
    waiter.join(30)
    assert second and second[0].stats.finish_reason in ("stop", "length")
    assert manager.status()["running"] == manager.status()["queued"] == 0


# ------------------------------------------------------------------------------------ two loads at once


def test_two_loads_at_once_one_wins_and_nothing_is_half_loaded(new_manager, tiny_folder, monkeypatch):
    manager = new_manager()
    manager.load(tiny_folder)
    previous = manager.loaded
    release = threading.Event()
    real_build = manager._build

    def slow_build(*args, **kwargs):
        release.wait(30)  # hold the first load mid-way
        return real_build(*args, **kwargs)

    monkeypatch.setattr(manager, "_build", slow_build)
    outcome: list = []
    first = threading.Thread(target=lambda: outcome.append(manager.load(tiny_folder)))
    first.start()
    deadline = time.monotonic() + 10
    while manager.status()["state"] != "loading":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with pytest.raises(LoadInProgressError, match="another model is loading"):
        manager.load(tiny_folder)
    # While the winner loads, the previous model is whole and still answers.
    assert manager.loaded is previous
    assert manager.generate(prompt="Hi", params=GREEDY).stats.new_tokens > 0
    release.set()
    first.join(60)
    assert outcome and outcome[0]["state"] == "ready"
    assert manager.loaded is not previous and manager.loaded.model is not None
    assert manager.status()["last_error"] is None
    assert manager.generate(prompt="Hi", params=GREEDY).stats.new_tokens > 0


# ------------------------------------------------------- broken model folders, at start and at reload


def write_broken_folders(root, tiny):
    """corrupt: unreadable config and weights; partial: a real model with its weights cut in half."""
    corrupt = root / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text("{not json")
    (corrupt / "model.safetensors").write_bytes(b"\x00garbage" * 64)
    partial = root / "partial"
    shutil.copytree(tiny, partial)
    weights = partial / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


@pytest.fixture(scope="module")
def broken_start(tmp_path_factory, tiny_folder):
    root = tmp_path_factory.mktemp("models-root")
    write_broken_folders(root, tiny_folder)
    server = ServedApp("--model", str(root / "corrupt"), "--models-root", str(root))
    try:
        server.wait_until(("error",))
        yield server
    finally:
        server.stop()


def test_a_corrupt_model_at_start_leaves_the_ui_and_status_up(broken_start):
    status = broken_start.status()
    assert status["state"] == "error" and "corrupt" in status["last_error"]
    page = httpx.get(broken_start.url, timeout=30)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    client = Client(broken_start.url, verbose=False)
    assert "No model loaded" in client.predict(api_name="/status") and "corrupt" in client.predict(api_name="/status")
    chat = client.predict(**chat_call("Hello", max_new_tokens=8), api_name="/chat")
    assert "corrupt" in chat[1]  # the chat says why there is no reply


def test_reloading_broken_folders_reports_them_and_keeps_the_model(broken_start):
    client = Client(broken_start.url, verbose=False)
    assert "there is no 'gone'" in client.predict("gone", api_name="/model_load")
    partial = client.predict("partial", api_name="/model_load")
    assert partial.startswith("⚠️") and "partial" in partial
    assert broken_start.status()["state"] == "error"
    loaded = client.predict("embedded", api_name="/model_load")
    assert loaded.startswith("✅ Loaded") and "SmolLM2" in loaded
    corrupt = client.predict("corrupt", api_name="/model_load")
    assert corrupt.startswith("⚠️") and "corrupt" in corrupt
    status = broken_start.status()
    assert status["state"] == "ready" and status["name"] == "SmolLM2-135M-Instruct"  # the good model stayed
    assert "corrupt" in status["last_error"]
    chat = client.predict(**chat_call("Say hi", max_new_tokens=6), api_name="/chat")
    assert chat[1].startswith("Done:")
