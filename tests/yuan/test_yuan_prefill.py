"""The prefill paths: grouped expert dispatch, the int4 kernel's dequantising path for many rows, chunked prefill, and
the decoding step's attention over a bf16 cache. Each is checked against the plain computation it replaces."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from playground.models.yuan import load_yuan, quant_kernels
from playground.models.yuan.gptq import QuantLinear
from playground.models.yuan.gptq_format import pack_gptq
from playground.models.yuan.make_tiny import random_float_model
from playground.models.yuan.cache_yuan import YuanCache
from playground.models.yuan.modeling_yuan import YuanMoE, route_tokens
from playground.models.yuan.precision import PREFILL_CHUNK_TOKENS


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    got, expected = got.detach().double(), expected.detach().double()
    return float((got - expected).norm() / expected.norm())


def _moe_token_by_token(moe: YuanMoE, tokens: torch.Tensor) -> torch.Tensor:
    """Each token alone: its k experts' weighted outputs added in ascending expert order."""
    experts, weights = route_tokens(moe.gate(tokens), moe.top_k, moe.normalize)
    rows = []
    for token, chosen, weight in zip(tokens, experts, weights):
        pairs = sorted(zip(chosen.tolist(), weight))
        outputs = [moe.experts[expert](token[None]) * w.to(token.dtype) for expert, w in pairs]
        rows.append(outputs[0] + outputs[1])
    return torch.cat(rows)


def test_grouped_experts_equal_token_by_token(small_config):
    moe = random_float_model(small_config, seed=5).double().model.layers[0].mlp
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(1, 40, small_config.hidden_size, dtype=torch.float64, generator=generator)
    with torch.inference_mode():
        output, router_logits, experts, weights = moe(tokens)
        expected = _moe_token_by_token(moe, tokens[0])
    assert router_logits.dtype == torch.float64 and experts.shape == (40, moe.top_k)
    assert len(set(experts.flatten().tolist())) > 2  # several experts, several rows each
    torch.testing.assert_close(output[0], expected, rtol=1e-12, atol=1e-12)


def _int4_layer(in_features: int, out_features: int, sym: bool = True) -> QuantLinear:
    generator = torch.Generator().manual_seed(in_features + out_features)
    weight = torch.randn(out_features, in_features, generator=generator) / in_features**0.5
    if not sym:
        weight = weight + 0.3 * weight.abs().mean()
    layer = QuantLinear(in_features, out_features)
    layer.load_packed(*pack_gptq(weight, sym=sym))
    return layer


@pytest.mark.parametrize("sym", [True, False])
def test_many_rows_dequantise_the_kernels_own_weight(sym):
    """From `DEQUANTIZE_ROWS` rows on, the CPU int4 kernel's weight is dequantised to bf16 and multiplied by a bf16
    GEMM: the weight is the kernel's `(q - 8) * scale + zero`, rounded once to bf16, and the products agree with the
    int4 kernel's to bf16 rounding."""
    if quant_kernels.cpu_block_n(256) is None:
        pytest.skip("this PyTorch's CPU int4 layout is not a known one: the int4 kernel serves every row count")
    layer = _int4_layer(512, 256, sym=sym)
    q = quant_kernels.int4_rows(layer).float()  # [out, in]
    exact = layer.dequantize()
    quant_kernels.KernelChooser(torch.device("cpu"), torch.float32).convert(layer)
    scale, zero = (t.t().repeat_interleave(128, dim=1) for t in layer.kernel.scales_and_zeros.float().unbind(-1))
    expected = ((q - 8) * scale + zero).bfloat16()
    weight = layer.kernel.dequantize()
    assert weight.dtype == torch.bfloat16 and weight.shape == (256, 512)
    # float32 evaluates the formula in another order: a rare weight rounds to the neighbouring bf16 value.
    torch.testing.assert_close(weight.float(), expected.float(), rtol=2**-7, atol=0)
    assert (weight != expected).float().mean() < 1e-3

    x = torch.randn(quant_kernels.DEQUANTIZE_ROWS, 512, generator=torch.Generator().manual_seed(1))
    many = layer(x)
    few = torch.cat([layer(x[i : i + 4]) for i in range(0, x.shape[0], 4)])  # the int4 kernel's path
    assert _relative_error(many, few) < 5e-3
    assert _relative_error(many, x @ exact.t()) < 1e-2


def test_an_unknown_cpu_layout_keeps_the_int4_kernel(monkeypatch):
    layer = _int4_layer(256, 128)
    quant_kernels.KernelChooser(torch.device("cpu"), torch.float32).convert(layer)
    x = torch.randn(quant_kernels.DEQUANTIZE_ROWS, 256)
    expected = torch.ops.aten._weight_int4pack_mm_for_cpu(
        x.bfloat16(), layer.kernel.packed, 128, layer.kernel.scales_and_zeros
    ).float()
    monkeypatch.setattr(quant_kernels, "_cpu_packer_block", lambda: None)
    assert torch.equal(layer(x), expected)
    with pytest.raises(RuntimeError, match="no known layout"):
        layer.kernel.dequantize()


def test_chunked_prefill_equals_one_pass(tiny_int4_dir):
    """A prompt computed a few tokens at a time (the generation path's `prefill_chunk_size`) gives the logits of one
    pass, in the fast mixed-precision mode."""
    assert PREFILL_CHUNK_TOKENS >= quant_kernels.DEQUANTIZE_ROWS  # a full chunk takes the dequantising path
    model, _ = load_yuan(tiny_int4_dir, with_tokenizer=False)
    prompt = torch.randint(0, model.config.vocab_size, (1, 23), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        whole = model(prompt, logits_to_keep=1).logits
        cache = YuanCache(model.config)
        for start in range(0, prompt.shape[1], 5):
            chunked = model(prompt[:, start : start + 5], cache=cache, use_cache=True, logits_to_keep=1).logits
    assert _relative_error(chunked, whole) < 1e-2


def test_decoding_attention_over_a_bf16_cache_is_float64_attention_to_bf16_rounding():
    """A decoding step attends over its bf16 cache with bf16 SDPA (query rounded to bf16; scores, softmax and sums in
    float32), like a prompt's positions: it agrees with float64 attention to the rounding of one bf16 operand, at any
    length and with a padding mask."""
    generator = torch.Generator().manual_seed(3)
    for length in (1, 37, 3000):
        query = torch.randn(2, 4, 1, 64, generator=generator)
        key = torch.randn(2, 4, length, 64, generator=generator).bfloat16()
        value = torch.randn(2, 4, length, 64, generator=generator).bfloat16()
        mask = torch.ones(2, 1, 1, length, dtype=torch.bool)
        mask[1, ..., : length // 3] = False  # a left-padded row
        got = F.scaled_dot_product_attention(query.bfloat16(), key, value, attn_mask=mask, scale=64**-0.5)
        expected = F.scaled_dot_product_attention(
            query.double(), key.double(), value.double(), attn_mask=mask, scale=64**-0.5
        )
        assert _relative_error(got, expected) < 4e-3
