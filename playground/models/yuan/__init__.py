"""Yuan2.0-M32, implemented natively (no remote code).

Importing this package registers the model with transformers' Auto classes:

- `AutoConfig` maps `model_type: "yuan"` to `YuanConfig`;
- `AutoModelForCausalLM` maps `YuanConfig` to `YuanForCausalLM` (INT4 / byte-split release folders are routed
  through `load_yuan`);
- `AutoTokenizer` maps `YuanConfig` to `YuanTokenizer`, which transformers only picks for folders whose
  `tokenizer_config.json` names `YuanTokenizer`. The release's folder names `LlamaTokenizer`, so the project loads
  tokenizers with `load_yuan_tokenizer(folder)` (and `load_yuan` does it for you).

Because `yuan` is a registered local model type, a folder whose `config.json` carries the release's `auto_map`
loads this code with `trust_remote_code` left off; the remote code is never fetched or run.

Entry points for the app: `is_yuan_folder`, `check_yuan_folder`, `load_yuan`, `YuanChatFormat`.
"""

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .configuration_yuan import YuanConfig
from .loading import check_yuan_folder, is_yuan_folder, load_yuan
from .cache_yuan import YuanCache
from .modeling_yuan import YuanForCausalLM, YuanModel
from .routing_yuan import YuanRoutingTrace
from .prompt import YuanChatFormat, yuan_prompt
from .tokenization_yuan import YuanTokenizer, load_yuan_tokenizer

AutoConfig.register("yuan", YuanConfig, exist_ok=True)
AutoModelForCausalLM.register(YuanConfig, YuanForCausalLM, exist_ok=True)
AutoTokenizer.register(YuanConfig, tokenizer_class=YuanTokenizer, exist_ok=True)

__all__ = [
    "YuanCache",
    "YuanChatFormat",
    "YuanConfig",
    "YuanForCausalLM",
    "YuanModel",
    "YuanRoutingTrace",
    "YuanTokenizer",
    "check_yuan_folder",
    "is_yuan_folder",
    "load_yuan",
    "load_yuan_tokenizer",
    "yuan_prompt",
]
