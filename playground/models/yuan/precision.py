"""What runs in which precision: decided once per load from the device, the folder and the dtype asked for.

For INT4 folders with `dtype` left to "auto":

| device | int4 matmuls | embedding, lm_head | LFA convolutions | KV cache | residual stream, norms, rotary, router |
|---|---|---|---|---|---|
| CPU  | int4pack kernel, bf16 activations | fp16 (as stored) | bf16 | bf16 | float32 |
| CUDA | Marlin (if installed) or int4pack, bf16 | bf16 | bf16 | bf16 | bf16 (norm statistics, router in float32) |

On CPU PyTorch's fp16 GEMV reads the 553 MB head about 1.6x faster than its bf16 one (and fp16 is the stored
dtype), but its fp16 GEMM is slow beyond a few rows, which is why the LFA (run over whole prompts) is bf16 and why
the head computes several rows through bf16 slices (`mixed_precision.VocabularyHead`). fp32 weights would read
twice the bytes. The residual stream stays float32 because it is cheap (one 2048-vector per token) and it is where
rounding accumulates.
The router's projections are dequantised once to float32 (a few hundred KB per layer) so the expert choice does not
move with bf16 rounding. An explicit dtype runs everything in it: `float32` (or float64) is the exact mode that
dequantises GPTQ weights per call like the release's reference path; `bfloat16`/`float16` use the kernels too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from .mixed_precision import LocalizedFilteringGemm, VocabularyHead
from .modeling_yuan import YuanLocalizedFiltering

# Float weights held in `Precision.head` and `Precision.weights` (read in full every token) rather than in the
# activations' dtype.
_HEAD_WEIGHTS = re.compile(r"^(model\.embed_tokens\.weight|lm_head\.weight)$")
_FILTER_WEIGHTS = re.compile(r"^model\.layers\.\d+\.self_attn\.lf_gate\.conv[12]\.(weight|bias)$")
# Quantized layers computed in float32 from a once-dequantised weight (the attention router).
ROUTER_LINEAR = re.compile(r"\.mlp\.gate\.(query|key|value)$")
# A long prompt is computed this many tokens at a time (transformers' `prefill_chunk_size`): activations stay bounded,
# and each int4 weight dequantised for a chunk's many rows (`quant_kernels.Int4PackKernel`) serves all of them.
PREFILL_CHUNK_TOKENS = 512


def _short(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}.get(
        dtype, str(dtype).replace("torch.", "")
    )


@dataclass(frozen=True)
class Precision:
    activations: torch.dtype  # residual stream, norms, rotary
    weights: torch.dtype  # LFA convolutions
    kv_cache: torch.dtype  # cached keys and values
    kernels: bool  # GPTQ layers converted to fused kernels at load; False is the exact dequantising path
    head: torch.dtype | None = None  # embedding and (tied) lm_head; None = `weights`

    @property
    def head_dtype(self) -> torch.dtype:
        return self.head or self.weights

    @property
    def mixed(self) -> bool:
        return len({self.activations, self.weights, self.kv_cache, self.head_dtype}) > 1

    def describe(self) -> str:
        """One short line for status displays, e.g. `GPTQ kernels · fp16 head · bf16 weights/KV · fp32 activations`."""
        parts = ["GPTQ kernels" if self.kernels else "exact"]
        if not self.mixed:
            return f"{_short(self.activations)} ({parts[0]})"
        if self.head_dtype != self.weights:
            parts.append(f"{_short(self.head_dtype)} head")
        if self.kv_cache == self.weights:
            parts.append(f"{_short(self.weights)} weights/KV")
        else:
            parts += [f"{_short(self.weights)} weights", f"{_short(self.kv_cache)} KV"]
        parts.append(f"{_short(self.activations)} activations")
        return " · ".join(parts)

    def float_dtype(self, name: str) -> torch.dtype:
        """The dtype a float tensor of the state dict is held in."""
        if _HEAD_WEIGHTS.match(name):
            return self.head_dtype
        return self.weights if _FILTER_WEIGHTS.match(name) else self.activations


def resolve_precision(
    dtype: str | torch.dtype | None, device: torch.device, quantized: bool, checkpoint_dtype: torch.dtype | None
) -> Precision:
    """See the module docstring. `dtype` None or "auto" picks per device; a float dtype runs everything in it."""
    if dtype is not None and dtype != "auto":
        resolved = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
        if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
            raise ValueError(f"dtype must be a floating point torch dtype, got {dtype!r}")
        return Precision(resolved, resolved, resolved, kernels=quantized and resolved.itemsize == 2)
    if quantized:
        if device.type == "cpu":
            return Precision(torch.float32, torch.bfloat16, torch.bfloat16, kernels=True, head=torch.float16)
        return Precision(torch.bfloat16, torch.bfloat16, torch.bfloat16, kernels=True)
    if device.type == "cpu":
        return Precision(torch.float32, torch.float32, torch.float32, kernels=False)
    float_dtype = checkpoint_dtype if isinstance(checkpoint_dtype, torch.dtype) else torch.bfloat16
    return Precision(float_dtype, float_dtype, float_dtype, kernels=False)


def apply_precision(model: nn.Module, precision: Precision) -> None:
    """What follows from the precision once the weights are in place, done once after load: the modules whose fast
    form depends on their weights' dtype are swapped in (`mixed_precision.py`), and the cache dtype goes into the
    config (every `YuanCache` built from it holds keys/values in it). The model file itself stays the reference."""
    for name, module in list(model.named_modules()):
        parent_name, _, attribute = name.rpartition(".")
        if type(module) is YuanLocalizedFiltering and module.conv1.weight.dtype != precision.activations:
            setattr(model.get_submodule(parent_name), attribute, LocalizedFilteringGemm.replacing(module))
        elif name == "lm_head" and type(module) is nn.Linear:
            setattr(model, attribute, VocabularyHead.replacing(module))
    model.config.kv_cache_dtype = None if precision.kv_cache == precision.activations else _dtype_name(precision.kv_cache)
    model.compute_precision = precision


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


__all__ = ["PREFILL_CHUNK_TOKENS", "Precision", "ROUTER_LINEAR", "apply_precision", "resolve_precision"]
