"""Yuan's chat format: prompt building and reply clean-up."""

from __future__ import annotations

import pytest

from playground.chat_format import ChatFormat
from playground.models.yuan.prompt import YuanChatFormat, yuan_prompt


def test_protocol_attributes(yuan_tokenizer):
    chat = YuanChatFormat(yuan_tokenizer)
    assert isinstance(chat, YuanChatFormat) and chat.name == "yuan"
    assert chat.stop_token_ids == [77185] and chat.skip_special_tokens is False
    format_: ChatFormat = chat  # structural: has what the manager calls
    assert callable(format_.build_prompt) and callable(format_.clean_output)
    assert YuanChatFormat().stop_token_ids == [77185]


def test_multi_turn_prompt():
    messages = [
        {"role": "user", "content": "写一首诗"},
        {"role": "assistant", "content": "床前明月光\n疑是地上霜"},
        {"role": "user", "content": "再来一首"},
    ]
    assert YuanChatFormat().build_prompt(messages) == "写一首诗<n>床前明月光<n>疑是地上霜<n>再来一首<sep>"


def test_single_query_and_gradio_content_parts():
    chat = YuanChatFormat()
    assert chat.build_prompt([{"role": "user", "content": "你好"}]) == "你好<sep>"
    parts = [{"type": "text", "text": "line one\r\n"}, {"type": "text", "text": "line two"}]
    assert chat.build_prompt([{"role": "user", "content": parts}]) == "line one<n>line two<sep>"


def test_system_message_is_prepended_to_first_user_turn():
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
    ]
    assert YuanChatFormat().build_prompt(messages) == "Answer briefly.<n>Hi<n>Hello<n>Bye<sep>"
    assert YuanChatFormat().build_prompt([{"role": "system", "content": "Only this"}]) == "Only this<sep>"


def test_bad_messages_are_rejected():
    with pytest.raises(ValueError, match="role"):
        YuanChatFormat().build_prompt([{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match="no messages"):
        YuanChatFormat().build_prompt([])


def test_clean_output():
    chat = YuanChatFormat()
    assert chat.clean_output(" 你好<sep> 第一行<n>第二行<eod>") == "第一行\n第二行"
    assert chat.clean_output("a<sep>b<sep>reply<pad> text<eod><eod>junk") == "reply text"
    assert chat.clean_output("partial reply<n>so far") == "partial reply\nso far"
    assert chat.clean_output("<mask>x<FIM_MIDDLE>y</s>") == "xy"


def test_prompt_round_trips_through_the_tokenizer(yuan_tokenizer):
    prompt = YuanChatFormat().build_prompt([{"role": "user", "content": "a\nb"}])
    ids = yuan_tokenizer.encode(prompt)
    # As with the reference tokenizer, the typed "<n>" is three ordinary pieces; "<sep>" is the special token.
    assert ids == [263, 29966, 29876, 29958, 29890, 77187]
    assert yuan_tokenizer.decode(ids) == " a<n>b<sep>"  # the reference puts a space before a special token
    assert YuanChatFormat().clean_output(yuan_tokenizer.decode(ids + yuan_tokenizer.encode("c<n>d<eod>"))) == "c\nd"


def test_tutorial_prompt():
    assert yuan_prompt("你好") == "你好<sep>"
    assert yuan_prompt("q2", [("q1", "a1")]) == "q1<n>a1<n>q2<sep>"
    assert yuan_prompt("q2", ["q1", "a1\nmore"]) == "q1<n>a1<n>more<n>q2<sep>"
    assert yuan_prompt("q2", [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}]) == (
        "q1<n>a1<n>q2<sep>"
    )
