"""Yuan2's prompt format: turns joined with `<n>`, then `<sep>`; replies end with `<eod>`.

The release has no system role. A system message is prepended (followed by a line break) to the first user turn's
text, which is how the release's tutorials pass instructions.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Sequence

from playground.chat_format import message_text

from .tokenization_yuan import EOD_TOKEN, NEWLINE_TOKEN, SEP_TOKEN, YUAN_SPECIAL_TOKENS

EOD_TOKEN_ID = 77185
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
# Special tokens that carry no text in a reply (<n> is handled separately: it is a line break).
_STRIPPED_TOKENS = re.compile("|".join(re.escape(t) for t in [*YUAN_SPECIAL_TOKENS, EOD_TOKEN, "<s>", "</s>", "<unk>"]))


def _turn_text(text: str) -> str:
    """A turn as the model sees it: line breaks written as the `<n>` token."""
    return _LINE_BREAK.sub(NEWLINE_TOKEN, text)


def _join_turns(turns: Iterable[str]) -> str:
    return NEWLINE_TOKEN.join(_turn_text(turn) for turn in turns) + SEP_TOKEN


def yuan_prompt(query: str, history: Sequence[Any] | None = None) -> str:
    """The tutorials' prompt: earlier turns and the query joined with `<n>`, then `<sep>`.

    `history` may hold strings (one turn each), (user, assistant) pairs, or {"role", "content"} messages.
    """
    turns: list[str] = []
    for item in history or ():
        if isinstance(item, str):
            turns.append(item)
        elif isinstance(item, dict):
            turns.append(message_text(item.get("content")))
        else:
            turns.extend(str(part) for part in item if part is not None)
    turns.append(query)
    return _join_turns(turns)


class YuanChatFormat:
    """`playground.chat_format.ChatFormat` for Yuan2-M32."""

    name = "yuan"
    # clean_output needs <sep>/<eod>/<n> in the decoded text.
    skip_special_tokens = False

    def __init__(self, tokenizer: Any = None):
        eod_id = tokenizer.convert_tokens_to_ids(EOD_TOKEN) if tokenizer is not None else EOD_TOKEN_ID
        self.stop_token_ids = [eod_id]

    def build_prompt(self, messages: list[dict[str, str]]) -> str:
        system_texts: list[str] = []
        turns: list[str] = []
        first_user: int | None = None
        for message in messages:
            role, text = message["role"], message_text(message.get("content"))
            if role == "system":
                system_texts.append(text)
            elif role in ("user", "assistant"):
                if role == "user" and first_user is None:
                    first_user = len(turns)
                turns.append(text)
            else:
                raise ValueError(f"unknown message role {role!r}; use system, user or assistant")
        if system_texts:
            system = "\n".join(system_texts)
            if first_user is None:
                turns.insert(0, system)
            else:
                turns[first_user] = f"{system}\n{turns[first_user]}"
        if not turns:
            raise ValueError("no messages to build a prompt from")
        return _join_turns(turns)

    def clean_output(self, text: str) -> str:
        reply = text.rsplit(SEP_TOKEN, 1)[-1]
        reply = reply.split(EOD_TOKEN, 1)[0]  # nothing after the end of the reply belongs to it
        reply = reply.replace(NEWLINE_TOKEN, "\n")
        return _STRIPPED_TOKENS.sub("", reply).strip()


__all__ = ["EOD_TOKEN_ID", "YuanChatFormat", "yuan_prompt"]
