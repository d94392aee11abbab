"""Yuan2.0-M32 for vLLM: paged attention over Localized-Filtering queries/keys, an fp32 attention router, fused MoE.

Follows the release (`../shared/docs/yuan2-m32.md`), not the vendor's vLLM 0.4 fork where they differ: the attention
scale is 1/sqrt(head_dim) (256 in M32, where the fork used 1/sqrt(128)) and the rotary table is built in bf16 like the
released modeling code.

Tensor parallelism, the vLLM way: `q_proj` and `k_proj` are loaded as one column-parallel linear over their
concatenation, so rank r holds whole heads (each head's 512-wide q/k block, its V rows and its `o_proj` columns);
`v_proj` is column-parallel, `o_proj` row-parallel; the experts' intermediate dimension is sharded by vLLM's MoE
layer; the router and the filter are replicated.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from itertools import islice

import torch
import torch.nn.functional as F
from torch import nn
from vllm.config import CacheConfig, ModelConfig, VllmConfig
from vllm.distributed import get_pp_group, get_tensor_model_parallel_world_size
from vllm.logger import init_logger
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.fused_moe import FusedMoEFactory
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import ColumnParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.interfaces import HasInnerState, IsHybrid, SupportsPP, SupportsQuant
from vllm.model_executor.models.utils import (
    AutoWeightsLoader,
    PPMissingLayer,
    make_empty_intermediate_tensors_factory,
    make_layers,
    maybe_prefix,
)
from vllm.sequence import IntermediateTensors

from .configuration_yuan import YuanConfig
from .gptq_format import _dequantize
from .localized_filtering import YuanLocalizedFiltering, state_copy_functions, state_shape

# Under vLLM's logger, so the plugin's lines show in vLLM's log format.
logger = init_logger("vllm.yuan")

# Set to 1 to run the experts from bf16/fp16 copies dequantised at load even where a GPTQ MoE kernel exists.
DEQUANTIZE_EXPERTS_ENV = "VLLM_YUAN_DEQUANTIZE_EXPERTS"


class YuanRotaryEmbedding(RotaryEmbedding):
    """Neox-style rotary on the first `rotary_dim` dims of each head, with the release's table: positions, inverse
    frequencies, their products and cos/sin computed in bfloat16 (position 257 reads the row of 256), then widened.
    `rotary_table_dtype: "float32"` in the config gives vLLM's exact table instead."""

    def __init__(self, head_size: int, rotary_dim: int, max_positions: int, base: float, table_dtype: torch.dtype):
        self.table_dtype = table_dtype
        super().__init__(head_size, rotary_dim, max_positions, base, is_neox_style=True,
                         dtype=torch.get_default_dtype())

    def _compute_cos_sin_cache(self) -> torch.Tensor:
        inv_freq = self._compute_inv_freq(self.base).to(self.table_dtype)
        positions = torch.arange(self.max_position_embeddings).to(self.table_dtype)
        freqs = torch.outer(positions, inv_freq)
        return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(torch.float32)


class YuanAttention(nn.Module):
    def __init__(self, config: YuanConfig, model_config: ModelConfig, cache_config: CacheConfig | None,
                 quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        tp_size = get_tensor_model_parallel_world_size()
        if config.num_attention_heads % tp_size:
            raise ValueError(f"{config.num_attention_heads} attention heads do not split over {tp_size} ranks")
        self.num_heads = config.num_attention_heads // tp_size
        self.head_dim = config.head_dim
        projection = config.attention_projection_size
        self.lf_gate = YuanLocalizedFiltering(config.hidden_size, config.rms_norm_eps, model_config=model_config,
                                              cache_config=cache_config, prefix=f"{prefix}.lf_gate")
        # cat(q_proj, k_proj) cut per head into [q | k]: one column-parallel linear keeps each head's pair together.
        self.qk_proj = ColumnParallelLinear(config.hidden_size, 2 * projection, bias=False, quant_config=quant_config,
                                            prefix=f"{prefix}.qk_proj")
        self.v_proj = ColumnParallelLinear(config.hidden_size, projection, bias=False, quant_config=quant_config,
                                           prefix=f"{prefix}.v_proj")
        self.o_proj = RowParallelLinear(projection, config.hidden_size, bias=False, quant_config=quant_config,
                                        prefix=f"{prefix}.o_proj")
        table_dtype = torch.bfloat16 if config.rotary_table_dtype == "bfloat16" else torch.float32
        self.rotary_emb = YuanRotaryEmbedding(self.head_dim, config.rotary_dims, config.max_position_embeddings,
                                              config.rotary_base, table_dtype)
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim**-0.5, num_kv_heads=self.num_heads,
                              cache_config=cache_config, quant_config=quant_config, prefix=f"{prefix}.attn")

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        value, _ = self.v_proj(hidden_states)
        query_key, _ = self.qk_proj(self.lf_gate(hidden_states))
        query, key = query_key.view(-1, self.num_heads, 2, self.head_dim).unbind(dim=2)
        query, key = query.reshape(-1, self.num_heads * self.head_dim), key.reshape(-1, self.num_heads * self.head_dim)
        query, key = self.rotary_emb(positions, query, key)
        output, _ = self.o_proj(self.attn(query, key, value))
        return output


