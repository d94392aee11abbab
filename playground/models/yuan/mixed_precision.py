"""A computation that changes form when weights are held in lower precision than the activations (the mixed CPU mode
of `precision.py`): the vocabulary projection through an fp16 head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


_FP16_GEMV_ROWS = 8  # up to this many rows, PyTorch's CPU fp16 matmul is the fast one
_HEAD_SLICE = 4096  # vocabulary rows converted to bf16 at a time beyond that


def vocabulary_logits(lm_head: nn.Linear, hidden_states: torch.Tensor) -> torch.Tensor:
    """`lm_head(hidden_states)` in the hidden states' dtype, the head possibly held in another one.

    A head held in fp16 on CPU (the mixed CPU mode) is read by PyTorch's fp16 GEMV at memory speed for a token or
    a few, but its fp16 GEMM is an order of magnitude slower than bf16 for many rows (whole-prompt logits): those go
    through bf16 slices of the weight instead.
    """
    weight = lm_head.weight
    # Flat rows: the last position of a prompt ([b, 1, h] sliced from [b, s, h]) keeps the prompt's strides, and
    # F.linear then takes a batched-matmul path that copies the whole transposed head (seconds, not milliseconds).
    x = hidden_states.reshape(-1, hidden_states.shape[-1])
    if weight.dtype == torch.float16 and weight.device.type == "cpu" and x.shape[0] > _FP16_GEMV_ROWS:
        x = x.to(torch.bfloat16)
        slices = range(0, weight.shape[0], _HEAD_SLICE)
        logits = torch.cat([F.linear(x, weight[i : i + _HEAD_SLICE].to(torch.bfloat16)) for i in slices], dim=-1)
    else:
        logits = lm_head(x.to(weight.dtype))
    return logits.to(hidden_states.dtype).view(*hidden_states.shape[:-1], weight.shape[0])


__all__ = ["vocabulary_logits"]
