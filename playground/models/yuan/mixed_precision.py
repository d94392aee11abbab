"""The two computations that change form when weights or caches are held in lower precision than the activations
(the mixed CPU mode of `precision.py`): a decoding step's attention over a bf16 cache, and the vocabulary projection
through an fp16 head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


_DECODE_KEY_CHUNK = 256  # keys upcast at a time by `attend_one_query` (4 MB of float32 at full size: cache-resident)


def attend_one_query(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """A decoding step's attention [b, h, 1, d] over a cache held in lower precision, computed in float32.

    PyTorch's CPU SDPA is several times slower for one query over bf16 keys than over float32 ones, and upcasting the
    whole cache would read twice its bytes; so keys and values are upcast a chunk at a time, while they are in the
    CPU caches, and the scores and softmax stay float32. `mask` is SDPA's boolean mask (True = attend) or None.
    """
    length = key.shape[-2]
    chunks = range(0, length, _DECODE_KEY_CHUNK)
    scaled = (query.to(torch.float32) * scale).transpose(-1, -2)  # [b, h, d, 1]
    scores = torch.cat([torch.matmul(key[:, :, i : i + _DECODE_KEY_CHUNK].float(), scaled) for i in chunks], dim=-2)
    scores = scores.transpose(-1, -2)  # [b, h, 1, length]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    output = None
    for i in chunks:
        part = torch.matmul(weights[..., i : i + _DECODE_KEY_CHUNK], value[:, :, i : i + _DECODE_KEY_CHUNK].float())
        output = part if output is None else output + part
    return output.to(query.dtype)


_FP16_GEMV_ROWS = 8  # up to this many rows, PyTorch's CPU fp16 matmul is the fast one
_HEAD_SLICE = 4096  # vocabulary rows converted to bf16 at a time beyond that


def vocabulary_logits(lm_head: nn.Linear, hidden_states: torch.Tensor) -> torch.Tensor:
    """`lm_head(hidden_states)` in the hidden states' dtype, the head possibly held in another one.

    A head held in fp16 on CPU (the mixed CPU mode) is read by PyTorch's fp16 GEMV at memory speed for a token or
    a few, but its fp16 GEMM is an order of magnitude slower than bf16 for many rows (whole-prompt logits): those go
    through bf16 slices of the weight instead.
    """
    weight = lm_head.weight
    rows = hidden_states.shape[:-1].numel()
    if weight.dtype == torch.float16 and weight.device.type == "cpu" and rows > _FP16_GEMV_ROWS:
        x = hidden_states.to(torch.bfloat16)
        slices = range(0, weight.shape[0], _HEAD_SLICE)
        logits = torch.cat([F.linear(x, weight[i : i + _HEAD_SLICE].to(torch.bfloat16)) for i in slices], dim=-1)
    else:
        logits = lm_head(hidden_states.to(weight.dtype))
    return logits.to(hidden_states.dtype)


__all__ = ["attend_one_query", "vocabulary_logits"]
