"""The prompt cache through the manager: a resumed request gives the tokens and logprobs of a cold one.

Each request runs twice, on a manager whose prompt cache holds what earlier requests computed and on one without a
prompt cache. "The same" is tested tightly: a resumed request computes its last tokens in a separate pass, which moves
logprobs by rounding noise (float32 GEMMs of other shapes sum in another order: about 1e-6 on an Intel Xeon, up to
1.4e-5 on an AMD EPYC, whose kernels block differently). Yuan runs in float64 throughout (1e-9); SmolLM2 in float32
(1e-4, far below what a wrong position or a stale cache entry moves): transformers' Llama norms its
activations in float32 whatever the weights, so float64 would not make its figures tighter, only its steps several
times slower.
Cuts: Regenerate (the whole prompt but its last token), a chat's next turn (inside the earlier turn for Yuan, whose
format rewrites the turn's end; after the reply for SmolLM2's template) and a raw prompt that continues the earlier
reply (at the end of the cached sequence). Greedy and seeded sampling, with expert routing for Yuan.
"""

from __future__ import annotations

import pytest
import torch

from playground.manager import ModelManager
from playground.models.yuan.make_tiny import make_tiny_checkpoint
from tests.conftest import YUAN_TOKENIZER_DIR

GREEDY = {"temperature": 0, "max_new_tokens": 12}
TOLERANCE = {"yuan": 1e-9, "smollm2": 1e-4}
SEEDED = {"temperature": 0.9, "top_p": 0.95, "seed": 7, "max_new_tokens": 12}


def _managers(model, dtype, float64: bool):
    cached, cold = ModelManager(), ModelManager()
    cold.prompt_cache_bytes = 0
    for manager in (cached, cold):
        manager.load(model, dtype=dtype)
        if float64:
            manager.loaded.model.double()
    return cached, cold


@pytest.fixture(scope="module")
def yuan_managers(tmp_path_factory):
    folder = make_tiny_checkpoint(tmp_path_factory.mktemp("yuan") / "yuan-float", tokenizer_dir=YUAN_TOKENIZER_DIR,
                                  seed=4, vocab_size=135040, hidden_size=128, num_hidden_layers=2,
                                  num_attention_heads=2, attention_projection_size=256, num_experts=8,
                                  ffn_hidden_size=128)
    managers = _managers(folder, "float32", float64=True)
    yield managers
    for manager in managers:
        manager.close()


@pytest.fixture(scope="module")
def smollm2_managers():
    managers = _managers(None, "float32", float64=False)
    yield managers
    for manager in managers:
        manager.close()


def _same(resumed, cold, tolerance):
    assert [t.id for t in resumed.tokens] == [t.id for t in cold.tokens]
    assert resumed.text == cold.text
    for got, expected in zip(resumed.tokens, cold.tokens):
        assert got.logprob == pytest.approx(expected.logprob, abs=tolerance)
        assert got.sampled_logprob == pytest.approx(expected.sampled_logprob, abs=tolerance)
        assert [i for i, _, _ in got.top] == [i for i, _, _ in expected.top]


