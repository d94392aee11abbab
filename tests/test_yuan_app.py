"""Yuan2-M32 through the playground: the manager and `python launch.py --model DIR` on a tiny INT4 folder."""

from __future__ import annotations

import pytest
from gradio_client import Client

from harness import ServedApp, chat_call, chat_reply, chat_reply_stats, count_tokens
from playground.errors import ModelFolderError
from playground.models.yuan.make_tiny import make_tiny_checkpoint
from tests.conftest import YUAN_TOKENIZER_DIR

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_int4(tmp_path_factory):
    """A random INT4 Yuan folder in the release layout (byte-split parts, quantize_config, real tokenizer)."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("yuan") / "Yuan2-M32-tiny-int4", int4=True,
                                tokenizer_dir=YUAN_TOKENIZER_DIR, hidden_size=128, attention_projection_size=256,
                                num_attention_heads=2)


def test_manager_serves_yuan_in_its_prompt_format(new_manager, tiny_int4):
    manager = new_manager()
    status = manager.load(tiny_int4)
    assert status["kind"] == "yuan-int4" and status["chat_format"] == "yuan" and status["has_experts"]
    assert sorted(p.name for p in tiny_int4.glob("*.safetensors*"))[-1].endswith("safetensors02")
    messages = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "Hi!\nHow are you?"},
                {"role": "user", "content": "Tell me more"}]
    prompt = manager.build_prompt(messages)
    assert prompt == "你好<n>Hi!<n>How are you?<n>Tell me more<sep>"
    result = manager.generate(messages=messages, params={"temperature": 0, "max_new_tokens": 12}, logprobs=1)
    assert result.stats.prompt_tokens == count_tokens(manager, prompt)
    assert result.stats.new_tokens == len(result.tokens) <= 12
    assert "<sep>" not in result.text and "<eod>" not in result.text and "<n>" not in result.text
    again = manager.generate(messages=messages, params={"temperature": 0, "max_new_tokens": 12})
    assert again.text == result.text


def test_broken_yuan_folder_names_the_file(new_manager, tiny_int4, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in tiny_int4.iterdir():
        data = path.read_bytes()
        # a half-downloaded last part
        (broken / path.name).write_bytes(data[: len(data) // 2] if path.name.endswith("safetensors02") else data)
    manager = new_manager()
    with pytest.raises(ModelFolderError, match="safetensors02"):
        manager.load(broken)
    (broken / "tokenizer.model").unlink()
    with pytest.raises(ModelFolderError, match="tokenizer.model"):
        manager.load(broken)
    assert manager.status()["state"] == "error"


def test_launch_serves_tiny_int4_yuan_in_the_chat_tab(tiny_int4, tmp_path):
    server = ServedApp("--model", str(tiny_int4))
    try:
        status = server.wait_until(("ready", "error"), timeout=180)
        assert status["state"] == "ready", status
        assert status["kind"] == "yuan-int4" and status["name"] == tiny_int4.name
        client = Client(server.url, verbose=False)
        job = client.submit(**chat_call("你好", max_new_tokens=16), api_name="/chat")
        updates = list(job)
        chat, note, _ = job.outputs()[-1]
        assert len(updates) >= 2 and [m["role"] for m in chat] == ["user", "assistant", "assistant"]
        assert note.startswith("Done:") and ("16 tokens" in note or " stop" in note)
        assert "<sep>" not in chat_reply(chat) and chat_reply_stats(chat) in note  # the stats line, after the reply
    finally:
        server.stop()


def test_launch_with_corrupt_yuan_folder_stays_up_with_the_error(tiny_int4, tmp_path):
    broken = tmp_path / "corrupt"
    broken.mkdir()
    for path in tiny_int4.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    (broken / "gptq_model-4bit-128g.safetensors00").write_bytes(b"\xff" * 64)  # header no longer parses
    server = ServedApp("--model", str(broken))
    try:
        status = server.wait_until(("error",), timeout=120)
        assert "safetensors" in status["last_error"]
        client = Client(server.url, verbose=False)
        assert "No model loaded" in client.predict(api_name="/status")
        chat, note, box = client.predict(**chat_call("Hello", max_new_tokens=8), api_name="/chat")
        assert "safetensors" in note and chat == [] and box == "Hello"
    finally:
        server.stop()


def test_routing_capture_and_next_token_logits(new_manager, tiny_int4):
    manager = new_manager()
    manager.load(tiny_int4)
    messages = [{"role": "user", "content": "你好"}]
    done = [e for e in manager.stream(messages=messages, params={"temperature": 0, "max_new_tokens": 6},
                                      capture_routing=True, logprobs=0) if e.kind == "done"][0]
    routing, new = done.routing, done.stats.new_tokens
    layers = manager.loaded.model.config.num_hidden_layers
    assert routing.experts.shape == routing.weights.shape == (layers, done.stats.prompt_tokens + new - 1, 2)
    assert routing.prompt_tokens == done.stats.prompt_tokens and len(routing.token_ids) == routing.experts.shape[1]
    assert bool((routing.experts < routing.num_experts).all()) and bool((routing.experts[..., 0] != routing.experts[..., 1]).all())
    assert abs(float(routing.weights.sum(-1).min()) - 1) < 1e-5

    prompt_ids, logits = manager.next_token_logits(messages=messages)
    assert prompt_ids == routing.token_ids[: routing.prompt_tokens]
    first = manager.generate(messages=messages, params={"temperature": 0, "max_new_tokens": 1}, logprobs=0).tokens[0]
    assert first.id == int(logits.argmax())
    assert abs(float(logits.log_softmax(-1)[first.id]) - first.logprob) < 1e-4
