"""GPTQ v1 INT4 weights, as in the released Yuan2-M32-hf-int4 checkpoint (AutoGPTQ, checkpoint_format "gptq").

Layout of one quantized `nn.Linear(in_features, out_features)`:

- `qweight` int32 [in/8, out]: eight 4-bit values per int32 along the input axis, lowest bits first;
- `qzeros`  int32 [in/group, out/8]: per group and output, the zero-point minus one (the v1 convention), packed the
  same way along the output axis;
- `scales`  fp16  [in/group, out];
- `g_idx`   int32 [in]: the group of each input feature (`i // group` without act-order).

The weight is `W[o, i] = scales[g, o] * (q[i, o] - (stored_zero[g, o] + 1))` with `g = g_idx[i]`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from playground.errors import ModelFolderError

logger = logging.getLogger(__name__)

BITS = 4
PACK_FACTOR = 32 // BITS  # int4 values per int32
_SHIFTS = torch.arange(0, 32, BITS, dtype=torch.int32)  # bit offset of each packed value, lowest first
# Dequantise at most this many weights at once on the PyTorch path, so a big expert never needs a full float copy.
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
    if settings.bits != BITS:
        problems.append(f"bits {settings.bits} (only 4)")
    if not isinstance(settings.group_size, int) or settings.group_size <= 0 or settings.group_size % PACK_FACTOR:
        problems.append(f"group_size {settings.group_size} (needs a positive multiple of 8, the release uses 128)")
    if settings.desc_act:
        problems.append("desc_act true (act-order checkpoints are not supported, the release uses false)")
    if problems:
        raise ModelFolderError(f"{source}: unsupported GPTQ settings: " + "; ".join(problems))
    return settings


# --------------------------------------------------------------------------------------------------------------------
# packing


def _pack_rows(values: torch.Tensor) -> torch.Tensor:
    """[n*8, m] ints in 0..15 -> int32 [n, m], value 8r+j in bits 4j..4j+3 of row r."""
    grouped = values.to(torch.int64).view(-1, PACK_FACTOR, values.shape[-1])
    packed = (grouped << _SHIFTS.to(torch.int64).view(1, -1, 1)).sum(dim=1)
    # Values are below 2**32; fold the top bit into int32's sign like the C++ packers do.
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(torch.int32)


def _unpack_rows(packed: torch.Tensor) -> torch.Tensor:
    """int32 [n, m] -> int32 [n*8, m] values in 0..15 (inverse of `_pack_rows`)."""
    shifts = _SHIFTS.to(packed.device).view(1, -1, 1)
    values = (packed.unsqueeze(1) >> shifts) & 0xF  # `&` undoes the sign extension of `>>`
    return values.reshape(-1, packed.shape[-1])


def _pack_columns(values: torch.Tensor) -> torch.Tensor:
    """[g, m*8] ints in 0..15 -> int32 [g, m], packed along the last axis."""
    return _pack_rows(values.t().contiguous()).t().contiguous()


def _unpack_columns(packed: torch.Tensor) -> torch.Tensor:
    return _unpack_rows(packed.t()).t()


def pack_gptq(
    weight: torch.Tensor,
    bits: int = 4,
    group_size: int = 128,
    sym: bool = True,
    scales: torch.Tensor | None = None,
    zeros: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest quantise an `nn.Linear` weight [out, in] into GPTQ v1 tensors.

    Scales follow AutoGPTQ's quantizer (symmetric: `2 * absmax / 15` per group and output, zero-point 8) and are
    stored in fp16; the integers are rounded against the fp16 scales, so packing a weight that is already on the grid
    (`unpack_gptq` output) with the same `scales` gives back the same integers. `zeros` are true zero-points
    [in/group, out] for asymmetric packing with given scales; v1 cannot store a zero-point of 0, which asymmetric
    groups without negative values would need, so those raise.

    Returns `(qweight, qzeros, scales, g_idx)`.
    """
    if bits != BITS:
        raise ValueError(f"only 4-bit packing is implemented, got bits={bits}")
    out_features, in_features = weight.shape
    if in_features % group_size or group_size % PACK_FACTOR:
        raise ValueError(f"in_features ({in_features}) must be a multiple of group_size ({group_size}), itself of 8")
    if out_features % PACK_FACTOR:
        raise ValueError(f"out_features ({out_features}) must be a multiple of 8 to pack the zero-points")
    max_q = 2**bits - 1
    groups = in_features // group_size
    grouped = weight.detach().to(torch.float32).t().reshape(groups, group_size, out_features)

    if scales is None:
        if sym:
            absmax = grouped.abs().amax(dim=1)
            absmax = torch.where(absmax == 0, torch.ones_like(absmax), absmax)  # all-zero group: AutoGPTQ uses [-1, 1]
            scales = 2 * absmax / max_q
            zeros = torch.full_like(scales, (max_q + 1) // 2)
        else:
            low = grouped.amin(dim=1).clamp(max=0)
            high = grouped.amax(dim=1).clamp(min=0)
            empty = (low == 0) & (high == 0)
            low, high = torch.where(empty, -1.0, low), torch.where(empty, 1.0, high)
            scales = (high - low) / max_q
            zeros = torch.round(-low / scales.to(torch.float16).to(torch.float32))
    elif zeros is None:
        if not sym:
            raise ValueError("asymmetric packing with given scales needs the zero-points too")
        zeros = torch.full(scales.shape, (max_q + 1) // 2)
    scales = scales.to(torch.float16)
    zeros = zeros.to(torch.float32)
    if bool((zeros < 1).any()) or bool((zeros > max_q).any()):
        # v1 stores zero - 1 in four bits: a zero-point of 0 would wrap around to 16 when read back.
        raise ValueError("zero-points must be in 1..15 for the GPTQ v1 layout (a group has no negative values?)")

    q = torch.round(grouped / scales.to(torch.float32).unsqueeze(1)) + zeros.unsqueeze(1)
    q = q.clamp(0, max_q).to(torch.int32).reshape(in_features, out_features)

    qweight = _pack_rows(q)
    qzeros = _pack_columns((zeros.to(torch.int32) - 1) & 0xF)  # v1 stores zero - 1 (wrapping 0 to 15)
    g_idx = (torch.arange(in_features) // group_size).to(torch.int32)
    return qweight, qzeros, scales, g_idx


def unpack_int_weights(qweight: torch.Tensor) -> torch.Tensor:
    """The 4-bit integers of a packed `qweight`, as int32 [in, out]."""
    return _unpack_rows(qweight)


def unpack_zero_points(qzeros: torch.Tensor) -> torch.Tensor:
    """True zero-points [in/group, out] from v1 `qzeros` (stored value + 1)."""
    return _unpack_columns(qzeros) + 1


def unpack_gptq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int = 4,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Dequantised weight [out, in] (the `nn.Linear` layout)."""
    if bits != BITS:
        raise ValueError(f"only 4-bit weights are implemented, got bits={bits}")
    return _dequantize(qweight, qzeros, scales, g_idx.long(), dtype).t()


def _dequantize(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """[in, out] float weight. `g_idx=None` means groups of consecutive rows (no act-order), the cheap path."""
    q = _unpack_rows(qweight)
    zeros = _unpack_columns(qzeros) + 1
    if g_idx is None:
        groups = scales.shape[0]
        q = q.view(groups, -1, q.shape[-1])
        return ((q - zeros.unsqueeze(1)).to(dtype) * scales.to(dtype).unsqueeze(1)).reshape(-1, q.shape[-1])
    return (q - zeros[g_idx]).to(dtype) * scales[g_idx].to(dtype)


# --------------------------------------------------------------------------------------------------------------------
# the layer


class QuantLinear(nn.Module):
    """A linear layer whose weight stays GPTQ-packed in memory (about a quarter of fp16).

    On CPU (and on CUDA when no faster kernel is available) each call dequantises the weight in column chunks and
    multiplies in the input's dtype. On CUDA it first tries gptqmodel's Marlin kernel, checks it against the PyTorch
    path once, and keeps whichever is valid; an adopted kernel takes over the weights (the GPTQ buffers are emptied,
    so the layer no longer runs on CPU or saves its state).
    """

    def __init__(self, in_features: int, out_features: int, group_size: int = 128, bias: bool = False):
        super().__init__()
        if in_features % group_size or group_size % PACK_FACTOR:
            raise ValueError(f"in_features ({in_features}) must be a multiple of group_size ({group_size})")
        if out_features % PACK_FACTOR:
            raise ValueError(f"out_features ({out_features}) must be a multiple of 8")
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size
        groups = in_features // group_size
        self.register_buffer("qweight", torch.empty(in_features // PACK_FACTOR, out_features, dtype=torch.int32))
        self.register_buffer("qzeros", torch.empty(groups, out_features // PACK_FACTOR, dtype=torch.int32))
        self.register_buffer("scales", torch.empty(groups, out_features, dtype=torch.float16))
        self.register_buffer("g_idx", torch.empty(in_features, dtype=torch.int32))
        if bias:
            self.register_buffer("bias", torch.empty(out_features, dtype=torch.float16))
        else:
            self.bias = None
        self._sequential_groups: bool | None = None  # whether g_idx is i // group_size, checked on first use
        self._cuda_kernel: nn.Module | None = None
        self._cuda_kernel_tried = False

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128) -> "QuantLinear":
        """Quantise a float linear layer (round-to-nearest); used to write tiny test checkpoints."""
        layer = cls(linear.in_features, linear.out_features, group_size, bias=linear.bias is not None)
        qweight, qzeros, scales, g_idx = pack_gptq(linear.weight, group_size=group_size)
        layer.load_packed(qweight, qzeros, scales, g_idx, linear.bias)
        return layer

    def load_packed(self, qweight, qzeros, scales, g_idx, bias=None) -> None:
        for name, value in (("qweight", qweight), ("qzeros", qzeros), ("scales", scales), ("g_idx", g_idx)):
            getattr(self, name).copy_(value)
        if bias is not None:
            self.bias.copy_(bias)
        self._sequential_groups = None

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits=4, "
            f"group_size={self.group_size}, bias={self.bias is not None}"
        )

    def _group_index(self) -> torch.Tensor | None:
        if self._sequential_groups is None:
            expected = torch.arange(self.in_features, device=self.g_idx.device) // self.group_size
            self._sequential_groups = bool(torch.equal(self.g_idx.long(), expected))
        return None if self._sequential_groups else self.g_idx.long()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The full float weight [out, in]; for tests and conversions, not used by `forward`."""
        return _dequantize(self.qweight, self.qzeros, self.scales, self._group_index(), dtype).t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            kernel = self._get_cuda_kernel(x.dtype)
            if kernel is not None:
                return kernel(x.reshape(-1, self.in_features)).view(*x.shape[:-1], self.out_features)
        return self._torch_forward(x)

    def _torch_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.qweight.numel() == 0:
            raise RuntimeError("this layer's GPTQ buffers were handed to its CUDA kernel; run it on CUDA")
        g_idx = self._group_index()
        columns = max(PACK_FACTOR, (_DEQUANT_CHUNK_ELEMENTS // self.in_features) // PACK_FACTOR * PACK_FACTOR)
        if g_idx is not None:
            columns = self.out_features  # act-order groups are gathered per row, chunking buys nothing
        outputs = []
        for start in range(0, self.out_features, columns):
            stop = min(start + columns, self.out_features)
            weight = _dequantize(
                self.qweight[:, start:stop],
                self.qzeros[:, start // PACK_FACTOR : stop // PACK_FACTOR],
                self.scales[:, start:stop],
                g_idx,
                x.dtype,
            )
            outputs.append(torch.matmul(x, weight))
        out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out

    # -- CUDA ---------------------------------------------------------------------------------------------------------

    def _get_cuda_kernel(self, dtype: torch.dtype) -> nn.Module | None:
        if not self._cuda_kernel_tried:
            self._cuda_kernel_tried = True
            self._cuda_kernel = _build_marlin_kernel(self, dtype)
            if self._cuda_kernel is not None:
                # The kernel keeps the weights in its own layout; holding the GPTQ copy too would double the GPU
                # memory of every quantized layer (the release needs most of a 24 GB card already).
                for name in ("qweight", "qzeros", "scales", "g_idx"):
                    self._buffers[name] = self._buffers[name].new_empty(0)
        return self._cuda_kernel


def _build_marlin_kernel(layer: QuantLinear, dtype: torch.dtype) -> nn.Module | None:
    """gptqmodel's Marlin kernel for `layer` if it is installed and agrees with the PyTorch path, else None.

    Marlin handles symmetric 4-bit weights with the fixed zero-point 8, which is what the release stores (every
    `qzeros` nibble 7); it needs out_features divisible by 64, so the 32-wide router projections stay on PyTorch.
    """
    if dtype not in (torch.float16, torch.bfloat16) or layer.out_features % 64 or layer.bias is not None:
        return None
    if layer._group_index() is not None or not bool((unpack_zero_points(layer.qzeros) == 8).all()):
        return None
    try:
        from gptqmodel.nn_modules.qlinear.marlin import MarlinQuantLinear
    except Exception:  # not installed, or built without CUDA extensions
        return None
    try:
        kernel = MarlinQuantLinear(
            bits=4,
            group_size=layer.group_size,
            desc_act=False,
            sym=True,
            in_features=layer.in_features,
            out_features=layer.out_features,
            bias=False,
        ).to(layer.qweight.device)
        kernel.qweight.data.copy_(layer.qweight)
        kernel.qzeros.data.copy_(layer.qzeros)
        kernel.scales.data.copy_(layer.scales)
        kernel.g_idx.data.copy_(layer.g_idx)
        kernel.post_init()
        kernel.eval()
        # One check against the reference path before trusting the kernel for this layer.
        probe = torch.randn(4, layer.in_features, device=layer.qweight.device, dtype=dtype)
        expected = layer._torch_forward(probe).float()
        got = kernel(probe).float()
        tolerance = 2e-2 * expected.abs().max().clamp(min=1.0)
        if got.shape != expected.shape or (got - expected).abs().max() > tolerance:
            logger.warning("gptqmodel Marlin kernel disagrees with the PyTorch dequantisation; using PyTorch")
            return None
        return kernel
    except Exception as err:  # API drift across gptqmodel versions, unsupported GPU, ...
        logger.warning("gptqmodel Marlin kernel unavailable (%s); using the PyTorch INT4 path", err)
        return None


def dequantize_linear(layer: QuantLinear, dtype: torch.dtype = torch.float32) -> nn.Linear:
    """A float `nn.Linear` holding `layer`'s dequantised weight (for tests and comparisons)."""
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(layer.dequantize(dtype))
        if layer.bias is not None:
            linear.bias.copy_(layer.bias.to(dtype))
    return linear


__all__ = [
    "GPTQSettings",
    "QuantLinear",
    "dequantize_linear",
    "pack_gptq",
    "gptq_settings_from_dict",
    "read_quantize_config",
    "unpack_gptq",
    "unpack_int_weights",
    "unpack_zero_points",
]
