"""Fused kernels for GPTQ layers: the packed weights are converted once, at load, into a kernel's own layout.

- `Int4PackKernel`: PyTorch's own int4 kernels (tinygemm, what gpt-fast and torchao use), on CPU
  `_convert_weight_to_int4pack_for_cpu` + `_weight_int4pack_mm_for_cpu` and on CUDA `_convert_weight_to_int4pack` +
  `_weight_int4pack_mm`. They take bf16 activations (other dtypes are cast; on CPU fp32/fp16 hit a slow path) and
  dequantise tile by tile inside the matmul as `w = (q - 8) * scale + zero`, with a float zero per group and output.
  GPTQ's `scale * (q - z)` is the same thing with `zero = scale * (8 - z)`, so symmetric and asymmetric v1 weights
  both fit. Needs 4 bits, consecutive groups (no act-order) and a group size of 32, 64, 128 or 256.
  The CPU kernel costs the same per row from 4 rows on (about 85 GMAC/s on 2 cores: it dequantises as it multiplies),
  so for many rows (a prefill chunk) the weight is dequantised once, the same way, into bf16 and multiplied by a bf16
  GEMM (oneDNN: AMX or AVX512-BF16), about ten times faster per row.
- `DenseKernel`: the weight dequantised once into a float dtype. Used for the router's three 2048x32 projections
  (0.25 MB each in float32): routing stays in float32, so the chosen experts do not move with bf16 rounding.
- `MarlinKernel`: gptqmodel's Marlin on CUDA, an optional extra (`pip install gptqmodel`), preferred when present.

Every kind of kernel is checked once per load and weight shape against the exact dequantising path on a probe
input; a kernel that disagrees is not used (the layer stays exact) and a warning says so.
"""

from __future__ import annotations

import functools
import logging
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .gptq import QuantLinear
from .precision import ROUTER_LINEAR

logger = logging.getLogger(__name__)

INT4_GROUP_SIZES = (32, 64, 128, 256)
CHECK_TOLERANCE = 2e-2  # relative L2 error of a kernel against the exact path on the probe
CPU_N_MULTIPLE = 16  # the CPU packer's block of output rows
# From this many rows on, a CPU int4 matmul dequantises its weight to bf16 once and runs a bf16 GEMM: dequantising
# costs about what the int4 kernel spends on 200 rows, the GEMM then a tenth of the kernel's time per row.
DEQUANTIZE_ROWS = 256
_DEQUANTIZE_SLICE = 1 << 20  # weights dequantised at a time (4 MB of float32; fewer ops than smaller slices)


