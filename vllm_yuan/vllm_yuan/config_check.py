"""What a Yuan2 config must hold on vLLM, checked where vLLM builds its config: in the process that starts (the API
server), before any engine process is spawned. `register()` adds it to vLLM's per-architecture config hooks."""

from __future__ import annotations

from vllm.config import VllmConfig
from vllm.model_executor.models.config import VerifyAndUpdateConfig


class YuanConfigCheck(VerifyAndUpdateConfig):
    @staticmethod
    def verify_and_update_config(vllm_config: VllmConfig) -> None:
        """Another tokenizer gives other ids than the release's (and adds <s>/</s>): refuse it rather than serve
        wrong answers quietly."""
        model_config = vllm_config.model_config
        if not model_config.skip_tokenizer_init and model_config.tokenizer_mode != "yuan":
            raise ValueError(
                f"Yuan2 needs the release's tokenizer: start vLLM with --tokenizer-mode yuan "
                f"(got --tokenizer-mode {model_config.tokenizer_mode}), or --skip-tokenizer-init and send token ids"
            )
