"""Yuan's cache can be cut and resumed anywhere: the LFA memory at a cut is what a cold run has there.

Model-level checks on the random float64 model (so "equal" means equal to rounding noise, 1e-9), then the prompt
cache's blocks on Yuan caches: sharing, partial blocks, eviction within the budget.
"""

from __future__ import annotations

import pytest
import torch

from playground.generation.prompt_cache import BLOCK_TOKENS, PromptCache
from playground.models.yuan.cache_yuan import YuanCache

SEQUENCE = [11, 402, 7, 3999, 56, 56, 1024, 3, 870, 41, 2, 600, 95, 1800, 77, 4000, 12, 13, 14, 15, 301, 302, 9,
            8, 7, 6, 5, 4, 3, 2, 1, 1000, 2000, 3000, 33, 44]


def _cold_logits(model, ids):
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("cut", [0, 1, 2, 3, 17, 30])
def test_crop_then_resume_equals_cold(double_model, cut):
    """Computed to 30 tokens, cut back to `cut` (inside the LFA window too), resumed to the end."""
    cold = _cold_logits(double_model, SEQUENCE)
    cache = YuanCache(double_model.config)
    with torch.inference_mode():
        double_model(torch.tensor([SEQUENCE[:30]]), cache=cache, use_cache=True)
        cache.crop(cut - 30)
        assert cache.get_seq_length() == cut
        assert all(layer.lf_inputs.shape[1] == cut for layer in cache.layers)
        resumed = double_model(torch.tensor([SEQUENCE[cut:]]), cache=cache, use_cache=True).logits[0]
    torch.testing.assert_close(resumed, cold[cut:], rtol=1e-9, atol=1e-9)


