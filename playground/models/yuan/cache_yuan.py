"""Yuan2's generation cache: keys and values per layer, plus each layer's LFA memory (the two previous inputs)."""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from .configuration_yuan import YuanConfig


_MIN_CACHE_GROWTH = 256  # positions added at least when a layer's key/value buffer must grow


class YuanCacheLayer(DynamicLayer):
    """One layer's keys/values plus its LFA memory `lf_mem` [batch, 2, hidden].

    Keys and values live in buffers that grow geometrically and are filled in place, so a decoding step copies one
    position instead of the whole history (`DynamicLayer` concatenates every step). `keys`/`values` stay views of
    exactly the cached length, so the inherited bookkeeping keeps working.
    """

    # The LFA memory cannot be rolled back token by token.
    is_croppable = False

    def __init__(self, **kwargs):
        super().__init__()
        self.lf_mem: torch.Tensor | None = None
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None

    def _buffers_hold(self, past: int, total: int, key_states: torch.Tensor) -> bool:
        buffer = self._key_buffer
        return (
            buffer is not None
            and total <= buffer.shape[-2]
            and buffer.shape[:2] == key_states.shape[:2]
            and buffer.dtype == key_states.dtype
            and buffer.device == key_states.device
            # `keys` may have been replaced (beam reordering, offloading...): then the buffer is stale.
            and (past == 0 or self.keys.data_ptr() == buffer.data_ptr())
        )

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        past = self.get_seq_length()
        total = past + key_states.shape[-2]
        if not self._buffers_hold(past, total, key_states):
            capacity = total + max(_MIN_CACHE_GROWTH, total // 4)
            batch, heads, _, head_dim = key_states.shape
            self._key_buffer = key_states.new_empty(batch, heads, capacity, head_dim)
            self._value_buffer = value_states.new_empty(batch, heads, capacity, value_states.shape[-1])
            if past:
                self._key_buffer[:, :, :past] = self.keys
                self._value_buffer[:, :, :past] = self.values
        self._key_buffer[:, :, past:total] = key_states
        self._value_buffer[:, :, past:total] = value_states
        self.keys = self._key_buffer[:, :, :total]
        self.values = self._value_buffer[:, :, :total]
        return self.keys, self.values

    def reset(self) -> None:
        super().reset()
        self.lf_mem = None
        self._key_buffer = self._value_buffer = None

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise NotImplementedError("Yuan's cache cannot be cropped: the LFA memory has no history")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.lf_mem is not None:
            self.lf_mem = self.lf_mem.index_select(0, beam_idx.to(self.lf_mem.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.lf_mem is not None:
            self.lf_mem = self.lf_mem.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.lf_mem is not None:
            self.lf_mem = self.lf_mem[indices, ...]

    def offload(self):
        super().offload()
        self._key_buffer = self._value_buffer = None  # `keys` now lives on the CPU; free the device buffers
        if self.lf_mem is not None:
            self.lf_mem = self.lf_mem.to("cpu", non_blocking=True)

    def prefetch(self):
        super().prefetch()
        if self.lf_mem is not None and self.is_initialized and self.lf_mem.device != self.device:
            self.lf_mem = self.lf_mem.to(self.device, non_blocking=True)


class YuanCache(DynamicCache):
    """`DynamicCache` whose layers also keep the LFA memory. `generate` creates one automatically."""

    def __init__(self, config: YuanConfig | None = None, num_layers: int | None = None, offloading: bool = False):
        if num_layers is None:
            if config is None:
                raise ValueError("YuanCache needs the model config or num_layers")
            num_layers = config.num_hidden_layers
        Cache.__init__(self, layers=[YuanCacheLayer() for _ in range(num_layers)], offloading=offloading)

    def get_lf_memory(self, layer_idx: int) -> torch.Tensor | None:
        return self.layers[layer_idx].lf_mem

    def set_lf_memory(self, memory: torch.Tensor, layer_idx: int) -> None:
        self.layers[layer_idx].lf_mem = memory


__all__ = ["YuanCache", "YuanCacheLayer"]
