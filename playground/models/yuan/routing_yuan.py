"""Recording which experts every token went to (`YuanForCausalLM.record_routing()`), beside the model."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class YuanRoutingTrace:
    """Experts chosen for every token in every layer, recorded by `YuanForCausalLM.record_routing()`.

    Each forward pass appends one entry per layer (prefill: the prompt, then one token per decoding step); rows of a
    left-padded batch include their padding positions. The tensors stay on the model's device until read.
    """

    num_layers: int
    _experts: list[list[torch.Tensor]] = field(init=False, repr=False)
    _weights: list[list[torch.Tensor]] = field(init=False, repr=False)

    def __post_init__(self):
        self._experts = [[] for _ in range(self.num_layers)]
        self._weights = [[] for _ in range(self.num_layers)]

    def add(self, layer_idx: int, experts: torch.Tensor, weights: torch.Tensor) -> None:
        self._experts[layer_idx].append(experts.detach())
        self._weights[layer_idx].append(weights.detach())

    def record_moe_output(self, layer_idx: int, moe, inputs, output) -> None:
        """A forward hook on layer `layer_idx`'s `YuanMoE`: its output is (hidden, router logits, experts, weights)."""
        batch, tokens = inputs[0].shape[:2]
        _, _, experts, weights = output
        self.add(layer_idx, experts.view(batch, tokens, -1), weights.view(batch, tokens, -1))

    def __len__(self) -> int:
        return sum(chunk.shape[1] for chunk in self._experts[0]) if self.num_layers else 0

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(experts int64, weights float32), each [layers, batch, tokens, top_k], on the CPU."""
        if not self._experts or not self._experts[0]:
            raise ValueError("no routing was recorded")
        experts = torch.stack([torch.cat(chunks, dim=1) for chunks in self._experts]).cpu()
        weights = torch.stack([torch.cat(chunks, dim=1) for chunks in self._weights]).cpu()
        return experts, weights


__all__ = ["YuanRoutingTrace"]
