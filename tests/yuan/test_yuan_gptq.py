"""GPTQ v1 INT4: packing layout, exact round trips, QuantLinear, quantize_config.json checks."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from playground.errors import ModelFolderError
from playground.models.yuan import gptq
from playground.models.yuan.gptq import QuantLinear, read_quantize_config
from playground.models.yuan.gptq_format import pack_gptq, unpack_gptq, unpack_int_weights, unpack_zero_points


def test_nibbles_are_packed_lowest_bits_first():
    # Build a weight on the grid whose integers (q = w / scale + 8) are 0..7 down the first column's first row.
    scales = torch.full((1, 8), 0.5, dtype=torch.float16)
    q = torch.zeros(128, 8, dtype=torch.int64)
    q[:8, 0] = torch.arange(8)
    q[8:] = 8
    weight = ((q - 8).float() * 0.5).t()
    qweight, qzeros, packed_scales, g_idx = pack_gptq(weight, scales=scales)
    assert qweight.dtype == torch.int32 and qweight.shape == (16, 8)
    assert qweight[0, 0].item() == 0x76543210
    assert qweight[1, 0].item() == int.from_bytes(bytes.fromhex("88888888"), "big") - 2**32  # sign bit set
    # v1 stores zero - 1: the symmetric zero-point 8 is written as 7 in every nibble.
    assert qzeros.shape == (1, 1) and qzeros[0, 0].item() == 0x77777777
    assert torch.equal(packed_scales, scales)
    assert g_idx.dtype == torch.int32 and torch.equal(g_idx, torch.zeros(128, dtype=torch.int32))


def test_pack_unpack_round_trip_is_bit_exact():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 384, generator=generator)
    qweight, qzeros, scales, g_idx = pack_gptq(weight, group_size=128)
    assert (qweight.shape, qzeros.shape, scales.shape, g_idx.shape) == ((48, 64), (3, 8), (3, 64), (384,))
    assert scales.dtype == torch.float16
    assert torch.equal(g_idx.long(), torch.arange(384) // 128)

    dequantised = unpack_gptq(qweight, qzeros, scales, g_idx)
    # Integers computed independently: round(w / scale) + 8, clamped to 4 bits.
    group_scales = scales.float().repeat_interleave(128, dim=0).t()
    expected_q = (torch.round(weight / group_scales) + 8).clamp(0, 15)
    assert torch.equal(unpack_int_weights(qweight).t().float(), expected_q)
    assert torch.equal(dequantised, (expected_q - 8) * group_scales)
    assert (dequantised - weight).abs().max() <= group_scales.max() / 2 + 1e-6

    # Packing the dequantised weight again with the same scales gives the very same bits.
    again = pack_gptq(dequantised, group_size=128, scales=scales)
    assert torch.equal(again[0], qweight) and torch.equal(again[1], qzeros)
    assert torch.equal(unpack_gptq(*again), dequantised)


def test_asymmetric_zero_points_round_trip():
    weight = torch.rand(16, 128) - 0.2  # lopsided: the asymmetric grid moves its zero-point off 8
    qweight, qzeros, scales, g_idx = pack_gptq(weight, sym=False)
    zeros = unpack_zero_points(qzeros)
    assert not bool((zeros == 8).all())
    dequantised = unpack_gptq(qweight, qzeros, scales, g_idx)
    again = pack_gptq(dequantised, sym=False, scales=scales, zeros=zeros)
    assert torch.equal(again[0], qweight) and torch.equal(again[1], qzeros)
    assert (dequantised - weight).abs().max() <= scales.float().max() / 2 + 1e-6
    # A group without negative values would need zero-point 0, which v1 (zero - 1 in four bits) cannot store.
    with pytest.raises(ValueError, match="zero-points"):
        pack_gptq(torch.rand(16, 128) + 0.25, sym=False)


def test_quant_linear_matches_dequantised_weight(monkeypatch):
    linear = torch.nn.Linear(256, 96, bias=False)
    layer = QuantLinear.from_linear(linear)
    assert {name for name, _ in layer.named_buffers()} == {"qweight", "qzeros", "scales", "g_idx"}
    assert not any(p.is_floating_point() and p.shape == linear.weight.shape for p in layer.buffers())
    x = torch.randn(3, 5, 256)
    expected = x @ layer.dequantize().t()
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    # Chunked dequantisation (column blocks of 8) gives the same result.
    monkeypatch.setattr(gptq, "_DEQUANT_CHUNK_ELEMENTS", 256 * 8)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert layer(x.double()).dtype == torch.float64


def test_quant_linear_bias_and_shape_checks():
    linear = torch.nn.Linear(128, 16, bias=True)
    layer = QuantLinear.from_linear(linear)
    x = torch.randn(2, 128)
    torch.testing.assert_close(layer(x), x @ layer.dequantize().t() + layer.bias.float(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="multiple of group_size"):
        QuantLinear(100, 16)
    with pytest.raises(ValueError, match="multiple of 8"):
        QuantLinear(128, 12)


def _write_config(tmp_path, **overrides):
    config = {"bits": 4, "group_size": 128, "desc_act": False, "sym": True, "checkpoint_format": "gptq",
              "quant_method": "gptq", "damp_percent": 0.01, "static_groups": False, "true_sequential": True}
    config.update(overrides)
    path = tmp_path / "quantize_config.json"
    path.write_text(json.dumps(config))
    return path


def test_quantize_config_release_settings_are_read(tmp_path):
    settings = read_quantize_config(_write_config(tmp_path))
    assert (settings.bits, settings.group_size, settings.sym, settings.desc_act) == (4, 128, True, False)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"bits": 3}, "bits 3"),
        ({"checkpoint_format": "gptq_v2"}, "gptq_v2"),
        ({"quant_method": "awq"}, "awq"),
        ({"group_size": 100}, "group_size 100"),
    ],
)
def test_quantize_config_unsupported_settings_are_named(tmp_path, override, message):
    with pytest.raises(ModelFolderError, match=message) as error:
        read_quantize_config(_write_config(tmp_path, **override))
    assert "quantize_config.json" in str(error.value)


def test_quantize_config_bad_json_names_the_file(tmp_path):
    path = tmp_path / "quantize_config.json"
    path.write_text("{bits: 4")
    with pytest.raises(ModelFolderError, match="quantize_config.json: not valid JSON"):
        read_quantize_config(path)


def _fp16_reference(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    return (x.float() @ layer.dequantize().t()).to(x.dtype)


def test_quant_linear_fp16_activations_cpu_twin():
    """CPU twin of the GPU test below: fp16 activations go through the same dequantise-and-matmul path."""
    layer = QuantLinear.from_linear(torch.nn.Linear(256, 128, bias=False))
    x = torch.randn(2, 4, 256, dtype=torch.float16)
    got = layer(x)
    assert got.dtype == torch.float16 and got.shape == (2, 4, 128)
    torch.testing.assert_close(got.float(), _fp16_reference(layer, x).float(), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_quant_linear_fp16_on_cuda():
    layer = QuantLinear.from_linear(torch.nn.Linear(256, 128, bias=False))
    x = torch.randn(2, 4, 256, dtype=torch.float16)
    expected = _fp16_reference(layer, x)  # before the move: a CUDA kernel may take the packed buffers over
    got = copy.deepcopy(layer).cuda()(x.cuda())
    assert got.dtype == torch.float16 and got.is_cuda and got.shape == (2, 4, 128)
    torch.testing.assert_close(got.float().cpu(), expected.float(), rtol=2e-2, atol=2e-2)
