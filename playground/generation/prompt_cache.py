"""The prompt cache: what recent requests computed (keys/values, Yuan's LFA inputs, expert routing), kept so that a
request starting with the same tokens prefills only the rest. A chat's next turn, a Regenerate, each setting of a lab
run, the next-token explorer and the APIs all go through it.

As in vLLM's automatic prefix caching, sequences are held in blocks of `BLOCK_TOKENS` tokens, in a tree keyed by
their tokens: prompts that begin alike share the blocks of their beginning. A sequence's last, partial block is kept
too, and a request may use the first part of any block, so it resumes at its longest common prefix with anything
cached, always leaving at least one token to compute (the next-token logits come from it). A resumed request gets a
copy: the stored blocks never change. Blocks are evicted least recently used first, leaves before their parents, to
stay within a byte budget.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import psutil
import torch
from transformers.cache_utils import Cache

from playground.models.growing_cache import GrowingLayer, growing_cache

BLOCK_TOKENS = 16
_AUTO_SHARE = 0.25  # of the memory free once the model is loaded, for the default budget
_AUTO_CAP_BYTES = 8 * 2**30


def default_budget_bytes(device: str) -> int:
    """A quarter of the memory free on `device` now (after the model loaded), at most 8 GiB."""
    if device.startswith("cuda") and torch.cuda.is_available():
        free = torch.cuda.mem_get_info(torch.device(device))[0]
    else:
        free = psutil.virtual_memory().available
    return int(min(free * _AUTO_SHARE, _AUTO_CAP_BYTES))


def empty_cache(model) -> Cache:
    """A fresh cache of the kind `generate` builds for `model`, growing in place (Yuan's keeps its LFA inputs too)."""
    if model.config.model_type == "yuan":
        from playground.models.yuan.cache_yuan import YuanCache

        return YuanCache(model.config)
    return growing_cache(model.config)


def resumable(cache: Cache) -> bool:
    """Whether every layer of `cache` can hand out and take back what it holds per position (`GrowingLayer`s; a
    sliding window forgets)."""
    return all(isinstance(layer, GrowingLayer) for layer in cache.layers)


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass(eq=False)
class _Block:
    tokens: tuple[int, ...]
    parent: "_Block | None"
    layers: list[list[torch.Tensor]]  # per cache layer, its per-position tensors over these tokens
    extras: list[torch.Tensor] | None  # per-position data beside the cache (expert routing), sequence on dim -2
    nbytes: int
    children: dict[tuple[int, ...], "_Block"] = field(default_factory=dict)


@dataclass
class Reuse:
    """What a lookup found: `tokens` positions already computed, in `cache` (a copy, ready to extend)."""

    tokens: int
    cache: Cache
    extras: list[torch.Tensor] | None = None  # over those positions, when every block used had them


def _common_prefix(a, b) -> int:
    count = 0
    for x, y in zip(a, b):
        if x != y:
            break
        count += 1
    return count


def longest_resume(prompt_tokens: int, step: int = 1) -> int:
    """The most of a prompt the cache can give: all but its last token (whose logits choose the next one), in whole
    steps of `step`."""
    return (prompt_tokens - 1) // step * step


def _whole_steps(chain: list[tuple["_Block", int]], step: int) -> list[tuple["_Block", int]]:
    """The beginning of `chain` that covers a multiple of `step` positions."""
    keep = longest_resume(sum(used for _, used in chain) + 1, step)
    trimmed = []
    for block, used in chain:
        if keep <= 0:
            break
        trimmed.append((block, min(used, keep)))
        keep -= used
    return trimmed


class PromptCache:
    """Blocks of recent sequences within `budget_bytes` (0 turns the cache off). Thread-safe; the lookups and stores
    themselves run on the device's generation thread, where their tensor copies belong."""

    def __init__(self, budget_bytes: int, block_tokens: int = BLOCK_TOKENS):
        self.budget_bytes = max(0, int(budget_bytes))
        self.block_tokens = block_tokens
        self._root = _Block((), None, [], None, 0)
        self._lru: OrderedDict[int, _Block] = OrderedDict()  # oldest first; ancestors always after descendants
        self._lock = threading.Lock()
        self.bytes = 0
        self.tokens = 0
        self.lookups = 0
        self.hits = 0
        self.reused_tokens = 0

    def lookup(self, model, ids: list[int], step: int = 1) -> Reuse:
        """A cache for `model` holding the longest cached beginning of `ids` (leaving at least its last token) whose
        length is a multiple of `step` (a model that computes prompts in aligned chunks resumes only between two)."""
        with self._lock:
            self.lookups += 1
            chain = _whole_steps(self._match(ids), step)
            self._touch([block for block, _ in chain])
            if chain:
                self.hits += 1
                self.reused_tokens += sum(used for _, used in chain)
        cache = empty_cache(model)
        if not chain:
            return Reuse(0, cache)
        for index, layer in enumerate(cache.layers):
            layer.load_sequence([[t[..., :used, :] for t in block.layers[index]] for block, used in chain])
        extras = None
        if all(block.extras is not None for block, _ in chain):
            extras = [torch.cat([block.extras[i][..., :used, :] for block, used in chain], dim=-2)
                      for i in range(len(chain[0][0].extras))]
        return Reuse(sum(used for _, used in chain), cache, extras)

    def _match(self, ids: list[int]) -> list[tuple[_Block, int]]:
        limit = longest_resume(len(ids))
        chain: list[tuple[_Block, int]] = []
        node, position = self._root, 0
        while position < limit:
            window = tuple(ids[position:position + self.block_tokens])
            child = node.children.get(window)
            if child is not None and len(window) == self.block_tokens and position + len(window) <= limit:
                chain.append((child, len(window)))
                node, position = child, position + len(window)
                continue
            # The block sharing the longest beginning with what follows, used in part; the chain ends there.
            best, used = None, 0
            for candidate in node.children.values():
                shared = min(_common_prefix(candidate.tokens, window), limit - position)
                if shared > used:
                    best, used = candidate, shared
            if best is not None:
                chain.append((best, used))
            break
        return chain

    def store(self, ids: list[int], cache: Cache, extras: list[torch.Tensor] | None = None) -> None:
        """Keep what `cache` holds for the positions of `ids` (exactly), and `extras` over the same positions.

        The cache is used up: each layer is let go once its blocks are copied, so storing needs one layer's worth of
        memory beyond the blocks rather than a second copy of the whole cache.
        """
        if self.budget_bytes == 0 or not ids or not resumable(cache):
            return
        if cache.get_seq_length() != len(ids):
            raise ValueError(f"the cache holds {cache.get_seq_length()} positions, not the {len(ids)} tokens given")
        per_position = sum(_bytes(t[..., :1, :] for t in layer.sequence_tensors()) for layer in cache.layers)
        per_position += _bytes(e[..., :1, :] for e in extras or [])
        with self._lock:
            node, path, new, reserved = self._root, [], [], 0
            for start in range(0, len(ids), self.block_tokens):
                tokens = tuple(ids[start:start + self.block_tokens])
                child = node.children.get(tokens)
                if child is None:
                    nbytes = per_position * len(tokens)
                    if not self._make_room(reserved + nbytes, protected=set(map(id, path))):
                        break  # the rest does not fit even after evicting everything else
                    reserved += nbytes
                    child = _Block(tokens, node, [], [] if extras is not None else None, nbytes)
                    new.append((child, start))
                path.append(child)
                node = child
            for layer in cache.layers:
                tensors = layer.sequence_tensors()
                for block, start in new:
                    block.layers.append([t[..., start:start + len(block.tokens), :].clone() for t in tensors])
                layer.reset()
            for block, start in new:
                if extras is not None:
                    block.extras = [e[..., start:start + len(block.tokens), :].clone() for e in extras]
                self._adopt(block.parent, block)
            self._touch(path)

    def _adopt(self, parent: _Block, child: _Block) -> None:
        # A partial block that the new one extends serves nothing the new one does not.
        for tokens, sibling in list(parent.children.items()):
            if len(tokens) < len(child.tokens) and child.tokens[:len(tokens)] == tokens and not sibling.children:
                self._remove(sibling)
        parent.children[child.tokens] = child
        self._lru[id(child)] = child
        self.bytes += child.nbytes
        self.tokens += len(child.tokens)

    def _remove(self, block: _Block) -> None:
        del block.parent.children[block.tokens]
        del self._lru[id(block)]
        self.bytes -= block.nbytes
        self.tokens -= len(block.tokens)

    def _touch(self, chain: list[_Block]) -> None:
        """Most recent last, the chain's root-most block last of all: so the oldest block is always a leaf."""
        for block in reversed(chain):
            if id(block) in self._lru:
                self._lru.move_to_end(id(block))

    def _make_room(self, nbytes: int, protected: set[int]) -> bool:
        """Evict until `nbytes` more fit in the budget; False when only `protected` blocks are left."""
        while self.bytes + nbytes > self.budget_bytes:
            victim = next((b for key, b in self._lru.items() if not b.children and key not in protected), None)
            if victim is None:
                return False
            self._remove(victim)
        return True

    def clear(self) -> None:
        with self._lock:
            self._root.children.clear()
            self._lru.clear()
            self.bytes = self.tokens = 0

    def resize(self, budget_bytes: int) -> None:
        """A new budget, evicting what no longer fits (0 empties the cache and turns it off)."""
        with self._lock:
            self.budget_bytes = max(0, int(budget_bytes))
            self._make_room(0, protected=set())

    def stats(self) -> dict[str, int]:
        """What the memory panel and the status show."""
        with self._lock:
            return {"bytes": self.bytes, "budget_bytes": self.budget_bytes, "blocks": len(self._lru),
                    "tokens": self.tokens, "lookups": self.lookups, "hits": self.hits,
                    "reused_tokens": self.reused_tokens}


__all__ = ["BLOCK_TOKENS", "PromptCache", "Reuse", "default_budget_bytes", "empty_cache", "longest_resume",
           "resumable"]
