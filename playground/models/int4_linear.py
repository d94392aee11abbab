"""Float linear layers that hold whole 4-bit groups, run on PyTorch's CPU int4 kernel.

A Q4_1 GGUF (the embedded SmolLM2's file) stores each group of 32 inputs as `w = d * q + m`, q in 0..15, and
transformers dequantises it to float: every such layer then runs a float32 GEMM over weights that are really 4-bit.
The levels come back exactly: a group's minimum is m (q = 0) and its maximum m + 15d (the quantiser maps a group's
extremes to 0 and 15). A layer is converted only when every group of it is recovered to float rounding, so the
embedding, the tied head (Q8 in that file) and any float checkpoint stay as they are. In tinygemm's terms
`scale = d` and `zero = m + 8d`, held in bf16, with bf16 activations: the kernel of the Yuan INT4 path
(`models/yuan/quant_kernels.py`). Decoding runs about 1.5x (two threads) to 1.75x (one thread) the float32 speed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from playground.models.yuan.quant_kernels import (
    CPU_N_MULTIPLE, Int4PackKernel, inner_k_tiles, int4_cpu_kernel_missing, kernel_agrees,
)

GROUP_SIZE = 32
LEVELS = 15
# A group is 4-bit when every weight lies within this fraction of a level of the level it rounds to.
LEVEL_TOLERANCE = 1e-3
SAMPLE_ROWS = 16  # rows checked first, so that a layer that is not 4-bit costs no pass over all its weights


class Int4Linear(nn.Module):
    """A bias-free `nn.Linear` on int4 weights in tinygemm's packed layout; inputs of any leading shape."""

    def __init__(self, kernel: Int4PackKernel, in_features: int):
        super().__init__()
        self.kernel = kernel
        self.in_features = in_features
        self.out_features = kernel.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        return self.kernel(rows).to(x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={GROUP_SIZE}"


def four_bit_groups(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(q int32 [out, in], d [out, groups], m [out, groups]) with `weight == d * q + m` in every group of
    `GROUP_SIZE` inputs, or None when some group is not 4-bit levels."""
    out_features, in_features = weight.shape
    if out_features > SAMPLE_ROWS and four_bit_groups(weight[:SAMPLE_ROWS]) is None:
        return None  # a float layer (the tied head, a float checkpoint) is told apart by its first rows
    groups = weight.detach().float().view(out_features, in_features // GROUP_SIZE, GROUP_SIZE)
    low, high = torch.aminmax(groups, dim=-1, keepdim=True)
    step = (high - low) / LEVELS
    # In place where a temporary would do: this runs over every weight of the model at each load.
    levels = (groups - low).div_(torch.where(step == 0, torch.ones_like(step), step))
    q = levels.round()
    if levels.sub_(q).abs_().amax() > LEVEL_TOLERANCE:
        return None
    return q.to(torch.int32).view(out_features, in_features), step.squeeze(-1), low.squeeze(-1)


def build_int4_linear(layer: nn.Linear) -> Int4Linear | None:
    """`layer` on the CPU int4 kernel, or None when it has a bias, a shape the packer refuses or weights that are
    not whole 4-bit groups."""
    out_features, in_features = layer.weight.shape
    tiles = inner_k_tiles(in_features)
    if layer.bias is not None or in_features % GROUP_SIZE or tiles is None or out_features % CPU_N_MULTIPLE:
        return None
    found = four_bit_groups(layer.weight)
    if found is None:
        return None
    q, step, low = found
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), tiles)
    scale = step.to(torch.bfloat16).float()  # the zero from the rounded scale, so that q = 0 is still m
    zero = low + 8 * scale
    scales_and_zeros = torch.stack((scale.t(), zero.t()), dim=-1).to(torch.bfloat16).contiguous()
    return Int4Linear(Int4PackKernel(packed, scales_and_zeros, GROUP_SIZE, out_features), in_features)


def agrees(layer: nn.Linear, converted: Int4Linear) -> bool:
    """Whether `converted` computes what `layer` does (the check the Yuan INT4 kernels get)."""
    weight = layer.weight.detach()
    return kernel_agrees(converted.kernel, lambda probe: F.linear(probe, weight.float()), lambda: weight,
                         layer.in_features, torch.device("cpu"), torch.bfloat16)


def use_int4_kernels(model: nn.Module) -> int:
    """Swap each 4-bit float linear layer of a CPU model for an `Int4Linear` (the first of each shape checked against
    the float layer); how many were swapped (0 when this PyTorch has no CPU int4 kernel)."""
    if int4_cpu_kernel_missing():
        return 0
    checked: dict[tuple[int, int], bool] = {}
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear or child.weight.device.type != "cpu":
                continue
            converted = build_int4_linear(child)
            if converted is None:
                continue
            shape = tuple(child.weight.shape)
            if shape not in checked:
                checked[shape] = agrees(child, converted)
            if checked[shape]:
                setattr(parent, name, converted)
                swapped += 1
    return swapped
