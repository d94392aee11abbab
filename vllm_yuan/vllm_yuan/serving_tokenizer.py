"""`--tokenizer-mode yuan`: the release's tokenizer inside vLLM, with `<n>` read back as a line break.

transformers' `AutoTokenizer` on a release folder builds a tokenizers-backed Llama tokenizer that gives other ids and
adds `<s>`/`</s>`; this mode loads the project's `YuanTokenizer` (sentencepiece, the reference ids) instead and gives
it the Yuan chat template, so vLLM's `/v1/chat/completions` prompts the model as the release does.
"""

from __future__ import annotations

from pathlib import Path

from vllm.tokenizers.hf import get_cached_tokenizer

from .tokenization_yuan import NEWLINE_TOKEN, YuanTokenizer

CHAT_TEMPLATE = Path(__file__).with_name("chat_template.jinja")


class YuanServingTokenizer(YuanTokenizer):
    """The release tokenizer; replies decode `<n>` (the model's line break) as "\\n"."""

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return super().convert_tokens_to_string(tokens).replace(NEWLINE_TOKEN, "\n")

    @classmethod
    def from_pretrained(cls, path_or_repo_id, *args, trust_remote_code: bool = False, revision=None,
                        download_dir=None, **kwargs):
        for key in ("truncation_side", "mistral_format", "config"):
            kwargs.pop(key, None)
        tokenizer = super().from_pretrained(str(path_or_repo_id), *args, local_files_only=True, **kwargs)
        tokenizer.truncation_side = "left"
        tokenizer.chat_template = CHAT_TEMPLATE.read_text(encoding="utf-8")
        return get_cached_tokenizer(tokenizer)
