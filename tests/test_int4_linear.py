"""The embedded model's Q4 layers on the CPU int4 kernel (`playground/models/int4_linear.py`): the 4-bit levels
recovered exactly from the dequantised floats, only 4-bit layers swapped, and, since bf16 activations magnify
last-bit differences, prompts computed in aligned chunks so that a resumed request is bit for bit the cold one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from playground.manager import ModelManager
from playground.model_loading import ALIGNED_PREFILL_TOKENS
from playground.models.int4_linear import Int4Linear, build_int4_linear, four_bit_groups, use_int4_kernels


def q4_1_weight(out_features: int, in_features: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight as a Q4_1 GGUF dequantises it (`d * q + m` per 32 inputs, d and m in fp16), and its q."""
    generator = torch.Generator().manual_seed(seed)
    groups = in_features // 32
    q = torch.randint(0, 16, (out_features, groups, 32), generator=generator)
    q[..., 0], q[..., 1] = 0, 15  # the quantiser maps each group's minimum to 0 and maximum to 15
    d = (torch.rand(out_features, groups, 1, generator=generator) * 0.01 + 1e-4).half().float()
    m = (torch.randn(out_features, groups, 1, generator=generator) * 0.05).half().float()
    return (d * q + m).view(out_features, in_features), q.view(out_features, in_features)


def test_the_levels_of_a_q4_1_weight_come_back_exactly():
    weight, q = q4_1_weight(64, 128)
    found = four_bit_groups(weight)
    assert found is not None
    levels, step, low = found
    assert torch.equal(levels, q.to(torch.int32))
    rebuilt = (step.unsqueeze(-1) * levels.view(64, 4, 32).float() + low.unsqueeze(-1)).view(64, 128)
    torch.testing.assert_close(rebuilt, weight, rtol=0, atol=1e-6)


def test_only_4_bit_bias_free_layers_are_converted():
    weight, _ = q4_1_weight(64, 128)
    four_bit = nn.Linear(128, 64, bias=False)
    four_bit.weight.data = weight
    assert isinstance(build_int4_linear(four_bit), Int4Linear)
    with_bias = nn.Linear(128, 64)
    with_bias.weight.data = weight.clone()
    assert build_int4_linear(with_bias) is None
    assert build_int4_linear(nn.Linear(128, 64, bias=False)) is None  # float weights: not 4-bit levels
    eight_bit = nn.Linear(128, 64, bias=False)
    eight_bit.weight.data = torch.randint(-128, 128, (64, 128)).float() * 0.01
    assert build_int4_linear(eight_bit) is None


def test_a_model_keeps_its_float_layers_and_its_4_bit_ones_compute_the_same():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 64, bias=False), nn.ReLU(), nn.Linear(64, 128, bias=False))
    model[0].weight.data = q4_1_weight(64, 128, seed=1)[0]
    float_layer = model[2]
    inputs = torch.randn(3, 5, 128)
    expected = model(inputs)
    assert use_int4_kernels(model) == 1
    assert isinstance(model[0], Int4Linear) and model[2] is float_layer
    got = model(inputs)
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert ((got - expected).norm() / expected.norm()).item() < 2e-2  # bf16 activations and scales


@pytest.fixture(scope="module")
def int4_managers(embedded_manager):
    """The embedded model as `auto` loads it on CPU, with a prompt cache (the session's manager, what the app builds)
    and without one."""
    cold = ModelManager()
    cold.prompt_cache_bytes = 0
    cold.load()
    yield embedded_manager, cold
    cold.close()


def test_the_embedded_model_runs_its_q4_layers_on_int4_kernels(int4_managers, new_manager):
    status = int4_managers[0].status()
    assert "int4 kernels" in status["dtype"] and status["kind"] == "embedded"
    swapped = [m for m in int4_managers[0].loaded.model.modules() if isinstance(m, Int4Linear)]
    assert len(swapped) == 30 * 7  # every attention and MLP projection of its 30 layers; not the embedding or head
    exact = new_manager()
    assert exact.load(dtype="float32")["dtype"] == "float32"  # --dtype float32: the dequantised float model
    assert not any(isinstance(m, Int4Linear) for m in exact.loaded.model.modules())
    assert exact.status()["memory_mib"] > status["memory_mib"]


def _tokens(result) -> list[tuple[int, float, float, list]]:
    return [(t.id, t.logprob, t.sampled_logprob, t.top) for t in result.tokens]


@pytest.mark.parametrize("params", [{"temperature": 0, "max_new_tokens": 24},
                                    {"temperature": 0.9, "top_p": 0.95, "seed": 7, "max_new_tokens": 24}],
                         ids=["greedy", "seeded"])
def test_a_resumed_prompt_is_bit_for_bit_the_cold_one(int4_managers, params):
    cached, cold = int4_managers
    system = {"role": "system", "content": "You are a patient teacher who answers in full sentences. You explain each "
              "idea with an everyday example, avoid jargon, and end with a one-line summary."}
    ask = [system, {"role": "user", "content": "Why is the sky blue? Explain it to a child."}]
    other = [system, {"role": "user", "content": "Name three animals that live in the sea."}]
    for messages in (ask, ask, other):  # cold, Regenerate, a prompt that shares the beginning
        resumed = cached.generate(messages=messages, params=params, logprobs=3)
        reference = cold.generate(messages=messages, params=params, logprobs=3)
        assert reference.stats.cached_tokens == 0
        assert resumed.stats.cached_tokens % ALIGNED_PREFILL_TOKENS == 0
        assert _tokens(resumed) == _tokens(reference) and resumed.text == reference.text
    assert resumed.stats.cached_tokens > 0  # the last one resumed from the shared system prompt
    ids, logits = cached.next_token_logits(messages=ask)
    cold_ids, cold_logits = cold.next_token_logits(messages=ask)
    assert ids == cold_ids and torch.equal(logits, cold_logits)
