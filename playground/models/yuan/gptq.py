"""GPTQ v1 weights, as in the released Yuan2-M32-hf-int4 (bits 4) and -int8 (bits 8) checkpoints (AutoGPTQ,
checkpoint_format "gptq").

Layout of one quantized `nn.Linear(in_features, out_features)` with `bits` b and `pack = 32 // b` values per int32:

- `qweight` int32 [in/pack, out]: `pack` b-bit values per int32 along the input axis, lowest bits first;
- `qzeros`  int32 [in/group, out/pack]: per group and output, the zero-point minus one (the v1 convention), packed
  the same way along the output axis;
- `scales`  fp16  [in/group, out];
- `g_idx`   int32 [in]: the group of each input feature (`i // group` without act-order).

The weight is `W[o, i] = scales[g, o] * (q[i, o] - (stored_zero[g, o] + 1))` with `g = g_idx[i]`.

`QuantLinear` keeps these tensors and, by default, dequantises them in column chunks on every call (the exact path).
`QuantLinear.use_kernel` converts them once into a fused kernel's layout (`quant_kernels.py`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from playground.errors import ModelFolderError

from .gptq_format import SUPPORTED_BITS, _dequantize, _unpack_columns, pack_factor, pack_gptq

logger = logging.getLogger(__name__)

# Dequantise at most this many weights at once on the exact path, so a big expert never needs a full float copy.
_DEQUANT_CHUNK_ELEMENTS = 8 * 1024 * 1024


# --------------------------------------------------------------------------------------------------------------------
# quantize_config.json


@dataclass(frozen=True)
class GPTQSettings:
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    desc_act: bool = False
    checkpoint_format: str = "gptq"


def read_quantize_config(path: str | Path) -> GPTQSettings:
    """Read an AutoGPTQ `quantize_config.json`; settings this loader cannot run raise `ModelFolderError`."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ModelFolderError(f"{path.name}: cannot be read ({err.strerror or err})") from err
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelFolderError(f"{path.name}: not valid JSON ({err})") from err
    return gptq_settings_from_dict(raw, path.name)


def gptq_settings_from_dict(raw: object, source: str) -> GPTQSettings:
    """Validate GPTQ settings (from quantize_config.json or config.json's quantization_config)."""
    if not isinstance(raw, dict):
        raise ModelFolderError(f"{source}: expected a JSON object")
    method = raw.get("quant_method", "gptq")
    checkpoint_format = raw.get("checkpoint_format", "gptq")
    settings = GPTQSettings(
        bits=raw.get("bits", 4),
        group_size=raw.get("group_size", 128),
        sym=bool(raw.get("sym", True)),
        desc_act=bool(raw.get("desc_act", False)),
        checkpoint_format=checkpoint_format,
    )
    problems = []
    if method != "gptq":
        problems.append(f"quant_method {method!r} (only 'gptq')")
    if checkpoint_format != "gptq" or raw.get("is_marlin_format"):
        problems.append(f"checkpoint_format {checkpoint_format!r} (only 'gptq', the v1 layout)")
    if settings.bits not in SUPPORTED_BITS:
        problems.append(f"bits {settings.bits} (only 4 or 8)")
    elif not isinstance(settings.group_size, int) or settings.group_size <= 0 or settings.group_size % 8:
        problems.append(f"group_size {settings.group_size} (needs a positive multiple of 8, the release uses 128)")
    if problems:
        raise ModelFolderError(f"{source}: unsupported GPTQ settings: " + "; ".join(problems))
    return settings


# --------------------------------------------------------------------------------------------------------------------
# packing


# --------------------------------------------------------------------------------------------------------------------
# the layer

GPTQ_BUFFERS = ("qweight", "qzeros", "scales", "g_idx")


