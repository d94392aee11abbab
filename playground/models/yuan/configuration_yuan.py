"""Configuration of Yuan2.0-M32 (model_type "yuan").

Accepts the released `config.json` as it is: besides the fields declared here it carries flags that only mattered
for the release's training or remote code (`use_flash_attention`, `causal_mask`, `reset_position_ids`,
`reset_attention_mask`, `use_loss_mask`, `eod_token`, `sep_token`, `model_max_length`, `dropout`, ...). Those are
kept as plain attributes and ignored by the native model.
"""

from __future__ import annotations

from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import PretrainedConfig

# What the released Yuan2-M32 config says about its experts, used when a field is missing.
DEFAULT_MOE_CONFIG: dict[str, Any] = {
    "moe_num_experts": 32,
    "moe_top_k": 2,
    "ffn_hidden_size": 8192,
    "norm_topk_prob": True,
    "gated_linear_unit": True,
}

ROTARY_TABLE_DTYPES = ("bfloat16", "float32")


@strict
class YuanConfig(PretrainedConfig):
    r"""Yuan2.0-M32: decoder layers of Localized-Filtering attention and an attention-routed mixture of experts.

    Extra knobs of this port (absent from the release, defaults reproduce it):

    - `rotary_table_dtype`: `"bfloat16"` builds the cos/sin table in bf16 like the released code (positions above
      256 round to the nearest bf16 value); `"float32"` builds an exact table.
    - `rotary_dim`: how many leading dims of each head rotate; `None` means `hidden_size // num_attention_heads`,
      which is what the release sizes its rotary embedding by (128 of the 256 head dims in M32; the whole head
      when attention_projection_size equals hidden_size).
    - `rotary_base`: RoPE base, 10000 as released.
    """

    model_type = "yuan"
    keys_to_ignore_at_inference = ["cache"]

    vocab_size: int = 135040
    hidden_size: int = 2048
    intermediate_size: int = 8192
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    attention_projection_size: int | None = 4096
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = 77185
    bos_token_id: int | None = 77185
    eos_token_id: int | list[int] | None = 77185
    tie_word_embeddings: bool = True
    moe_config: dict | None = None
    use_moe: bool = True
    output_router_logits: bool = False
    use_flash_attention: bool = False
    rotary_table_dtype: str = "bfloat16"
    rotary_dim: int | None = None
    rotary_base: float = 10000.0
    # Set by the playground's precision step (not by the release): the dtype `YuanCache` holds keys/values in
    # ("bfloat16"...); None keeps the activations' dtype.
    kv_cache_dtype: str | None = None

    def __post_init__(self, **kwargs):
        # Keep whatever the release put in moe_config, fill what is missing.
        self.moe_config = {**DEFAULT_MOE_CONFIG, **(self.moe_config or {})}
        if self.attention_projection_size is None:
            self.attention_projection_size = self.hidden_size
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Part of `@strict` validation: shapes the modeling code relies on."""
        if self.attention_projection_size % self.num_attention_heads != 0:
            raise ValueError(
                f"attention_projection_size ({self.attention_projection_size}) must be a multiple of "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.hidden_size % 2 != 0:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be even: the LFA filter halves it")
        if self.rotary_table_dtype not in ROTARY_TABLE_DTYPES:
            raise ValueError(f"rotary_table_dtype must be one of {ROTARY_TABLE_DTYPES}, got {self.rotary_table_dtype!r}")
        rotary_dim = self.rotary_dims
        if rotary_dim % 2 != 0 or not 0 < rotary_dim <= self.head_dim:
            raise ValueError(f"rotary_dim ({rotary_dim}) must be even and at most head_dim ({self.head_dim})")
        top_k, experts = self.moe_config["moe_top_k"], self.moe_config["moe_num_experts"]
        if not 0 < top_k <= experts:
            raise ValueError(f"moe_top_k ({top_k}) must be between 1 and moe_num_experts ({experts})")
        if not self.moe_config.get("gated_linear_unit", True):
            raise ValueError("only gated (SwiGLU) experts are implemented, as in the release")

    @property
    def head_dim(self) -> int:
        return self.attention_projection_size // self.num_attention_heads

    @property
    def rotary_dims(self) -> int:
        # The release builds its rotary table for hidden_size // num_heads dims, whatever the head size.
        return self.rotary_dim if self.rotary_dim is not None else self.hidden_size // self.num_attention_heads

    @property
    def num_experts(self) -> int:
        return int(self.moe_config["moe_num_experts"])

    @property
    def num_experts_per_tok(self) -> int:
        return int(self.moe_config["moe_top_k"])

    @property
    def expert_hidden_size(self) -> int:
        return int(self.moe_config["ffn_hidden_size"])

    @property
    def norm_topk_prob(self) -> bool:
        return bool(self.moe_config.get("norm_topk_prob", True))


__all__ = ["YuanConfig"]
