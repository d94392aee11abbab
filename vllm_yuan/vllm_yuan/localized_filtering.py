"""Yuan2's Localized Filtering as a vLLM state layer: two dense causal kernel-2 convolutions along time.

`o1[t] = A0·x[t-1] + A1·x[t] + b1`, `o2[t] = B0·o1[t-1] + B1·o1[t] + b2`, output `RMSNorm(o2 + x)`, with `x[-1]` and
`o1[-1]` zero (not the bias) before a sequence's first token. Everything after position t-1 is fixed by the last two
inputs, so each sequence's state is those two rows, `[2, hidden]` in the model dtype (exact: they are inputs).

vLLM keeps the state per sequence in its hybrid cache (a `MambaBase` layer, like `ShortConv`): a prefill chunk reads
its slot only when the sequence already has computed tokens, and every chunk and decode step writes the last two
inputs back, so chunked prefill, preemption (recompute) and align-mode prefix caching all see the right memory.
vLLM's conv kernels are depthwise; these convolutions are dense (2048 -> 1024 -> 2048), so each is one GEMM over
the concatenated pair of rows it reads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from vllm.config import CacheConfig, ModelConfig, get_current_vllm_config
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.mamba.abstract import MambaBase
from vllm.model_executor.layers.mamba.mamba_utils import get_temporal_copy_spec
from vllm.model_executor.utils import set_weight_attrs
from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum

# The state: the last two filter inputs of a sequence.
STATE_ROWS = 2


def state_shape(hidden_size: int) -> tuple[tuple[int, int]]:
    return ((STATE_ROWS, hidden_size),)


def state_copy_functions():
    """Align-mode prefix caching copies a block's whole state (no speculative offsets)."""
    return (get_temporal_copy_spec,)


def _conv_weight_loader(param: nn.Parameter, loaded: torch.Tensor) -> None:
    """A checkpoint Conv2d weight [out, in, 2, 1] into the GEMM layout [out, (tap, in)]."""
    out_channels = loaded.shape[0]
    param.data.copy_(loaded.permute(0, 2, 1, 3).reshape(out_channels, -1))


class YuanLocalizedFiltering(MambaBase, nn.Module):
    """The filter of one decoder layer, replicated on every tensor-parallel rank (its input is the replicated normed
    hidden state, so every rank holds the same state)."""

    def __init__(
        self,
        hidden_size: int,
        eps: float,
        model_config: ModelConfig | None = None,
        cache_config: CacheConfig | None = None,
        prefix: str = "",
    ):
        super().__init__()
        self.hidden_size = hidden_size
        dtype = torch.get_default_dtype()
        # The checkpoint's conv1/conv2 ([out, in, 2, 1]) kept as [out, 2 * in]: tap 0 reads t-1, tap 1 reads t.
        self.conv1 = nn.Module()
        self.conv1.weight = nn.Parameter(torch.empty(hidden_size // 2, 2 * hidden_size, dtype=dtype), requires_grad=False)
        self.conv1.bias = nn.Parameter(torch.empty(hidden_size // 2, dtype=dtype), requires_grad=False)
        self.conv2 = nn.Module()
        self.conv2.weight = nn.Parameter(torch.empty(hidden_size, hidden_size, dtype=dtype), requires_grad=False)
        self.conv2.bias = nn.Parameter(torch.empty(hidden_size, dtype=dtype), requires_grad=False)
        for conv in (self.conv1, self.conv2):
            set_weight_attrs(conv.weight, {"weight_loader": _conv_weight_loader})
        self.output_layernorm = RMSNorm(hidden_size, eps=eps)

        compilation_config = get_current_vllm_config().compilation_config
        if prefix in compilation_config.static_forward_context:
            raise ValueError(f"Duplicate layer name: {prefix}")
        compilation_config.static_forward_context[prefix] = self
        self.kv_cache = (torch.tensor([]),)
        self.model_config = model_config
        self.cache_config = cache_config
        self.prefix = prefix

    # ------------------------------------------------------------------------------------------ the state

    def get_state_shape(self) -> tuple[tuple[int, int]]:
        return state_shape(self.hidden_size)

    def get_state_dtype(self) -> tuple[torch.dtype]:
        assert self.model_config is not None
        return (self.model_config.dtype,)

    @property
    def mamba_type(self) -> MambaAttentionBackendEnum:
        # The short-conv backend's metadata builder is generic (slots, prefill/decode split, initial-state flags).
        return MambaAttentionBackendEnum.SHORT_CONV

    @property
    def is_kv_cache_tp_replicated(self) -> bool:
        return True

    # ------------------------------------------------------------------------------------------ compute

    def _filter(self, window: torch.Tensor, first_is_start: bool) -> torch.Tensor:
        """Outputs for `window[..., 2:, :]` given the two rows before them; `first_is_start`: the row before the
        first output is not a token, so its conv1 output is zero, not the bias."""
        pairs = torch.cat((window[..., :-1, :], window[..., 1:, :]), dim=-1)
        o1 = F.linear(pairs, self.conv1.weight, self.conv1.bias)  # at window positions 1 ..
        if first_is_start:
            o1[..., 0, :] = 0
        o2 = F.linear(torch.cat((o1[..., :-1, :], o1[..., 1:, :]), dim=-1), self.conv2.weight, self.conv2.bias)
        return self.output_layernorm((o2 + window[..., 2:, :]).reshape(-1, self.hidden_size)).view_as(o2)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        metadata = get_forward_context().attn_metadata
        metadata = metadata.get(self.prefix) if isinstance(metadata, dict) else None
        if metadata is None:  # profile and dummy runs: the shape is what matters
            window = F.pad(hidden_states, (0, 0, STATE_ROWS, 0))
            return self._filter(window, first_is_start=True)
        output = torch.zeros_like(hidden_states)  # rows past the batch's tokens are padding

        state = self.kv_cache[0]  # [slots, 2, hidden]
        num_decodes, num_prefill_tokens = metadata.num_decode_tokens, metadata.num_prefill_tokens
        # vLLM lays decode tokens first, then the prefills' tokens; rows past them are padding.
        if num_decodes:
            slots = metadata.state_indices_tensor_d[:, 0]
            window = torch.cat((state[slots], hidden_states[:num_decodes, None]), dim=1)
            output[:num_decodes] = self._filter(window, first_is_start=False)[:, 0]
            state[slots] = window[:, 1:]
        if num_prefill_tokens:
            starts = (metadata.query_start_loc_p + num_decodes).tolist()
            slots = metadata.state_indices_tensor_p.flatten().tolist()
            resumed = metadata.has_initial_states_p.tolist()
            for index, slot in enumerate(slots):
                tokens = hidden_states[starts[index] : starts[index + 1]]
                # A sequence's first chunk starts from zeros: a reused slot holds another sequence's rows.
                memory = state[slot] if resumed[index] else tokens.new_zeros(STATE_ROWS, self.hidden_size)
                window = torch.cat((memory, tokens), dim=0)
                output[starts[index] : starts[index + 1]] = self._filter(window, first_is_start=not resumed[index])
                state[slot] = window[-STATE_ROWS:]
        return output
