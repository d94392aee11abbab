"""GPTQ v1 packing: the integer layout of a quantized linear's tensors, with torch only.

Shared by the native model (`gptq.py`) and the vLLM plugin (`vllm_yuan/`, which ships this file), so the format is
written once. Layout: see `gptq.py`.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (4, 8)


def pack_factor(bits: int) -> int:
    """Values per int32."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"only {' and '.join(map(str, SUPPORTED_BITS))}-bit GPTQ weights are implemented, got {bits}")
    return 32 // bits


def _shifts(bits: int, device=None) -> torch.Tensor:
    """Bit offset of each packed value, lowest first."""
    return torch.arange(0, 32, bits, dtype=torch.int32, device=device)


def _pack_rows(values: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """[n*pack, m] ints in 0..2**bits-1 -> int32 [n, m], value `pack*r + j` in bits `bits*j..` of row r."""
    grouped = values.to(torch.int64).view(-1, pack_factor(bits), values.shape[-1])
    packed = (grouped << _shifts(bits).to(torch.int64).view(1, -1, 1)).sum(dim=1)
    # Values are below 2**32; fold the top bit into int32's sign like the C++ packers do.
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(torch.int32)


def _unpack_rows(packed: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """int32 [n, m] -> int32 [n*pack, m] values in 0..2**bits-1 (inverse of `_pack_rows`)."""
    values = (packed.unsqueeze(1) >> _shifts(bits, packed.device).view(1, -1, 1)) & (2**bits - 1)
    return values.reshape(-1, packed.shape[-1])  # `&` above undoes the sign extension of `>>`


def _pack_columns(values: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """[g, m*pack] ints -> int32 [g, m], packed along the last axis."""
    return _pack_rows(values.t().contiguous(), bits).t().contiguous()


def _unpack_columns(packed: torch.Tensor, bits: int = 4) -> torch.Tensor:
    return _unpack_rows(packed.t(), bits).t()


def pack_gptq(
    weight: torch.Tensor,
    bits: int = 4,
    group_size: int = 128,
    sym: bool = True,
    scales: torch.Tensor | None = None,
    zeros: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest quantise an `nn.Linear` weight [out, in] into GPTQ v1 tensors.

    Scales follow AutoGPTQ's quantizer (symmetric: `2 * absmax / (2**bits - 1)` per group and output, zero-point
    `2**(bits-1)`) and are stored in fp16; the integers are rounded against the fp16 scales, so packing a weight that
    is already on the grid (`unpack_gptq` output) with the same `scales` gives back the same integers. `zeros` are
    true zero-points [in/group, out] for asymmetric packing with given scales; v1 cannot store a zero-point of 0,
    which asymmetric groups without negative values would need, so those raise.

    Returns `(qweight, qzeros, scales, g_idx)`.
    """
    factor = pack_factor(bits)
    out_features, in_features = weight.shape
    if in_features % group_size or group_size % factor:
        raise ValueError(
            f"in_features ({in_features}) must be a multiple of group_size ({group_size}), itself of {factor}"
        )
    if out_features % factor:
        raise ValueError(f"out_features ({out_features}) must be a multiple of {factor} to pack the zero-points")
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
        # v1 stores zero - 1 in `bits` bits: a zero-point of 0 would wrap around to 2**bits when read back.
        raise ValueError(f"zero-points must be in 1..{max_q} for the GPTQ v1 layout (a group has no negative values?)")

    q = torch.round(grouped / scales.to(torch.float32).unsqueeze(1)) + zeros.unsqueeze(1)
    q = q.clamp(0, max_q).to(torch.int32).reshape(in_features, out_features)

    qweight = _pack_rows(q, bits)
    qzeros = _pack_columns((zeros.to(torch.int32) - 1) & max_q, bits)  # v1 stores zero - 1
    g_idx = (torch.arange(in_features) // group_size).to(torch.int32)
    return qweight, qzeros, scales, g_idx


def unpack_int_weights(qweight: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """The integers of a packed `qweight`, as int32 [in, out]."""
    return _unpack_rows(qweight, bits)


def unpack_zero_points(qzeros: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """True zero-points [in/group, out] from v1 `qzeros` (stored value + 1)."""
    return _unpack_columns(qzeros, bits) + 1


def unpack_gptq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int = 4,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Dequantised weight [out, in] (the `nn.Linear` layout)."""
    return _dequantize(qweight, qzeros, scales, g_idx.long(), dtype, bits).t()


def _dequantize(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None,
    dtype: torch.dtype,
    bits: int = 4,
) -> torch.Tensor:
    """[in, out] float weight. `g_idx=None` means groups of consecutive rows (no act-order), the cheap path."""
    q = _unpack_rows(qweight, bits)
    zeros = _unpack_columns(qzeros, bits) + 1
    if g_idx is None:
        groups = scales.shape[0]
        q = q.view(groups, -1, q.shape[-1])
        return ((q - zeros.unsqueeze(1)).to(dtype) * scales.to(dtype).unsqueeze(1)).reshape(-1, q.shape[-1])
    return (q - zeros[g_idx]).to(dtype) * scales[g_idx].to(dtype)