class QuantLinear(nn.Module):
    """A linear layer whose weight stays GPTQ-packed in memory (a quarter of fp16 at 4 bits, half at 8).

    Without a kernel, each call dequantises the weight in column chunks and multiplies in the input's dtype (exact).
    `use_kernel(...)` converts the weights once into a fused kernel's layout; the GPTQ buffers are then emptied, so
    the layer holds one copy of its weights (and can no longer be saved in the GPTQ layout). On CUDA a layer that was
    not converted at load tries a kernel on its first call.
    """

    def __init__(self, in_features: int, out_features: int, group_size: int = 128, bias: bool = False, bits: int = 4):
        super().__init__()
        factor = pack_factor(bits)
        if in_features % group_size or group_size % factor:
            raise ValueError(f"in_features ({in_features}) must be a multiple of group_size ({group_size})")
        if out_features % factor:
            raise ValueError(f"out_features ({out_features}) must be a multiple of {factor}")
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size
        self.bits = bits
        groups = in_features // group_size
        self.register_buffer("qweight", torch.empty(in_features // factor, out_features, dtype=torch.int32))
        self.register_buffer("qzeros", torch.empty(groups, out_features // factor, dtype=torch.int32))
        self.register_buffer("scales", torch.empty(groups, out_features, dtype=torch.float16))
        self.register_buffer("g_idx", torch.empty(in_features, dtype=torch.int32))
        if bias:
            self.register_buffer("bias", torch.empty(out_features, dtype=torch.float16))
        else:
            self.bias = None
        self._sequential_groups: bool | None = None  # whether g_idx is i // group_size, checked on first use
        # A fused kernel holding the weights in its own layout, given once after load (quant_kernels.KernelChooser);
        # without one the layer runs the exact path. forward never converts.
        self.kernel: nn.Module | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128, bits: int = 4) -> "QuantLinear":
        """Quantise a float linear layer (round-to-nearest); used to write tiny test checkpoints."""
        layer = cls(linear.in_features, linear.out_features, group_size, bias=linear.bias is not None, bits=bits)
        qweight, qzeros, scales, g_idx = pack_gptq(linear.weight, bits=bits, group_size=group_size)
        layer.load_packed(qweight, qzeros, scales, g_idx, linear.bias)
        return layer

    def load_packed(self, qweight, qzeros, scales, g_idx, bias=None) -> None:
        for name, value in zip(GPTQ_BUFFERS, (qweight, qzeros, scales, g_idx)):
            getattr(self, name).copy_(value)
        if bias is not None:
            self.bias.copy_(bias)
        self._sequential_groups = None

    def extra_repr(self) -> str:
        kernel = getattr(self.kernel, "name", "dequantise per call (exact)")
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, bias={self.bias is not None}, kernel={kernel}"
        )

    @property
    def sequential_groups(self) -> bool:
        """Whether the groups are consecutive runs of `group_size` inputs (no act-order)."""
        if self._sequential_groups is None:
            expected = torch.arange(self.in_features, device=self.g_idx.device) // self.group_size
            self._sequential_groups = bool(torch.equal(self.g_idx.long(), expected))
        return self._sequential_groups

    def _group_index(self) -> torch.Tensor | None:
        return None if self.sequential_groups else self.g_idx.long()

    def zero_points(self) -> torch.Tensor:
        """True zero-points [in/group, out] (int32)."""
        return _unpack_columns(self.qzeros, self.bits) + 1

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The full float weight [out, in]; for tests, conversions and small layers, not used by the exact path."""
        self._require_gptq_buffers()
        return _dequantize(self.qweight, self.qzeros, self.scales, self._group_index(), dtype, self.bits).t()

    def use_kernel(self, kernel: nn.Module) -> None:
        """Hand the weights to `kernel` (built from this layer by `quant_kernels`) and free the GPTQ buffers."""
        self.kernel = kernel
        # Holding the GPTQ copy too would double the memory of every quantized layer.
        for name in GPTQ_BUFFERS:
            self._buffers[name] = self._buffers[name].new_empty(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is None:
            return self._torch_forward(x)
        out = self.kernel(x.reshape(-1, self.in_features)).view(*x.shape[:-1], self.out_features)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        # The input's dtype, unless the kernel computed in float32 (the router's), which is kept.
        return out if out.dtype in (x.dtype, torch.float32) else out.to(x.dtype)

    def _require_gptq_buffers(self) -> None:
        if self.qweight.numel() == 0:
            raise RuntimeError(f"this layer's GPTQ buffers were handed to its kernel ({self.kernel.name}); use it")

    def _torch_forward(self, x: torch.Tensor) -> torch.Tensor:
        self._require_gptq_buffers()
        g_idx = self._group_index()
        factor = pack_factor(self.bits)
        columns = max(factor, (_DEQUANT_CHUNK_ELEMENTS // self.in_features) // factor * factor)
        if g_idx is not None:
            columns = self.out_features  # act-order groups are gathered per row, chunking buys nothing
        outputs = []
        for start in range(0, self.out_features, columns):
            stop = min(start + columns, self.out_features)
            weight = _dequantize(
                self.qweight[:, start:stop],
                self.qzeros[:, start // factor : stop // factor],
                self.scales[:, start:stop],
                g_idx,
                x.dtype,
                self.bits,
            )
            outputs.append(torch.matmul(x, weight))
        out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out


def dequantize_linear(layer: QuantLinear, dtype: torch.dtype = torch.float32) -> nn.Linear:
    """A float `nn.Linear` holding `layer`'s dequantised weight (for tests and comparisons)."""
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(layer.dequantize(dtype))
        if layer.bias is not None:
            linear.bias.copy_(layer.bias.to(dtype))
    return linear


__all__ = ["GPTQSettings", "QuantLinear", "dequantize_linear", "gptq_settings_from_dict", "read_quantize_config"]
