"""Yuan2.0-M32 for vLLM, as an out-of-tree plugin (entry point group `vllm.general_plugins`).

`register()` runs in every vLLM process. It makes the release's folders servable as they ship, without
`--trust-remote-code` and without running the remote-code files next to their config.json:

- the `yuan` config class is registered with transformers, so its `auto_map` is never followed;
- `YuanForCausalLM` (this package's `model.py`) is registered with vLLM's model registry;
- `--tokenizer-mode yuan` loads the release's tokenizer with the Yuan chat template (another tokenizer is refused
  when vLLM builds its config, before an engine starts: `config_check.py`);
- `--load-format yuan` reads the byte-split INT4 weight parts in place.
"""

from __future__ import annotations

ARCHITECTURE = "YuanForCausalLM"


def register() -> None:
    from transformers import AutoConfig
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP
    from vllm.renderers.registry import RENDERER_REGISTRY
    from vllm.tokenizers.registry import TokenizerRegistry
    from vllm.transformers_utils.chat_templates.registry import (
        get_chat_template_fallback_path,
        register_chat_template_fallback_path,
    )

    from .config_check import YuanConfigCheck
    from .configuration_yuan import YuanConfig
    from .serving_tokenizer import CHAT_TEMPLATE

    AutoConfig.register("yuan", YuanConfig, exist_ok=True)
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "vllm_yuan.model:YuanForCausalLM")
    MODELS_CONFIG_MAP[ARCHITECTURE] = YuanConfigCheck
    # Registered once per process (register() may run again), without the registries' overwrite warnings.
    if "yuan" not in TokenizerRegistry.tokenizers:
        TokenizerRegistry.register("yuan", "vllm_yuan.serving_tokenizer", "YuanServingTokenizer")
    if "yuan" not in RENDERER_REGISTRY.renderers:
        RENDERER_REGISTRY.register("yuan", "vllm.renderers.hf", "HfRenderer")
    if get_chat_template_fallback_path("yuan", "") is None:
        register_chat_template_fallback_path("yuan", CHAT_TEMPLATE)
    from . import loader  # noqa: F401  (registers --load-format yuan)
