"""Native PyTorch implementation of Yuan2.0-M32 for transformers 5 (no remote code, no flash-attn).

Each decoder layer is `h = x + Attn(RMSNorm(x))`, `out = h + MoE(RMSNorm(h))`:

- Attention filters its normed input with Localized Filtering (two causal kernel-2 convolutions) before the Q/K
  projections; V comes from the unfiltered input. Q and K projections are concatenated and cut per head, rotary
  embedding rotates the first half of each head with a bf16-built table like the release.
- The MoE routes each token with an "attention router" (outer-product softmax over 32 expert scores), keeps the top
  2 experts, renormalises their weights and sums their SwiGLU outputs.

Generation keeps, per layer, keys/values and the LFA filter's inputs (its memory is the last two) in `YuanCache`.
Padding is handled: padded positions are zeroed before the filter and masked as keys, positions come from the
attention mask's cumulative sum.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.utils.deprecation import deprecate_kwarg

from .cache_yuan import YuanCache
from .configuration_yuan import YuanConfig
from .routing_yuan import YuanRoutingTrace

# ---------------------------------------------------------------------------------------------------------------------
# Building blocks


class YuanRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        # The variance is taken in float32 (float64 inputs keep their precision).
        hidden_states = hidden_states.to(torch.promote_types(input_dtype, torch.float32))
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class YuanRotaryEmbedding(nn.Module):
    """cos/sin tables for the rotated part of each head (its first `rotary_dims` dims).

    Like the release, the table is built once for `max_position_embeddings` positions with the positions, inverse
    frequencies, their products and cos/sin all in bfloat16 (so position 257 reads the row of 256), then kept in
    float32. `config.rotary_table_dtype = "float32"` builds an exact table instead. Positions beyond the table
    extend it with the same recipe.
    """

    def __init__(self, config: YuanConfig):
        super().__init__()
        self.dim = config.rotary_dims
        self.base = float(config.rotary_base)
        self.table_dtype = torch.bfloat16 if config.rotary_table_dtype == "bfloat16" else torch.float32
        self.max_position_embeddings = config.max_position_embeddings
        # Plain attributes, not buffers: they are derived, never saved, and survive meta-device construction.
        self._cos: torch.Tensor | None = None
        self._sin: torch.Tensor | None = None

    def _build_table(self, num_positions: int, device: torch.device) -> None:
        inv_freq = 1.0 / (self.base ** (torch.arange(0, self.dim, 2, dtype=torch.float32, device=device) / self.dim))
        positions = torch.arange(num_positions, device=device).to(self.table_dtype)
        freqs = torch.outer(positions, inv_freq.to(self.table_dtype))
        angles = torch.cat((freqs, freqs), dim=-1)
        self._cos = angles.cos().to(torch.float32)
        self._sin = angles.sin().to(torch.float32)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [batch, seq, rotary_dims] for `position_ids` [batch, seq]."""
        needed = int(position_ids.max()) + 1 if position_ids.numel() else 1
        if self._cos is None or self._cos.device != position_ids.device or needed > self._cos.shape[0]:
            size = self.max_position_embeddings
            while size < needed:
                size *= 2
            self._build_table(size, position_ids.device)
        return self._cos[position_ids].to(dtype), self._sin[position_ids].to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first `cos.shape[-1]` dims of x [batch, heads, seq, head_dim]; the rest pass through."""
    rotary_dims = cos.shape[-1]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rotated, passed = x[..., :rotary_dims], x[..., rotary_dims:]
    rotated = rotated * cos + rotate_half(rotated) * sin
    return torch.cat((rotated, passed), dim=-1)


class YuanLocalizedFiltering(nn.Module):
    """Localized Filtering: two causal kernel-2 convolutions along time, a residual and an RMSNorm.

    `o1[t] = A0·x[t-1] + A1·x[t] + b1`, `o2[t] = B0·o1[t-1] + B1·o1[t] + b2`, output `RMSNorm(o2 + x)`. Before the
    first token both `x[-1]` and `o1[-1]` are zero (not the bias).
    """

    def __init__(self, config: YuanConfig):
        super().__init__()
        hidden = config.hidden_size
        self.conv1 = nn.Conv2d(hidden, hidden // 2, kernel_size=(2, 1), stride=(1, 1), padding=(1, 0), bias=True)
        self.conv2 = nn.Conv2d(hidden // 2, hidden, kernel_size=(2, 1), stride=(1, 1), padding=(1, 0), bias=True)
        self.output_layernorm = YuanRMSNorm(hidden, eps=config.rms_norm_eps)

    @property
    def input_dtype(self) -> torch.dtype:
        """The dtype the filter reads its inputs in: holding them in it (the cache's memory) loses nothing."""
        return self.conv1.weight.dtype

    def forward(self, hidden_states: torch.Tensor, memory: torch.Tensor, window_valid: torch.Tensor) -> torch.Tensor:
        """Filter `hidden_states` [b, s, h] given the two inputs before them.

        `memory` [b, 2, h] holds the previous two (zeroed where they are padding or before the sequence);
        `window_valid` [b, s + 2] says which of those s + 2 positions are real tokens.
        """
        seq_len = hidden_states.shape[1]
        window = torch.cat((memory, hidden_states), dim=1)
        # Conv2d over [b, h, time, 1]; its padding of one step on both ends makes position t see t-1 and t.
        o1 = self.conv1(window.transpose(1, 2).unsqueeze(-1))[:, :, : seq_len + 2]
        # Where the position is not a real token the filter's input must read as zero, not as the bias.
        o1 = o1.masked_fill(~window_valid[:, None, :, None], 0.0)
        o2 = self.conv2(o1)[:, :, 2 : seq_len + 2]
        o2 = o2.squeeze(-1).transpose(1, 2)
        return self.output_layernorm(o2 + hidden_states)


class YuanAttention(nn.Module):
    """Causal self-attention over LFA-filtered queries/keys.

    The Q/K layout follows the release: `cat(q_proj(x), k_proj(x))` is viewed as [heads, 2 * head_dim] and split,
    so heads 0..H/2-1 take both query and key from `q_proj` and the others from `k_proj`.
    """

    def __init__(self, config: YuanConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        projection = config.attention_projection_size
        self.scaling = self.head_dim**-0.5
        self.q_proj = nn.Linear(config.hidden_size, projection, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, projection, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, projection, bias=False)
        self.o_proj = nn.Linear(projection, config.hidden_size, bias=False)
        self.lf_gate = YuanLocalizedFiltering(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        batch_masks: "_BatchMasks",
        cache: YuanCache | None = None,
    ) -> torch.Tensor:
        batch, seq_len, _ = hidden_states.shape
        if batch_masks.current_valid is not None:
            hidden_states = hidden_states.masked_fill(~batch_masks.current_valid[..., None], 0.0)

        value = self.v_proj(hidden_states).view(batch, seq_len, self.num_heads, self.head_dim).transpose(1, 2)

        memory = cache.get_lf_memory(self.layer_idx) if cache is not None else None
        if memory is None:
            memory = hidden_states.new_zeros(batch, 2, hidden_states.shape[-1])
        filtered = self.lf_gate(hidden_states, memory.to(hidden_states.dtype), batch_masks.window_valid)
        if cache is not None:
            # Every position's filter input, so the cache can be cut or resumed anywhere (see cache_yuan.py).
            cache.append_lf_inputs(hidden_states.to(self.lf_gate.input_dtype), self.layer_idx)

        query_key = torch.cat((self.q_proj(filtered), self.k_proj(filtered)), dim=-1)
        query_key = query_key.view(batch, seq_len, self.num_heads, 2 * self.head_dim)
        query, key = query_key.split(self.head_dim, dim=-1)
        query, key = query.transpose(1, 2), key.transpose(1, 2)

        cos, sin = position_embeddings
        query = apply_rotary_pos_emb(query, cos, sin)
        key = apply_rotary_pos_emb(key, cos, sin)

        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)

        # The cache may hold keys/values in a smaller dtype (`config.kv_cache_dtype`): the query is rounded to it too
        # (as the release's fp16 attention rounds it). The CPU's bf16 SDPA keeps scores, softmax and sums in float32
        # and reads the cache once, several times faster than upcasting the cache.
        output = F.scaled_dot_product_attention(
            query.to(key.dtype),
            key,
            value,
            attn_mask=batch_masks.attention,
            is_causal=batch_masks.attention is None and batch_masks.causal,
            scale=self.scaling,
        )
        output = output.transpose(1, 2).reshape(batch, seq_len, self.num_heads * self.head_dim)
        return self.o_proj(output.to(hidden_states.dtype))


class YuanRouter(nn.Module):
    """Attention router: per token, `softmax_j(q_i * k_j) @ v` over the expert axis, in (at least) float32."""

    def __init__(self, config: YuanConfig):
        super().__init__()
        self.query = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.key = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.value = nn.Linear(config.hidden_size, config.num_experts, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Router logits [tokens, experts] (float32) for hidden_states [tokens, hidden]."""
        # float32 like the release (float64 stays float64, for exactness tests).
        dtype = torch.promote_types(hidden_states.dtype, torch.float32)
        query = self.query(hidden_states).to(dtype).unsqueeze(-1)
        key = self.key(hidden_states).to(dtype).unsqueeze(-1)
        value = self.value(hidden_states).to(dtype).unsqueeze(-1)
        scores = torch.softmax(torch.matmul(query, key.transpose(1, 2)), dim=-1)  # [tokens, experts, experts]
        return torch.matmul(scores, value).squeeze(-1)


class YuanExpertMLP(nn.Module):
    """SwiGLU expert: `w2(silu(a) * b)` with `a, b` the halves of `w1(x)`."""

    def __init__(self, config: YuanConfig):
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, 2 * config.expert_hidden_size, bias=False)
        self.w2 = nn.Linear(config.expert_hidden_size, config.hidden_size, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        gate, up = self.w1(hidden_states).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


def route_tokens(router_logits: torch.Tensor, top_k: int, normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(expert indices, weights) [tokens, top_k]: softmax, top-k, then renormalise the k weights."""
    probabilities = torch.softmax(router_logits, dim=-1)
    weights, experts = torch.topk(probabilities, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return experts, weights


class YuanMoE(nn.Module):
    def __init__(self, config: YuanConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.normalize = config.norm_topk_prob
        self.gate = YuanRouter(config)
        self.experts = nn.ModuleList(YuanExpertMLP(config) for _ in range(config.num_experts))

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns the output, router logits [tokens, E], chosen experts and their weights [tokens, top_k]."""
        shape = hidden_states.shape
        tokens = hidden_states.reshape(-1, shape[-1])
        router_logits = self.gate(tokens)
        experts, weights = route_tokens(router_logits, self.top_k, self.normalize)
        return self._dispatch(tokens, experts, weights).view(shape), router_logits, experts, weights

    def _dispatch(self, tokens: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Each used expert runs once, on all the rows that chose it (one contiguous slice of the tokens sorted by
        expert); then each token adds its k weighted outputs in ascending expert order."""
        # Each token's slots in ascending expert order (a token picks an expert at most once).
        experts, slot_order = experts.sort(dim=-1)
        weights = weights.gather(-1, slot_order)
        order = experts.flatten().argsort(stable=True)  # (token, slot) pairs grouped by expert
        counts = torch.bincount(experts.flatten(), minlength=len(self.experts)).tolist()
        rows = tokens[order // self.top_k]
        outputs = torch.empty_like(rows)
        start = 0
        for expert_idx, count in enumerate(counts):
            if count:
                outputs[start : start + count] = self.experts[expert_idx](rows[start : start + count])
                start += count
        per_slot = torch.empty_like(outputs)
        per_slot[order] = outputs
        per_slot = per_slot.view(*experts.shape, -1) * weights[..., None].to(tokens.dtype)
        output = per_slot[:, 0]
        for slot in range(1, self.top_k):
            output = output + per_slot[:, slot]
        return output


class YuanDecoderLayer(nn.Module):
    def __init__(self, config: YuanConfig, layer_idx: int):
        super().__init__()
        self.self_attn = YuanAttention(config, layer_idx)
        self.mlp = YuanMoE(config)
        self.input_layernorm = YuanRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = YuanRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, position_embeddings, batch_masks, cache=None):
        residual = hidden_states
        hidden_states = self.self_attn(self.input_layernorm(hidden_states), position_embeddings, batch_masks, cache)
        hidden_states = residual + hidden_states

        residual = hidden_states
        moe_output, router_logits, _, _ = self.mlp(self.post_attention_layernorm(hidden_states))
        return residual + moe_output, router_logits


# ---------------------------------------------------------------------------------------------------------------------
# Masks and routing records


@dataclass
class _BatchMasks:
    """Everything one forward pass needs to know about padding, shared by all layers."""

    attention: torch.Tensor | None  # bool [b, 1, q, kv], True = attend; None = plain (causal) attention
    causal: bool  # with `attention` None: whether SDPA must apply the causal mask itself
    current_valid: torch.Tensor | None  # bool [b, q]: real tokens among the current ones; None = all real
    window_valid: torch.Tensor  # bool [b, q + 2]: real tokens among the two previous positions and the current ones


def _build_batch_masks(attention_mask: torch.Tensor | None, batch: int, past: int, q_len: int, device) -> _BatchMasks:
    kv_len = past + q_len
    query_positions = torch.arange(past, kv_len, device=device)
    if attention_mask is None:
        # Only the two positions before the sequence start are not tokens.
        window_valid = (torch.arange(past - 2, kv_len, device=device) >= 0).expand(batch, -1)
        if q_len == 1 or past == 0:
            return _BatchMasks(None, q_len > 1, None, window_valid)
        causal = torch.arange(kv_len, device=device)[None, :] <= query_positions[:, None]
        return _BatchMasks(causal[None, None], False, None, window_valid)

    key_valid = attention_mask.to(device=device, dtype=torch.bool)
    if key_valid.shape != (batch, kv_len):
        raise ValueError(
            f"attention_mask must cover past and current tokens: expected shape {(batch, kv_len)}, "
            f"got {tuple(key_valid.shape)}"
        )
    window_valid = F.pad(key_valid, (2, 0), value=False)[:, past : past + q_len + 2]
    key_positions = torch.arange(kv_len, device=device)[None, :]
    allowed = (key_positions <= query_positions[:, None])[None] & key_valid[:, None, :]
    # A padded query has no real key before it; letting it see itself keeps its (unused) row finite.
    allowed = allowed | (key_positions == query_positions[:, None])[None]
    return _BatchMasks(allowed[:, None], False, key_valid[:, past:], window_valid)


# ---------------------------------------------------------------------------------------------------------------------
# Models


class YuanPreTrainedModel(PreTrainedModel):
    config_class = YuanConfig
    config: YuanConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["YuanDecoderLayer"]
    _supports_sdpa = True
    _can_compile_fullgraph = False


class YuanModel(YuanPreTrainedModel):
    def __init__(self, config: YuanConfig):
        super().__init__(config)
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(YuanDecoderLayer(config, idx) for idx in range(config.num_hidden_layers))
        self.norm = YuanRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = YuanRotaryEmbedding(config)
        self.post_init()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_router_logits: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> MoeModelOutputWithPast | tuple:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            # The embedding may be held in lower precision than the residual stream (mixed CPU mode).
            inputs_embeds = self.embed_tokens(input_ids).to(self.norm.weight.dtype)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        output_hidden_states = bool(output_hidden_states)
        output_router_logits = bool(output_router_logits)
        return_dict = self.config.return_dict if return_dict is None else return_dict

        if use_cache and cache is None:
            cache = YuanCache(self.config)
        if cache is not None and not isinstance(cache, YuanCache):
            raise TypeError(
                f"Yuan needs a YuanCache (it also keeps the LFA memory), got {type(cache).__name__}; "
                "pass cache=YuanCache(model.config) or let the model create one"
            )

        batch, q_len = inputs_embeds.shape[:2]
        past = cache.get_seq_length() if cache is not None else 0
        if attention_mask is not None and attention_mask.ndim != 2:
            raise ValueError("attention_mask must be 2D [batch, past + current tokens]")
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # no padding: the cheaper unmasked path gives the same result
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -q_len:]
            else:
                position_ids = torch.arange(past, past + q_len, device=inputs_embeds.device).expand(batch, -1)
        elif position_ids.ndim == 1:
            position_ids = position_ids.unsqueeze(0).expand(batch, -1)

        batch_masks = _build_batch_masks(attention_mask, batch, past, q_len, inputs_embeds.device)
        position_embeddings = self.rotary_emb(position_ids.to(inputs_embeds.device), inputs_embeds.dtype)

        hidden_states = inputs_embeds
        all_hidden_states = () if output_hidden_states else None
        all_router_logits = () if output_router_logits else None
        for decoder_layer in self.layers:
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            hidden_states, router_logits = decoder_layer(hidden_states, position_embeddings, batch_masks, cache)
            if output_router_logits:
                all_router_logits += (router_logits.view(batch, q_len, -1),)

        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)

        output = MoeModelOutputWithPast(
            last_hidden_state=hidden_states,
            cache=cache if use_cache else None,
            hidden_states=all_hidden_states,
            router_logits=all_router_logits,
        )
        return output if return_dict else output.to_tuple()


class YuanForCausalLM(YuanPreTrainedModel, GenerationMixin):
    """Yuan2 with its LM head. `from_pretrained` also reads the release's folders (INT4 GPTQ, byte-split weight
    parts): `loading.py`, which imports this module, routes them to the project's loader."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: YuanConfig):
        super().__init__(config)
        self.model = YuanModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_router_logits: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> MoeCausalLMOutputWithPast | tuple:
        """`output_router_logits=True` adds the per-layer router logits [batch, seq, experts] (float32) to the
        output; the released config's `output_router_logits` (a training flag) is not consulted."""
        return_dict = self.config.return_dict if return_dict is None else return_dict
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            output_router_logits=output_router_logits,
            return_dict=True,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden_states = hidden_states[:, -logits_to_keep:] if logits_to_keep else hidden_states
        else:
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.lm_head(hidden_states)

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

        output = MoeCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            router_logits=outputs.router_logits,
        )
        return output if return_dict else output.to_tuple()

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        cache = model_kwargs.get("cache")
        # generate builds a plain DynamicCache by default; Yuan's layers also need the LFA memory.
        if type(cache) is DynamicCache and not getattr(cache, "_is_user_defined", False):
            model_kwargs["cache"] = YuanCache(self.config, offloading=cache.offloading)

    @contextmanager
    def record_routing(self) -> Iterator[YuanRoutingTrace]:
        """Record the top-k experts and weights of every token in every layer while the block runs.

        >>> with model.record_routing() as trace:
        ...     model.generate(**inputs, max_new_tokens=20)
        >>> experts, weights = trace.stacked()  # [layers, batch, tokens, top_k]
        """
        trace = YuanRoutingTrace(self.config.num_hidden_layers)
        hooks = [
            layer.mlp.register_forward_hook(partial(trace.record_moe_output, layer_idx))
            for layer_idx, layer in enumerate(self.model.layers)
        ]
        try:
            yield trace
        finally:
            for hook in hooks:
                hook.remove()


__all__ = [
    "YuanAttention",
    "YuanDecoderLayer",
    "YuanExpertMLP",
    "YuanForCausalLM",
    "YuanLocalizedFiltering",
    "YuanMoE",
    "YuanModel",
    "YuanPreTrainedModel",
    "YuanRMSNorm",
    "YuanRotaryEmbedding",
    "YuanRouter",
    "apply_rotary_pos_emb",
    "route_tokens",
]