def _both(managers, tolerance, **request):
    cached, cold = managers
    resumed = cached.generate(logprobs=3, **request)
    reference = cold.generate(logprobs=3, **request)
    assert reference.stats.finish_reason != "error" and resumed.stats.finish_reason != "error"
    _same(resumed, reference, tolerance)
    assert reference.stats.cached_tokens == 0
    return resumed


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
@pytest.mark.parametrize("model", ["yuan", "smollm2"])
def test_resumed_requests_equal_cold_ones(request, model, params):
    managers = request.getfixturevalue(f"{model}_managers")
    cached, tolerance = managers[0], TOLERANCE[model]
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": f"Name three colours of the rainbow, in order. ({params['temperature']})"}]
    first = _both(managers, tolerance, messages=messages, params=params)
    prompt_tokens = first.stats.prompt_tokens
    assert first.stats.cached_tokens < prompt_tokens - 1  # new words: at most a shared beginning was cached

    again = _both(managers, tolerance, messages=messages, params=params)  # Regenerate
    assert again.stats.cached_tokens == prompt_tokens - 1

    turn_two = messages + [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And two more?"}]
    second = _both(managers, tolerance, messages=turn_two, params=params)
    assert 0 < second.stats.cached_tokens < second.stats.prompt_tokens - 1

    prompt = cached.build_prompt(turn_two)
    continued = _both(managers, tolerance, prompt=prompt + second.text, params=params)  # the cut is where the reply ended
    assert continued.stats.cached_tokens >= second.stats.prompt_tokens


def test_resumed_yuan_routing_equals_cold(yuan_managers):
    cached, cold = yuan_managers
    messages = [{"role": "user", "content": "Which experts does this sentence visit, token by token?"}]
    cached.generate(messages=messages, params=GREEDY)
    results = [manager.stream(messages=messages, params=GREEDY, capture_routing=True) for manager in (cached, cold)]
    (resumed, resumed_stats), (reference, _) = [
        next((e.routing, e.stats) for e in events if e.kind == "done") for events in results]
    assert resumed_stats.cached_tokens > 0
    assert resumed.token_ids == reference.token_ids and resumed.prompt_tokens == reference.prompt_tokens
    assert torch.equal(resumed.experts, reference.experts)
    torch.testing.assert_close(resumed.weights, reference.weights, rtol=1e-9, atol=1e-9)


def test_explorer_uses_and_fills_the_prompt_cache(smollm2_managers):
    cached, cold = smollm2_managers
    messages = [{"role": "user", "content": "A prompt the explorer sees first."}]
    ids, logits = cached.next_token_logits(messages=messages)
    cold_ids, cold_logits = cold.next_token_logits(messages=messages)
    assert ids == cold_ids
    torch.testing.assert_close(logits, cold_logits, rtol=1e-6, atol=1e-6)  # float64 figures, handed out as float32
    reply = cached.generate(messages=messages, params=GREEDY)
    assert reply.stats.cached_tokens == len(ids) - 1
    assert cached.status()["prompt_cache"]["tokens"] >= len(ids)


def test_a_prompt_computed_in_chunks_equals_one_pass(yuan_managers):
    """Long prompts are computed `prefill_chunk_tokens` at a time (bounded memory), from the cache's end on."""
    cached, cold = yuan_managers
    messages = [{"role": "user", "content": "Several chunks of five tokens each, or a few more, make this prompt."}]
    assert cached.loaded.prefill_chunk_tokens >= 256  # Yuan's default: whole ordinary prompts in one pass
    cached.loaded.prefill_chunk_tokens = 5
    try:
        cached.set_prompt_cache_budget(0)
        chunked = cached.generate(messages=messages, params=GREEDY, logprobs=3)
        cached.set_prompt_cache_budget(None)
        cached.generate(messages=[{"role": "user", "content": "Several chunks"}], params=GREEDY)
        resumed_in_chunks = cached.generate(messages=messages, params=GREEDY, logprobs=3)
    finally:
        cached.loaded.prefill_chunk_tokens = cold.loaded.prefill_chunk_tokens
    reference = cold.generate(messages=messages, params=GREEDY, logprobs=3)
    assert chunked.stats.prompt_tokens > 3 * 5 and chunked.stats.cached_tokens == 0
    _same(chunked, reference, TOLERANCE["yuan"])
    assert 0 < resumed_in_chunks.stats.cached_tokens < resumed_in_chunks.stats.prompt_tokens - 2 * 5
    _same(resumed_in_chunks, reference, TOLERANCE["yuan"])


def test_a_stopped_reply_leaves_its_prompt_cached(smollm2_managers):
    cached, _ = smollm2_managers
    messages = [{"role": "user", "content": "Write a long story about a lighthouse keeper and the sea."}]
    events = cached.stream(messages=messages, params={"temperature": 0, "max_new_tokens": 200})
    deltas = 0
    for event in events:
        deltas += event.kind == "delta"
        if deltas == 3:
            events.close()  # the client went away: the reply is cancelled
            break
    again = cached.generate(messages=messages, params={"temperature": 0, "max_new_tokens": 4})
    assert again.stats.finish_reason == "length"
    assert again.stats.cached_tokens == again.stats.prompt_tokens - 1
