"""Modeling: LFA, Q/K layout, rotary table, router, caching, padding, short prompts, routing records."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from playground.models.yuan.configuration_yuan import YuanConfig
from playground.models.yuan.make_tiny import random_float_model
from playground.models.yuan.cache_yuan import YuanCache
from playground.models.yuan.modeling_yuan import (
    YuanAttention,
    YuanLocalizedFiltering,
    YuanMoE,
    YuanRMSNorm,
    YuanRotaryEmbedding,
    _build_batch_masks,
)


def _randomise(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            scale = 1.0 / math.sqrt(math.prod(param.shape[1:])) if param.ndim > 1 else 0.3
            param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * scale)
            if name.endswith("norm.weight"):
                param.add_(1.0)
    return module


def _lfa_by_formula(lfa: YuanLocalizedFiltering, x: torch.Tensor) -> torch.Tensor:
    """The filter written out: o1[t] = A0 x[t-1] + A1 x[t] + b1, o2[t] = B0 o1[t-1] + B1 o1[t] + b2, zeros before t=0."""
    a0, a1 = lfa.conv1.weight[:, :, 0, 0], lfa.conv1.weight[:, :, 1, 0]
    b0, b1 = lfa.conv2.weight[:, :, 0, 0], lfa.conv2.weight[:, :, 1, 0]
    previous_x = F.pad(x, (0, 0, 1, 0))[:, :-1]
    o1 = previous_x @ a0.T + x @ a1.T + lfa.conv1.bias
    previous_o1 = F.pad(o1, (0, 0, 1, 0))[:, :-1]
    o2 = previous_o1 @ b0.T + o1 @ b1.T + lfa.conv2.bias
    return lfa.output_layernorm(o2 + x)


def _valid(batch: int, past: int, length: int) -> torch.Tensor:
    return _build_batch_masks(None, batch, past, length, "cpu").window_valid


def test_lfa_matches_formula_with_zero_not_bias_before_first_token(small_config):
    lfa = _randomise(YuanLocalizedFiltering(small_config).double(), seed=0)
    assert lfa.conv1.bias.abs().min() > 0  # a bias used in place of the zero would show
    x = torch.randn(2, 6, small_config.hidden_size, dtype=torch.float64)
    memory = torch.zeros(2, 2, small_config.hidden_size, dtype=torch.float64)
    out = lfa(x, memory, _valid(2, 0, 6))
    torch.testing.assert_close(out, _lfa_by_formula(lfa, x), rtol=1e-12, atol=1e-12)


def test_lfa_full_sequence_equals_step_by_step(small_config):
    lfa = _randomise(YuanLocalizedFiltering(small_config).double(), seed=1)
    x = torch.randn(1, 7, small_config.hidden_size, dtype=torch.float64)
    full = lfa(x, torch.zeros(1, 2, small_config.hidden_size, dtype=torch.float64), _valid(1, 0, 7))

    memory = torch.zeros(1, 2, small_config.hidden_size, dtype=torch.float64)
    steps = []
    for t in range(7):
        steps.append(lfa(x[:, t : t + 1], memory, _valid(1, t, 1)))
        memory = torch.cat((memory, x[:, t : t + 1]), dim=1)[:, -2:]  # what YuanCache.get_lf_memory gives
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-12, atol=1e-12)


def _rotary_reference(x, positions, rotary_dims, base, table_dtype):
    inv_freq = (1.0 / (base ** (torch.arange(0, rotary_dims, 2, dtype=torch.float32) / rotary_dims))).to(table_dtype)
    freqs = positions.to(table_dtype)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    rot, rest = x[..., :rotary_dims], x[..., rotary_dims:]
    half = rotary_dims // 2
    rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    return torch.cat((rot * cos + rotated * sin, rest), dim=-1)


def test_attention_matches_reference_qk_layout(small_config):
    """Heads 0..H/2-1 take query and key from q_proj, the others from k_proj; V from the unfiltered input."""
    attention = _randomise(YuanAttention(small_config, layer_idx=0).double(), seed=2)
    heads, head_dim = small_config.num_attention_heads, small_config.head_dim
    seq = 5
    x = torch.randn(1, seq, small_config.hidden_size, dtype=torch.float64)
    masks = _build_batch_masks(None, 1, 0, seq, "cpu")
    positions = torch.arange(seq)[None]
    rotary = YuanRotaryEmbedding(small_config)
    got = attention(x, rotary(positions, torch.float64), masks)

    filtered = _lfa_by_formula(attention.lf_gate, x)[0]
    q_out, k_out = filtered @ attention.q_proj.weight.T, filtered @ attention.k_proj.weight.T
    layout = torch.cat((q_out, k_out), dim=-1).view(seq, heads, 2 * head_dim)
    query, key = layout[..., :head_dim], layout[..., head_dim:]
    assert torch.equal(query[:, 0], q_out[:, :head_dim]) and torch.equal(key[:, 0], q_out[:, head_dim : 2 * head_dim])
    assert torch.equal(query[:, heads - 1], k_out[:, -2 * head_dim : -head_dim])
    value = (x[0] @ attention.v_proj.weight.T).view(seq, heads, head_dim)

    outputs = []
    for h in range(heads):
        q = _rotary_reference(query[:, h], torch.arange(seq), small_config.rotary_dims, 10000.0, torch.bfloat16)
        k = _rotary_reference(key[:, h], torch.arange(seq), small_config.rotary_dims, 10000.0, torch.bfloat16)
        scores = (q @ k.T) / math.sqrt(head_dim)
        scores = scores.masked_fill(torch.triu(torch.ones(seq, seq, dtype=torch.bool), 1), float("-inf"))
        outputs.append(torch.softmax(scores, dim=-1) @ value[:, h])
    expected = torch.cat(outputs, dim=-1) @ attention.o_proj.weight.T
    torch.testing.assert_close(got[0], expected, rtol=1e-10, atol=1e-10)


def test_rotary_table_is_bf16_by_default_with_float32_option(small_config):
    rotary = YuanRotaryEmbedding(small_config)
    cos, sin = rotary(torch.tensor([[256, 257, 300, 301]]), torch.float32)
    assert torch.equal(cos[0, 0], cos[0, 1]) and torch.equal(cos[0, 2], cos[0, 3])  # bf16 positions round
    assert rotary._cos.shape == (small_config.max_position_embeddings, small_config.rotary_dims)
    table = rotary._cos
    rotary(torch.tensor([[3, 9]]), torch.float32)
    assert rotary._cos is table  # built once

    exact = YuanRotaryEmbedding(YuanConfig(**{**small_config.to_dict(), "rotary_table_dtype": "float32"}))
    cos32, _ = exact(torch.tensor([[256, 257]]), torch.float32)
    assert not torch.equal(cos32[0, 0], cos32[0, 1])
    angles = 257 * (1.0 / (10000 ** (torch.arange(0, small_config.rotary_dims, 2).double() / small_config.rotary_dims)))
    torch.testing.assert_close(cos32[0, 1, : small_config.rotary_dims // 2].double(), angles.cos(), rtol=0, atol=1e-4)
    # Beyond the table the same recipe extends it instead of failing.
    far, _ = rotary(torch.tensor([[small_config.max_position_embeddings + 5]]), torch.float32)
    assert far.shape == (1, 1, small_config.rotary_dims) and rotary._cos.shape[0] > small_config.max_position_embeddings


def test_rmsnorm_variance_in_float32_then_weight_times_cast():
    norm = YuanRMSNorm(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 8))
    x = torch.randn(3, 8).to(torch.bfloat16)
    xf = x.float()
    expected = norm.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    assert torch.equal(norm(x), expected)


def test_router_top2_weights_match_direct_computation(small_config):
    moe = _randomise(YuanMoE(small_config), seed=3)
    tokens = torch.randn(5, small_config.hidden_size)
    output, logits, experts, weights = moe(tokens[None])

    for i, token in enumerate(tokens):
        q = moe.gate.query.weight @ token
        k = moe.gate.key.weight @ token
        v = moe.gate.value.weight @ token
        scores = torch.exp(q[:, None] * k[None, :])
        attention = scores / scores.sum(dim=1, keepdim=True)
        expected_logits = attention @ v
        torch.testing.assert_close(logits[i], expected_logits, rtol=1e-5, atol=1e-5)
        probabilities = torch.softmax(expected_logits, dim=0)
        top = torch.topk(probabilities, 2)
        assert experts[i].tolist() == top.indices.tolist()
        torch.testing.assert_close(weights[i], top.values / top.values.sum())
        expected_output = sum(w * moe.experts[e](token) for w, e in zip(weights[i], experts[i]))
        torch.testing.assert_close(output[0, i], expected_output, rtol=1e-5, atol=1e-5)


def _greedy(model, ids, new_tokens, **kwargs):
    return model.generate(ids, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens, **kwargs)


def test_cached_greedy_equals_uncached_over_64_tokens(double_model):
    ids = torch.tensor([[11, 402, 7, 3000, 95]])
    cached = _greedy(double_model, ids, 64)
    recomputed = _greedy(double_model, ids, 64, use_cache=False)
    assert cached.shape == (1, 69)
    assert torch.equal(cached, recomputed)
    assert len(set(cached[0, 5:].tolist())) > 1  # the comparison is not between two constant runs


def test_incremental_logits_match_full_forward(double_model):
    ids = torch.randint(0, 4000, (2, 12), generator=torch.Generator().manual_seed(5))
    full = double_model(ids).logits
    cache = YuanCache(double_model.config)
    pieces = [double_model(ids[:, :1], cache=cache).logits, double_model(ids[:, 1:4], cache=cache).logits]
    pieces += [double_model(ids[:, t : t + 1], cache=cache).logits for t in range(4, 12)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-9, atol=1e-9)


def test_padded_batch_equals_single_rows(double_model):
    prompts = [[5], [17, 230], [44, 1, 900, 12, 3333, 8, 61]]
    width = max(len(p) for p in prompts)
    pad = 0
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    batch = _greedy(double_model, ids, 12, attention_mask=mask, pad_token_id=pad)
    batch_logits = double_model(ids, attention_mask=mask).logits
    for row, prompt in enumerate(prompts):
        single = _greedy(double_model, torch.tensor([prompt]), 12)
        assert batch[row, width:].tolist() == single[0, len(prompt) :].tolist()
        torch.testing.assert_close(
            batch_logits[row, width - len(prompt) :], double_model(torch.tensor([prompt])).logits[0], rtol=1e-9, atol=1e-9
        )


@pytest.mark.parametrize("prompt", [[7], [7, 1200]])
def test_one_and_two_token_prompts(double_model, prompt):
    ids = torch.tensor([prompt])
    cached = _greedy(double_model, ids, 10)
    assert torch.equal(cached, _greedy(double_model, ids, 10, use_cache=False))
    cache = YuanCache(double_model.config)
    double_model(ids, cache=cache)
    memory = cache.get_lf_memory(0)
    assert memory.shape == (1, 2, double_model.config.hidden_size)
    assert bool((memory[:, 0] == 0).all()) == (len(prompt) == 1)


def test_sampling_runs_and_is_reproducible(double_model):
    ids = torch.tensor([[3, 14, 15]])
    torch.manual_seed(123)
    first = double_model.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=True, temperature=1.5, top_k=50)
    torch.manual_seed(123)
    second = double_model.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=True, temperature=1.5, top_k=50)
    assert first.shape == (1, 19) and torch.equal(first, second)
    assert not torch.equal(first, _greedy(double_model, ids, 16))


def test_routing_trace_and_router_logits(double_model):
    ids = torch.tensor([[9, 8, 7, 6]])
    with double_model.record_routing() as trace:
        out = double_model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    experts, weights = trace.stacked()
    layers, top_k = double_model.config.num_hidden_layers, double_model.config.num_experts_per_tok
    # Every prompt token and every generated token but the last went through the model once.
    assert experts.shape == weights.shape == (layers, 1, out.shape[1] - 1, top_k)
    torch.testing.assert_close(weights.sum(-1), torch.ones(layers, 1, out.shape[1] - 1, dtype=weights.dtype))
    assert not any(layer.mlp._forward_hooks for layer in double_model.model.layers)  # switched off after the block

    full = double_model(out[:, :-1], output_router_logits=True)
    assert len(full.router_logits) == layers
    for layer, logits in enumerate(full.router_logits):
        probabilities = torch.softmax(logits, dim=-1)
        top = torch.topk(probabilities, top_k)
        assert torch.equal(top.indices, experts[layer])
        torch.testing.assert_close(top.values / top.values.sum(-1, keepdim=True), weights[layer])


def test_cache_type_is_checked(double_model):
    from transformers import DynamicCache

    with pytest.raises(TypeError, match="YuanCache"):
        double_model(torch.tensor([[1, 2]]), cache=DynamicCache())


def test_flash_attention_flag_changes_nothing(small_config):
    ids = torch.tensor([[4, 40, 400]])
    with_flag = random_float_model(YuanConfig(**{**small_config.to_dict(), "use_flash_attention": True}), seed=6)
    without = random_float_model(YuanConfig(**{**small_config.to_dict(), "use_flash_attention": False}), seed=6)
    assert torch.equal(with_flag(ids).logits, without(ids).logits)
