"""Yuan2's generation cache: keys and values per layer, plus each layer's Localized Filtering inputs.

The LFA filter at position t reads the layer's inputs at t-2 and t-1 (its "memory"). The cache keeps those inputs for
every position, not only the last two, so a cache can be cut back to any length (`crop`) and a new request can resume
from any prefix of an earlier one (the playground's prompt cache) with the memory exactly as a cold run has it.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicCache

from ..growing_cache import GrowingLayer
from .configuration_yuan import YuanConfig


class YuanCacheLayer(GrowingLayer):
    """One layer's keys/values [batch, heads, seq, head_dim] plus `lf_inputs` [batch, seq, hidden], the LFA filter's
    input at every cached position (held in the dtype the filter computes in, so nothing is rounded away). All three
    grow in place (`GrowingLayer`)."""

    sequence_names = ("keys", "values", "lf_inputs")

    def __init__(self, kv_dtype: torch.dtype | None = None, **kwargs):
        super().__init__()
        self.kv_dtype = kv_dtype  # keys/values are held in this dtype; None = as given
        self.lf_inputs: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        dtype = self.kv_dtype or key_states.dtype
        return super().update(key_states.to(dtype), value_states.to(dtype), *args, **kwargs)

    def append_lf_inputs(self, inputs: torch.Tensor) -> None:
        """Record the filter's inputs [batch, new, hidden] of the positions being added."""
        self._append("lf_inputs", inputs, self.lf_inputs.shape[-2] if self.lf_inputs is not None else 0)

    def lf_memory(self) -> torch.Tensor | None:
        """The filter's memory [batch, 2, hidden]: the inputs of the last two positions, zero before the sequence."""
        if self.lf_inputs is None or self.lf_inputs.shape[-2] == 0:
            return None
        last = self.lf_inputs[:, -2:]
        if last.shape[1] < 2:
            last = torch.cat((last.new_zeros(last.shape[0], 2 - last.shape[1], last.shape[2]), last), dim=1)
        return last

    def reset(self) -> None:
        super().reset()
        self.lf_inputs = None

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if tokens_to_remove and self.lf_inputs is not None:
            self.lf_inputs = self.lf_inputs[:, : -abs(tokens_to_remove)]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.lf_inputs is not None:
            self.lf_inputs = self.lf_inputs.index_select(0, beam_idx.to(self.lf_inputs.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.lf_inputs is not None:
            self.lf_inputs = self.lf_inputs.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.lf_inputs is not None:
            self.lf_inputs = self.lf_inputs[indices, ...]

    def offload(self):
        super().offload()
        if self.lf_inputs is not None:
            self.lf_inputs = self.lf_inputs.to("cpu", non_blocking=True)

    def prefetch(self):
        super().prefetch()
        if self.lf_inputs is not None and self.is_initialized and self.lf_inputs.device != self.device:
            self.lf_inputs = self.lf_inputs.to(self.device, non_blocking=True)


class YuanCache(DynamicCache):
    """`DynamicCache` whose layers also keep the LFA filter's inputs, and hold keys/values in the config's
    `kv_cache_dtype` when it names one. `generate` creates one automatically."""

    def __init__(self, config: YuanConfig | None = None, num_layers: int | None = None, offloading: bool = False):
        if num_layers is None:
            if config is None:
                raise ValueError("YuanCache needs the model config or num_layers")
            num_layers = config.num_hidden_layers
        kv_dtype_name = getattr(config, "kv_cache_dtype", None)
        kv_dtype = getattr(torch, kv_dtype_name) if kv_dtype_name else None
        layers = [YuanCacheLayer(kv_dtype) for _ in range(num_layers)]
        Cache.__init__(self, layers=layers, offloading=offloading)

    def get_lf_memory(self, layer_idx: int) -> torch.Tensor | None:
        """Layer `layer_idx`'s filter memory [batch, 2, hidden] (None before the first token)."""
        return self.layers[layer_idx].lf_memory()

    def append_lf_inputs(self, inputs: torch.Tensor, layer_idx: int) -> None:
        self.layers[layer_idx].append_lf_inputs(inputs)


__all__ = ["YuanCache", "YuanCacheLayer"]