def test_step_by_step_cache_holds_every_filter_input(double_model):
    """Prefill then one token at a time: the filter inputs recorded at each position equal a one-pass prefill's."""
    one_pass, stepped = YuanCache(double_model.config), YuanCache(double_model.config)
    with torch.inference_mode():
        double_model(torch.tensor([SEQUENCE[:12]]), cache=one_pass, use_cache=True)
        double_model(torch.tensor([SEQUENCE[:5]]), cache=stepped, use_cache=True)
        for token in SEQUENCE[5:12]:
            double_model(torch.tensor([[token]]), cache=stepped, use_cache=True)
    for a, b in zip(one_pass.layers, stepped.layers):
        assert a.lf_inputs.shape == b.lf_inputs.shape == (1, 12, double_model.config.hidden_size)
        torch.testing.assert_close(a.lf_inputs, b.lf_inputs, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(a.keys, b.keys, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("reused", [1, 2, 16, 20, 35])
def test_prompt_cache_resume_equals_cold(double_model, reused):
    """A sequence stored in the prompt cache, looked up by a prompt sharing its first `reused` tokens."""
    stored = SEQUENCE[:30]
    prompt = SEQUENCE[:reused] + [4095, 4094] if reused < 30 else SEQUENCE
    cache = YuanCache(double_model.config)
    with torch.inference_mode():
        double_model(torch.tensor([stored]), cache=cache, use_cache=True)
    prompt_cache = PromptCache(budget_bytes=2**30)
    prompt_cache.store(stored, cache)
    reuse = prompt_cache.lookup(double_model, prompt)
    assert reuse.tokens == min(reused, 30, len(prompt) - 1)
    with torch.inference_mode():
        resumed = double_model(torch.tensor([prompt[reuse.tokens:]]), cache=reuse.cache, use_cache=True).logits[0]
    torch.testing.assert_close(resumed, _cold_logits(double_model, prompt)[reuse.tokens:], rtol=1e-9, atol=1e-9)


def _stored_cache(model, ids):
    cache = YuanCache(model.config)
    with torch.inference_mode():
        model(torch.tensor([ids]), cache=cache, use_cache=True)
    return cache


def test_blocks_are_shared_and_lookups_copy(double_model):
    prompt_cache = PromptCache(budget_bytes=2**30)
    first, second = SEQUENCE[:34], SEQUENCE[:20] + [4000 + i for i in range(14)]
    prompt_cache.store(first, _stored_cache(double_model, first))
    one = prompt_cache.stats()["bytes"]
    prompt_cache.store(second, _stored_cache(double_model, second))
    stats = prompt_cache.stats()
    # The first 16 tokens (one full block) are held once; the second sequence adds 34 - 16 tokens.
    assert stats["tokens"] == 34 + 34 - BLOCK_TOKENS
    assert stats["bytes"] == pytest.approx(one * (34 + 34 - BLOCK_TOKENS) / 34, rel=0.01)
    reuse = prompt_cache.lookup(double_model, second + [1])
    assert reuse.tokens == 34
    reuse.cache.layers[0].keys.zero_()  # a copy: the stored blocks do not change
    again = prompt_cache.lookup(double_model, second + [1])
    assert again.cache.layers[0].keys.abs().sum() > 0


def test_a_lookup_in_steps_resumes_at_the_last_whole_step(double_model):
    """A model that computes prompts in aligned chunks resumes only at a multiple of its chunk."""
    prompt_cache = PromptCache(budget_bytes=2**30)
    prompt_cache.store(SEQUENCE, _stored_cache(double_model, SEQUENCE))  # 36 tokens
    assert prompt_cache.lookup(double_model, SEQUENCE + [1], step=1).tokens == 36
    assert prompt_cache.lookup(double_model, SEQUENCE + [1], step=16).tokens == 32
    assert prompt_cache.lookup(double_model, SEQUENCE, step=7).tokens == 35 - 35 % 7  # never the last token
    reuse = prompt_cache.lookup(double_model, SEQUENCE[:30] + [9] * 6, step=12)
    assert reuse.tokens == 24 and reuse.cache.get_seq_length() == 24  # a block used in part, at the step
    assert prompt_cache.lookup(double_model, SEQUENCE, step=64).tokens == 0


def test_a_partial_block_gives_way_to_the_sequence_that_extends_it(double_model):
    prompt_cache = PromptCache(budget_bytes=2**30)
    prompt_cache.store(SEQUENCE[:20], _stored_cache(double_model, SEQUENCE[:20]))  # a full block and 4 tokens
    prompt_cache.store(SEQUENCE[:30], _stored_cache(double_model, SEQUENCE[:30]))
    stats = prompt_cache.stats()
    assert (stats["blocks"], stats["tokens"]) == (2, 30)


def test_eviction_keeps_the_budget_and_takes_leaves_first(double_model):
    sequences = [[i * 100 + j for j in range(40)] for i in range(1, 6)]
    per_sequence = PromptCache(budget_bytes=2**30)
    per_sequence.store(sequences[0], _stored_cache(double_model, sequences[0]))
    budget = int(per_sequence.stats()["bytes"] * 2.5)
    prompt_cache = PromptCache(budget_bytes=budget)
    for ids in sequences:
        prompt_cache.store(ids, _stored_cache(double_model, ids))
        assert prompt_cache.stats()["bytes"] <= budget
    assert prompt_cache.lookup(double_model, sequences[-1]).tokens == 39  # the newest is whole
    assert prompt_cache.lookup(double_model, sequences[0]).tokens == 0  # the oldest went first
    # Eviction took whole tails, never a block whose descendants stayed (each kept block is reachable).
    stats = prompt_cache.stats()
    reachable = sum(prompt_cache.lookup(double_model, ids + [1]).tokens for ids in sequences)
    assert reachable == stats["tokens"]


def test_store_checks_its_arguments_and_a_zero_budget_keeps_nothing(double_model):
    cache = _stored_cache(double_model, SEQUENCE[:10])
    with pytest.raises(ValueError, match="holds 10 positions"):
        PromptCache(budget_bytes=2**30).store(SEQUENCE[:9], cache)
    off = PromptCache(budget_bytes=0)
    off.store(SEQUENCE[:10], cache)
    assert off.stats()["bytes"] == 0 and off.lookup(double_model, SEQUENCE).tokens == 0
