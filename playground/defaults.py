"""The defaults the options (`config.py`) share with the core that applies them (`manager.py`, `remote.py`), in a
module that imports nothing: `--help` and a bad option answer without loading torch, transformers or the openai
client."""

from __future__ import annotations

# A longer prompt (all messages) is refused before it is tokenized; --max-prompt-chars changes it.
DEFAULT_MAX_PROMPT_CHARS = 100_000
# The longest a remote engine may stay silent (first token included) before a reply gives up; --remote-timeout.
DEFAULT_TIMEOUT_S = 120.0
# How many of this playground's requests a remote engine gets at once (it batches them); --remote-concurrency.
DEFAULT_CONCURRENCY = 16
# How the prompt reaches a remote engine: auto-detected, the server's own template, or Yuan's format built here.
CHAT_FORMATS = ("auto", "server", "yuan")
