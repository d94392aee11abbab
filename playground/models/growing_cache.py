"""A transformers cache layer whose per-position tensors grow in place, and a `DynamicCache` made of them.

`DynamicLayer` concatenates its keys and values at every step: a decoding step copies the whole history and leaves
the old tensors to the allocator, so a long reply costs time quadratic in its length and memory the allocator keeps.
`GrowingLayer` writes each step into buffers that grow geometrically; `keys`/`values` stay views of exactly the
cached length, so transformers' own bookkeeping (lengths, crop, masks) keeps working. It can also hand out and take
back what it holds per position (`sequence_tensors`, `load_sequence`), which the playground's prompt cache uses.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

_MIN_GROWTH = 256  # positions added at least when a buffer must grow


def appended(buffer: torch.Tensor | None, current: torch.Tensor | None, past: int, states: torch.Tensor):
    """`current` (its first `past` positions along dim -2) extended by `states`, written in place into `buffer` when
    it holds them, else into a new buffer grown geometrically. Returns (buffer, view of the filled part)."""
    total = past + states.shape[-2]
    fits = (
        buffer is not None
        and total <= buffer.shape[-2]
        and buffer.shape[:-2] == states.shape[:-2]
        and buffer.shape[-1] == states.shape[-1]
        and buffer.dtype == states.dtype
        and buffer.device == states.device
        # `current` may have been replaced (beam reordering, offloading...): then the buffer is stale.
        and (past == 0 or current.data_ptr() == buffer.data_ptr())
    )
    if not fits:
        grown = states.new_empty(*states.shape[:-2], total + max(_MIN_GROWTH, total // 4), states.shape[-1])
        if past:
            grown[..., :past, :] = current[..., :past, :]
        buffer = grown
    buffer[..., past:total, :] = states
    return buffer, buffer[..., :total, :]


class GrowingLayer(DynamicLayer):
    """Keys/values [batch, heads, seq, head_dim] in buffers filled in place (see the module docstring)."""

    # What the layer holds per position, each with the sequence on dim -2; subclasses add their own.
    sequence_names: tuple[str, ...] = ("keys", "values")

    def __init__(self, **kwargs):
        super().__init__()
        self._storage: dict[str, torch.Tensor] = {}

    def _append(self, name: str, states: torch.Tensor, past: int) -> None:
        self._storage[name], view = appended(self._storage.get(name), getattr(self, name), past, states)
        setattr(self, name, view)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        past = self.get_seq_length()
        self._append("keys", key_states, past)
        self._append("values", value_states, past)
        return self.keys, self.values

    def sequence_tensors(self) -> list[torch.Tensor]:
        return [getattr(self, name) for name in self.sequence_names]

    def load_sequence(self, pieces: list[list[torch.Tensor]]) -> None:
        """Fill this empty layer from consecutive pieces of `sequence_tensors()`: one buffer each, one copy."""
        total = sum(piece[0].shape[-2] for piece in pieces)
        room = total + max(_MIN_GROWTH, total // 4)
        self.lazy_initialization(pieces[0][0], pieces[0][1])
        for index, name in enumerate(self.sequence_names):
            first = pieces[0][index]
            buffer = first.new_empty(*first.shape[:-2], room, first.shape[-1])
            position = 0
            for piece in pieces:
                end = position + piece[index].shape[-2]
                buffer[..., position:end, :] = piece[index]
                position = end
            self._storage[name] = buffer
            setattr(self, name, buffer[..., :total, :])

    def reset(self) -> None:
        super().reset()
        self._storage = {}

    def offload(self):
        super().offload()
        self._storage = {}  # the views now live on the CPU


def growing_cache(config) -> DynamicCache:
    """The `DynamicCache` that `generate` would build for `config`, its plain layers growing in place (sliding-window
    layers stay as they are)."""
    cache = DynamicCache(config=config)
    cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


__all__ = ["GrowingLayer", "appended", "growing_cache"]
