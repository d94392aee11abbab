"""How a model turns chat messages into a prompt and its raw output back into clean text.

The manager and the tabs only talk to this interface, so each model family (the embedded SmolLM2
through its tokenizer's chat template, Yuan2-M32 through its `<n>`/`<sep>` format) plugs in here.
"""

from __future__ import annotations

from typing import Any, Iterable, Protocol

from playground.errors import ParameterError, not_unicode

Message = dict[str, Any]  # {"role": "system"|"user"|"assistant", "content": str}


def message_text(content: Any) -> str:
    """Plain text of a message's content; Gradio 6 passes content as a list of parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        if content.get("type", "text") == "text":
            return str(content.get("text", ""))
        return ""
    if isinstance(content, (list, tuple)):
        return "".join(message_text(part) for part in content)
    return str(content)


def normalise_messages(messages: Iterable[Message]) -> list[dict[str, str]]:
    """Messages reduced to {"role", "content": str}, dropping Gradio metadata."""
    out = []
    for message in messages:
        role = message.get("role")
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"unknown message role {role!r}; use system, user or assistant")
        out.append({"role": role, "content": message_text(message.get("content"))})
    return out


def checked_input(messages: Iterable[Message] | None, prompt: str | None, max_chars: int) -> list[dict[str, str]] | None:
    """Messages normalised (None for a raw prompt); text too long or not Unicode is refused here, before a backend
    tokenizes it (tokenizing megabytes costs seconds and memory the allocator keeps)."""
    messages = normalise_messages(messages) if messages is not None else None
    field = "messages" if messages is not None else "prompt"
    texts = [(f"message {i + 1}", m["content"]) for i, m in enumerate(messages)] if messages else [("the prompt", prompt or "")]
    size = sum(len(text) for _, text in texts)
    if size > max_chars:
        raise ParameterError(f"the prompt is {size} characters; the limit is {max_chars} (the server's "
                             "--max-prompt-chars)", field=field)
    for what, text in texts:
        problem = not_unicode(text, what)
        if problem:
            raise ParameterError(problem, field=field)
    return messages


class ChatFormat(Protocol):
    """What the manager needs from a model family's prompt format."""

    name: str
    # Token ids that end a reply besides the tokenizer's eos (e.g. Yuan's <eod>).
    stop_token_ids: list[int]
    # Whether the streamer should drop special tokens when decoding (False when clean_output needs them).
    skip_special_tokens: bool

    def build_prompt(self, messages: list[dict[str, str]]) -> str:
        """The full prompt text for the next assistant turn."""

    def clean_output(self, text: str) -> str:
        """Raw decoded reply text -> what the user sees."""


class TemplateChatFormat:
    """The tokenizer's own chat template (the embedded SmolLM2 and most HF chat models)."""

    name = "chat-template"
    skip_special_tokens = True

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.stop_token_ids = []

    def build_prompt(self, messages: list[dict[str, str]]) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def clean_output(self, text: str) -> str:
        return text


class PlainChatFormat:
    """Models without a chat template: turns as 'Role: text' lines, the reply after 'Assistant:'."""

    name = "plain"
    skip_special_tokens = True

    def __init__(self, tokenizer: Any = None):
        self.stop_token_ids = []

    def build_prompt(self, messages: list[dict[str, str]]) -> str:
        lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
        return "\n".join(lines) + "\nAssistant:"

    def clean_output(self, text: str) -> str:
        return text