class Int4PackKernel(nn.Module):
    """int4 weights in tinygemm's packed layout, with bf16 scales and zeros [in/group, out, 2]."""

    def __init__(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int, out_features: int):
        super().__init__()
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("scales_and_zeros", scales_and_zeros, persistent=False)
        self.group_size = group_size
        self.out_features = out_features
        self.layout = packed.device.type  # the CPU and CUDA packers lay the weights out differently
        self.name = f"int4pack-{self.layout}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != self.layout or self.packed.device.type != self.layout:
            raise RuntimeError(
                f"this layer's int4 weights were packed for {self.layout}; load the model on {x.device.type} instead "
                "of moving it (load_yuan(..., device=...))"
            )
        x = x.to(torch.bfloat16).contiguous()
        if self.layout == "cpu":
            if x.shape[0] >= DEQUANTIZE_ROWS and cpu_block_n(self.out_features) is not None:
                return F.linear(x, self.dequantize())
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.group_size, self.scales_and_zeros)
        return torch.ops.aten._weight_int4pack_mm(x, self.packed, self.group_size, self.scales_and_zeros)

    def dequantize(self) -> torch.Tensor:
        """The CPU kernel's weight [out, in] in bf16: `(q - 8) * scale + zero` in float32, rounded once."""
        block = cpu_block_n(self.out_features)
        if self.layout != "cpu" or block is None:
            raise RuntimeError(f"no known layout for this {self.layout} int4 weight")
        n, k, groups = self.out_features, 2 * self.packed.shape[1], self.scales_and_zeros.shape[0]
        # Output block b is stored [k, block/2]: output j in the low nibbles, j + block/2 in the high ones.
        packed = self.packed.view(n // block, k, block // 2)
        scale, zero = self.scales_and_zeros.float().unbind(-1)  # [groups, out]
        scale = scale.view(groups, n // block, 1, block).transpose(0, 1)  # [n/block, groups, 1, block]
        offset = zero.view(groups, n // block, 1, block).transpose(0, 1) - 8 * scale
        weight = torch.empty(n // block, block, k, dtype=torch.bfloat16)
        step = max(1, _DEQUANTIZE_SLICE // (block * k))  # blocks at a time: float32 temporaries stay cache-sized
        for i in range(0, n // block, step):
            blocks = slice(i, i + step)
            part = torch.empty(packed[blocks].shape[0], k, 2, block // 2)
            torch.bitwise_and(packed[blocks], 0xF, out=part[:, :, 0])
            torch.bitwise_right_shift(packed[blocks], 4, out=part[:, :, 1])
            part = part.view(-1, groups, k // groups, block).mul_(scale[blocks]).add_(offset[blocks])
            weight[blocks].copy_(part.view(-1, k, block).transpose(1, 2))
        return weight.view(n, k)


class DenseKernel(nn.Module):
    """The dequantised weight [out, in], multiplied in its own dtype."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight, persistent=False)
        self.name = f"dense-{str(weight.dtype).replace('torch.', '')}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight)


class MarlinKernel(nn.Module):
    """gptqmodel's Marlin layer, called on 2D inputs."""

    name = "marlin"

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


# --------------------------------------------------------------------------------------------------------------------
# conversions (pure tensor code, shared by the CPU and CUDA paths and checked on CPU by the tests)


def int4_rows(layer: QuantLinear) -> torch.Tensor:
    """The 4-bit integers as int32 [out, in], one output row at a time (the kernels' `[N, K]` order).

    Works on bytes (a quarter of the int32 traffic; this runs once per layer at load): byte b of a word (tensors are
    little-endian on every platform PyTorch runs on) holds input 2b in its low nibble and 2b+1 in its high one.
    """
    words, out_features = layer.qweight.shape
    data = layer.qweight.view(torch.uint8).view(words, out_features, 4).permute(1, 0, 2).contiguous()  # [out, w, 4]
    nibbles = torch.empty(out_features, words, 4, 2, dtype=torch.uint8, device=data.device)
    torch.bitwise_and(data, 0xF, out=nibbles[..., 0])
    torch.bitwise_right_shift(data, 4, out=nibbles[..., 1])
    return nibbles.view(out_features, layer.in_features).to(torch.int32)


def nibble_bytes(rows: torch.Tensor) -> torch.Tensor:
    """int32 [N, K] values in 0..15 -> uint8 [N, K/2], the even input in the high nibble (CUDA packer's input)."""
    return ((rows[:, ::2] << 4) | rows[:, 1::2]).to(torch.uint8)


def tinygemm_scales_and_zeros(scales: torch.Tensor, zero_points: torch.Tensor) -> torch.Tensor:
    """bf16 [groups, out, 2] of (scale, zero) with `scale * (q - z) == (q - 8) * scale + zero`.

    The zero is computed from the bf16-rounded scale, so the kernel's weight is exactly that scale times (q - z).
    """
    scale = scales.to(torch.bfloat16).to(torch.float32)
    zero = scale * (8 - zero_points.to(torch.float32))
    return torch.stack((scale, zero), dim=-1).to(torch.bfloat16).contiguous()


def inner_k_tiles(in_features: int) -> int | None:
    """The largest tile count (8, 4 or 2) the packers accept for this input width."""
    return next((tiles for tiles in (8, 4, 2) if in_features % (16 * tiles) == 0), None)


@functools.cache
def _cpu_packer_block() -> int | None:
    """How many outputs the CPU packer interleaves (it depends on the CPU's vector width), found by packing a probe:
    block b of `block` outputs is stored [k, block/2] with output j in the low nibble and j + block/2 in the high one.
    None when the layout is none of those (a future PyTorch): the int4 kernel is then used for any number of rows."""
    if int4_cpu_kernel_missing():
        return None
    out_features, in_features = 128, 256
    generator = torch.Generator().manual_seed(0)
    rows = torch.randint(0, 16, (out_features, in_features), dtype=torch.int32, generator=generator)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(rows, inner_k_tiles(in_features))
    for block in (64, 32, 16, 128):
        as_packed = rows.view(out_features // block, 2, block // 2, in_features).permute(0, 3, 1, 2)
        expected = (as_packed[:, :, 0] | (as_packed[:, :, 1] << 4)).to(torch.uint8)
        if packed.numel() == expected.numel() and torch.equal(packed.view(-1), expected.reshape(-1)):
            return block
    return None


def cpu_block_n(out_features: int) -> int | None:
    """The CPU packer's output block if `out_features` is whole blocks of it (see `_cpu_packer_block`), else None."""
    block = _cpu_packer_block()
    return block if block is not None and out_features % block == 0 else None


def int4_cpu_kernel_missing() -> bool:
    """True when this PyTorch has no CPU int4 kernel (or no packer for it)."""
    return not (hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
                and hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"))


def int4pack_unsupported(layer: QuantLinear, device: torch.device) -> str | None:
    """Why `layer` cannot run on the int4pack kernel on `device`, or None."""
    if layer.bits != 4:
        return f"{layer.bits}-bit weights"
    if layer.group_size not in INT4_GROUP_SIZES:
        return f"group size {layer.group_size}"
    if not layer.sequential_groups:
        return "act-order groups"
    if inner_k_tiles(layer.in_features) is None:
        return f"in_features {layer.in_features} not a multiple of 32"
    if device.type == "cpu":
        if int4_cpu_kernel_missing():
            return "this PyTorch has no CPU int4 kernel"
        if layer.out_features % CPU_N_MULTIPLE:
            return f"out_features {layer.out_features} not a multiple of {CPU_N_MULTIPLE}"
    elif device.type == "cuda":
        if not torch.cuda.is_available() or torch.cuda.get_device_capability(device) < (8, 0):
            return "the CUDA int4 kernel needs compute capability 8.0 or newer"
    else:
        return f"no int4 kernel on {device.type}"
    return None


def build_int4pack(layer: QuantLinear, device: torch.device) -> Int4PackKernel:
    """Convert `layer`'s GPTQ buffers (on any device) into an `Int4PackKernel` on `device`."""
    rows = int4_rows(layer)
    tiles = inner_k_tiles(layer.in_features)
    if device.type == "cpu":
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(rows.cpu().contiguous(), tiles)
    else:
        packed = torch.ops.aten._convert_weight_to_int4pack(nibble_bytes(rows).to(device).contiguous(), tiles)
    del rows
    scales_and_zeros = tinygemm_scales_and_zeros(layer.scales, layer.zero_points()).to(device)
    return Int4PackKernel(packed, scales_and_zeros, layer.group_size, layer.out_features)


def build_marlin(layer: QuantLinear, device: torch.device, dtype: torch.dtype) -> MarlinKernel | None:
    """gptqmodel's Marlin kernel for `layer`, if installed and applicable, else None.

    Marlin handles symmetric 4-bit weights with the fixed zero-point 8, which is what the release stores (every
    `qzeros` nibble 7); it needs out_features divisible by 64.
    """
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16) or layer.bits != 4:
        return None
    if layer.out_features % 64 or layer.bias is not None or not layer.sequential_groups:
        return None
    if not bool((layer.zero_points() == 8).all()):
        return None
    try:
        from gptqmodel.nn_modules.qlinear.marlin import MarlinQuantLinear
    except Exception:  # not installed, or built without CUDA extensions
        return None
    try:
        marlin = MarlinQuantLinear(
            bits=4, group_size=layer.group_size, desc_act=False, sym=True,
            in_features=layer.in_features, out_features=layer.out_features, bias=False,
        ).to(device)
        for name in ("qweight", "qzeros", "scales", "g_idx"):
            getattr(marlin, name).data.copy_(getattr(layer, name))
        marlin.post_init()
        return MarlinKernel(marlin.eval())
    except Exception as err:  # API drift across gptqmodel versions, unsupported GPU, ...
        logger.warning("gptqmodel Marlin kernel unavailable (%s); using PyTorch's int4 kernel", err)
        return None


# --------------------------------------------------------------------------------------------------------------------
# choosing and checking


def kernel_agrees(kernel: nn.Module, exact: Callable[[torch.Tensor], torch.Tensor],
                  exact_weight: Callable[[], torch.Tensor], in_features: int, device: torch.device,
                  dtype: torch.dtype) -> bool:
    """Whether `kernel` computes what `exact` (float32 rows in, float32 out) computes, on a few random rows, within
    `CHECK_TOLERANCE`; a CPU int4 kernel's own dequantised weight (many rows take it) against `exact_weight()`."""
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(4, in_features, generator=generator).to(device)
    expected = exact(probe).to(device)
    got = kernel(probe.to(dtype)).float()
    if got.shape != expected.shape:
        return False
    error = float((got - expected).norm() / expected.norm().clamp(min=1e-12))
    if isinstance(kernel, Int4PackKernel) and kernel.layout == "cpu" and cpu_block_n(kernel.out_features):
        weight = exact_weight().float().to(device)
        error = max(error, float((kernel.dequantize().float() - weight).norm() / weight.norm().clamp(min=1e-12)))
    return error <= CHECK_TOLERANCE


def _agrees(layer: QuantLinear, kernel: nn.Module, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `kernel` computes what the layer's exact dequantising path computes."""
    return kernel_agrees(kernel, lambda probe: layer._torch_forward(probe.to(layer.qweight.device).float()),
                         layer.dequantize, layer.in_features, device, dtype)


class KernelChooser:
    """Picks and builds each quantized layer's kernel during one load, checking each kind once per weight shape."""

    def __init__(self, device: torch.device, activation_dtype: torch.dtype):
        self.device = device
        self.dtype = activation_dtype
        self._checked: dict[tuple, bool] = {}
        self.counts: dict[str, int] = {}

    def convert(self, layer: QuantLinear, float32_dense: bool = False) -> None:
        """Give `layer` its kernel (or leave it exact when none applies), then count the choice."""
        def int4pack() -> Int4PackKernel | None:
            reason = int4pack_unsupported(layer, self.device)
            if reason is not None:
                logger.debug("%s: no int4 kernel (%s)", layer, reason)
                return None
            return build_int4pack(layer, self.device)

        if float32_dense:
            candidates = [("dense-float32", lambda: DenseKernel(layer.dequantize(torch.float32).to(self.device)))]
        else:
            candidates = [("marlin", lambda: build_marlin(layer, self.device, self.dtype)), ("int4pack", int4pack)]
        for kind, build in candidates:
            key = (kind, layer.in_features, layer.out_features, layer.group_size, layer.bits)
            if self._checked.get(key) is False:
                continue
            try:
                kernel = build()
                if kernel is None:
                    continue
                if key not in self._checked:
                    self._checked[key] = _agrees(layer, kernel, self.device, self.dtype)
                    if not self._checked[key]:
                        logger.warning("the %s kernel disagrees with the exact GPTQ path for %s; not using it",
                                       kind, key)
            except Exception as err:  # a kernel missing from this build or device: the exact path still works
                logger.warning("the %s kernel failed for %s (%s); not using it", kind, key, err)
                self._checked[key] = False
            if self._checked[key]:
                layer.use_kernel(kernel)
                self.counts[kernel.name] = self.counts.get(kernel.name, 0) + 1
                return
        self.counts["exact"] = self.counts.get("exact", 0) + 1


def convert_quantized_layers(model: nn.Module, device: torch.device | str, activation_dtype: torch.dtype
                             ) -> dict[str, int]:
    """Give every quantized layer of `model` that has none its kernel, in one explicit step: for a model moved to
    another device after its load (`load_yuan` converts as it reads). One chooser, so each kind is checked once per
    weight shape; the routers get their float32 dense copy. Returns the kernels chosen (counts)."""
    chooser = KernelChooser(torch.device(device), activation_dtype)
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear) and module.kernel is None:
            chooser.convert(module, float32_dense=bool(ROUTER_LINEAR.search(name)))
    return chooser.counts


__all__ = [
    "DenseKernel",
    "Int4PackKernel",
    "KernelChooser",
    "MarlinKernel",
    "convert_quantized_layers",
    "build_int4pack",
    "cpu_block_n",
    "int4_rows",
    "int4pack_unsupported",
    "nibble_bytes",
    "tinygemm_scales_and_zeros",
]