class YuanRouter(nn.Module):
    """Attention router in float32: per token `softmax_j(q_i * k_j) @ v` over the expert axis. Its three projections
    (`query`, `key`, `value`) are held as one fp32 [3E, hidden] weight, dequantised at load in a GPTQ checkpoint, so
    routing never moves with rounding."""

    def __init__(self, config: YuanConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.weight = nn.Parameter(torch.empty(3 * config.num_experts, config.hidden_size, dtype=torch.float32),
                                   requires_grad=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        query, key, value = F.linear(hidden_states.float(), self.weight).split(self.num_experts, dim=-1)
        scores = torch.softmax(query.unsqueeze(-1) * key.unsqueeze(-2), dim=-1)  # [tokens, E, E]
        return torch.matmul(scores, value.unsqueeze(-1)).squeeze(-1)


class YuanMoE(nn.Module):
    def __init__(self, config: YuanConfig, quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        self.gate = YuanRouter(config)
        settings = dict(
            num_experts=config.num_experts,
            top_k=config.num_experts_per_tok,
            hidden_size=config.hidden_size,
            intermediate_size=config.expert_hidden_size,
            # Softmax, top-k, renormalise the k weights: vLLM's default routing on the router's fp32 logits.
            renormalize=config.norm_topk_prob,
            router_logits_dtype=torch.float32,
            prefix=f"{prefix}.experts",
            ckpt_names=("w1", "w2", "w3"),
        )
        self.dequantized = quant_config is not None and os.environ.get(DEQUANTIZE_EXPERTS_ENV) == "1"
        if self.dequantized:
            logger.info_once("%s=1: Yuan's experts are dequantised at load to %s", DEQUANTIZE_EXPERTS_ENV,
                             torch.get_default_dtype())
        elif quant_config is not None:
            try:
                self.experts = FusedMoEFactory(quant_config=quant_config, **settings)
            except NotImplementedError as exc:  # e.g. a CPU without AMX or zentorch: no GPTQ MoE kernel
                self.dequantized = True
                logger.warning_once("No GPTQ MoE kernel here (%s): Yuan's experts are dequantised at load to %s",
                                    exc, torch.get_default_dtype())
        if quant_config is None or self.dequantized:
            self.experts = FusedMoEFactory(quant_config=None, **settings)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.experts(hidden_states, self.gate(hidden_states))


class YuanDecoderLayer(nn.Module):
    def __init__(self, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        config, quant_config = vllm_config.model_config.hf_config, vllm_config.quant_config
        self.self_attn = YuanAttention(config, vllm_config.model_config, vllm_config.cache_config, quant_config,
                                       prefix=f"{prefix}.self_attn")
        self.mlp = YuanMoE(config, quant_config, prefix=f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(positions, self.input_layernorm(hidden_states))
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class YuanModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.start_layer, self.end_layer, self.layers = make_layers(
            config.num_hidden_layers,
            lambda prefix: YuanDecoderLayer(vllm_config, prefix),
            prefix=f"{prefix}.layers",
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps) if get_pp_group().is_last_rank \
            else PPMissingLayer()
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(["hidden_states"],
                                                                                      config.hidden_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        if get_pp_group().is_first_rank:
            hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        else:
            hidden_states = intermediate_tensors["hidden_states"]
        for layer in islice(self.layers, self.start_layer, self.end_layer):
            hidden_states = layer(positions, hidden_states)
        if not get_pp_group().is_last_rank:
            return IntermediateTensors({"hidden_states": hidden_states})
        return self.norm(hidden_states)


class YuanForCausalLM(nn.Module, HasInnerState, IsHybrid, SupportsPP, SupportsQuant):
    packed_modules_mapping = {"qk_proj": ["q_proj", "k_proj"]}

    @classmethod
    def get_mamba_state_shape_from_config(cls, vllm_config: VllmConfig):
        return state_shape(vllm_config.model_config.hf_config.hidden_size)

    @classmethod
    def get_mamba_state_dtype_from_config(cls, vllm_config: VllmConfig):
        return (vllm_config.model_config.dtype,)

    @classmethod
    def get_mamba_state_copy_func(cls):
        return state_copy_functions()

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.quant_config = vllm_config.quant_config
        self.model = YuanModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        if get_pp_group().is_last_rank:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, quant_config=self.quant_config,
                                          prefix=maybe_prefix(prefix, "lm_head"))
            if config.tie_word_embeddings:
                self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        else:
            self.lm_head = PPMissingLayer()
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        bits = getattr(self.quant_config, "weight_bits", 4)
        dequantized = any(layer.mlp.dequantized for layer in self.model.layers if isinstance(layer, YuanDecoderLayer))
        # Layers past the config's count (a run with --hf-overrides num_hidden_layers=K) are not read.
        layers = self.config.num_hidden_layers
        kept = ((name, tensor) for name, tensor in weights if _layer_index(name) < layers)
        converted = release_to_vllm(kept, bits=bits, dequantize_experts=dequantized)
        loader = AutoWeightsLoader(self)  # a tied head skips the stored lm_head.weight
        return loader.load_weights(converted)


# ---------------------------------------------------------------------------------------------------------------------
# The release's tensors -> this model's parameters

_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "query", "key", "value", "w1", "w2")
_QUANTIZED_PARTS = ("qweight", "qzeros", "scales")


def _layer_index(name: str) -> int:
    """The decoder layer a tensor belongs to; -1 for the embedding, the final norm and the head."""
    parts = name.split(".")
    return int(parts[2]) if len(parts) > 2 and parts[:2] == ["model", "layers"] else -1


def _output_dim(part: str) -> int:
    """Where a tensor's output features are: a float weight is [out, in]; GPTQ tensors are [in/.., out/..]."""
    return 0 if part == "weight" else 1


def _dequantized(record: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
    """A linear's float weight [out, in] (float32), from its float weight or its GPTQ tensors."""
    if "weight" in record:
        return record["weight"].float()
    return _dequantize(record["qweight"], record["qzeros"], record["scales"], None, torch.float32, bits).t()


def release_to_vllm(weights: Iterable[tuple[str, torch.Tensor]], bits: int = 4,
                    dequantize_experts: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Rename and regroup the release's tensors as a stream, holding only the linears still waiting for a partner:

    - `q_proj` + `k_proj` -> `qk_proj` (concatenated on the output features);
    - `mlp.gate.{query,key,value}` -> `mlp.gate.weight`, fp32 [3E, hidden] (dequantised if GPTQ);
    - each expert's `w1` (gate rows then up rows) -> `w1` (gate) and `w3` (up), as vLLM's MoE loads them, split per
      tensor on the output features (or dequantised first when the experts run unquantised);
    - `g_idx` dropped (no act-order in the release).
    """
    pending: dict[str, dict[str, torch.Tensor]] = {}  # linear -> its tensors so far
    partners: dict[str, dict[str, dict[str, torch.Tensor]]] = {}  # qk / router group -> complete linears
    for name, tensor in weights:
        module, _, part = name.rpartition(".")
        if part == "g_idx":
            continue
        if module.rpartition(".")[2] not in _LINEARS:
            yield name, tensor
            continue
        record = pending.setdefault(module, {})
        record[part] = tensor
        if "weight" not in record and not all(p in record for p in _QUANTIZED_PARTS):
            continue
        del pending[module]
        parent, _, linear = module.rpartition(".")
        if linear in ("q_proj", "k_proj"):
            group = partners.setdefault(f"{parent}.qk_proj", {})
            group[linear] = record
            if len(group) == 2:
                del partners[f"{parent}.qk_proj"]
                for key in group["q_proj"]:
                    yield f"{parent}.qk_proj.{key}", torch.cat(
                        (group["q_proj"][key], group["k_proj"][key]), dim=_output_dim(key))
        elif linear in ("query", "key", "value"):
            group = partners.setdefault(parent, {})
            group[linear] = record
            if len(group) == 3:
                del partners[parent]
                yield f"{parent}.weight", torch.cat([_dequantized(group[n], bits) for n in ("query", "key", "value")])
        elif linear == "w1":
            if dequantize_experts:
                record = {"weight": _dequantized(record, bits).to(torch.get_default_dtype())}
            for key, value in record.items():
                gate, up = value.chunk(2, dim=_output_dim(key))
                yield f"{module}.{key}", gate
                yield f"{parent}.w3.{key}", up
        elif linear == "w2" and dequantize_experts:
            yield f"{module}.weight", _dequantized(record, bits).to(torch.get_default_dtype())
        else:
            for key, value in record.items():
                yield f"{module}.{key}", value
    incomplete = sorted(pending) + sorted(partners)
    if incomplete:
        raise ValueError(f"incomplete Yuan checkpoint: {incomplete[0]} lacks some of its tensors")
