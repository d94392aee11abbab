"""Modules swapped into a loaded Yuan model when weights are held in another precision than the activations (the mixed
CPU mode of `precision.py`). Each computes what the reference module of `modeling_yuan.py` computes, in the form
that is fast for its weights' dtype; `precision.apply_precision` puts them in place once, after the weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .modeling_yuan import YuanLocalizedFiltering

_FP16_GEMV_ROWS = 8  # up to this many rows, PyTorch's CPU fp16 matmul is the fast one
_HEAD_SLICE = 4096  # vocabulary rows converted to bf16 at a time beyond that


class VocabularyHead(nn.Linear):
    """The LM head (its weight possibly tied to, and held in the dtype of, the embedding), returning logits in the
    hidden states' dtype.

    A head held in fp16 on CPU is read by PyTorch's fp16 GEMV at memory speed for a token or a few, but its fp16 GEMM
    is an order of magnitude slower than bf16 for many rows (whole-prompt logits): those go through bf16 slices of
    the weight instead.
    """

    @classmethod
    def replacing(cls, head: nn.Linear) -> "VocabularyHead":
        swapped = cls.__new__(cls)
        nn.Module.__init__(swapped)
        swapped.in_features, swapped.out_features = head.in_features, head.out_features
        swapped.weight = head.weight  # the same Parameter: a tied embedding stays tied
        swapped.bias = head.bias
        return swapped

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        # Flat rows: the last position of a prompt ([b, 1, h] sliced from [b, s, h]) keeps the prompt's strides, and
        # F.linear then takes a batched-matmul path that copies the whole transposed head (seconds, not milliseconds).
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        if weight.dtype == torch.float16 and weight.device.type == "cpu" and x.shape[0] > _FP16_GEMV_ROWS:
            x = x.to(torch.bfloat16)
            slices = range(0, weight.shape[0], _HEAD_SLICE)
            logits = torch.cat([F.linear(x, weight[i : i + _HEAD_SLICE].to(torch.bfloat16)) for i in slices], dim=-1)
        else:
            logits = F.linear(x.to(weight.dtype), weight, self.bias)
        return logits.to(hidden_states.dtype).view(*hidden_states.shape[:-1], weight.shape[0])


class LocalizedFilteringGemm(YuanLocalizedFiltering):
    """The LFA filter with weights in a smaller dtype than its inputs: each kernel-2 convolution as one GEMM in the
    weights' dtype, where a bf16 Conv2d on CPU is several times slower. Same parameters as the reference."""

    @classmethod
    def replacing(cls, reference: YuanLocalizedFiltering) -> "LocalizedFilteringGemm":
        swapped = cls.__new__(cls)
        nn.Module.__init__(swapped)
        swapped.conv1, swapped.conv2 = reference.conv1, reference.conv2
        swapped.output_layernorm = reference.output_layernorm
        # Each convolution's weight laid out as [out, tap, in] in memory (same shape and values), so the two taps
        # read as one contiguous [out, 2 * in] matrix and `_taps` copies nothing.
        for conv in (swapped.conv1, swapped.conv2):
            tap_major = conv.weight.detach().permute(0, 2, 1, 3).contiguous()
            conv.weight = nn.Parameter(tap_major.permute(0, 2, 1, 3), requires_grad=conv.weight.requires_grad)
        return swapped

    @staticmethod
    def _taps(conv: nn.Conv2d, window: torch.Tensor) -> torch.Tensor:
        """The kernel-2 convolution as one GEMM: position t of the result reads `window[t]` and `window[t + 1]`."""
        weight = conv.weight.permute(0, 2, 1, 3).reshape(conv.out_channels, -1)  # [out, (tap, in)]
        pairs = torch.cat((window[:, :-1], window[:, 1:]), dim=-1).to(weight.dtype)
        return F.linear(pairs, weight, conv.bias)

    def forward(self, hidden_states: torch.Tensor, memory: torch.Tensor, window_valid: torch.Tensor) -> torch.Tensor:
        window = torch.cat((memory, hidden_states), dim=1)
        # o1 is needed at the window's positions 1..s+1 only; a position that is not a real token reads as zero.
        o1 = self._taps(self.conv1, window).masked_fill(~window_valid[:, 1:, None], 0.0)
        o2 = self._taps(self.conv2, o1).to(hidden_states.dtype)
        return self.output_layernorm(o2 + hidden_states)


__all__ = ["LocalizedFilteringGemm", "VocabularyHead"]
