"""The LangChain chat model: in-process through this process's manager, and over HTTP to the launched server;
structured output and LangSmith's standard parameters in both."""

from __future__ import annotations

import asyncio

from typing import TypedDict

import httpx
import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from pydantic import BaseModel, Field

from harness import cached_when_repeated
from playground.errors import ParameterError, PlaygroundError
from playground.integrations.langchain import PlaygroundAPIError, PlaygroundChatModel

COLOURS = [SystemMessage("You are terse."), HumanMessage("Name three colours.")]
PERSON_SCHEMA = {"title": "PersonDict", "type": "object", "required": ["name", "age"],
                 "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}}


@pytest.fixture(scope="module")
def local_model(embedded_manager):
    """This test process's manager with the embedded model (loaded once per session)."""
    return embedded_manager


@pytest.fixture(params=["in-process", "http"])
def chat(request) -> PlaygroundChatModel:
    """The same greedy model in both modes."""
    if request.param == "in-process":
        return PlaygroundChatModel(manager=request.getfixturevalue("local_model"), temperature=0, max_tokens=12)
    server = request.getfixturevalue("launched_server")
    return PlaygroundChatModel(base_url=server.url, temperature=0, max_tokens=12)


def model_status(chat: PlaygroundChatModel) -> dict:
    """The status of the manager or server behind `chat`."""
    return chat.manager.status() if chat.manager is not None else httpx.get(f"{chat.base_url}/healthz").json()


def test_invoke_and_stream_give_the_same_greedy_reply(chat):
    reply = chat.invoke(COLOURS)
    assert isinstance(reply, AIMessage) and reply.content.strip()
    usage = reply.usage_metadata
    assert 0 < usage["output_tokens"] <= 12 and usage["input_tokens"] > 0
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert reply.response_metadata["finish_reason"] in ("stop", "length")
    assert reply.response_metadata["model_name"] == "SmolLM2-135M-Instruct"

    chunks = list(chat.stream(COLOURS))
    assert len(chunks) > 2  # token by token, not one block
    assert "".join(chunk.content for chunk in chunks) == reply.content
    streamed = chunks[-1].usage_metadata
    assert {k: streamed[k] for k in ("input_tokens", "output_tokens")} == {k: usage[k] for k in
                                                                           ("input_tokens", "output_tokens")}
    # The same prompt again: all of it but its last token (in the model's resume steps) was read from the cache.
    assert streamed["input_token_details"]["cache_read"] == cached_when_repeated(model_status(chat),
                                                                                usage["input_tokens"])


def test_batch_answers_each_prompt(chat):
    replies = chat.batch(["Say hello.", "What is 2 + 2?"])
    assert len(replies) == 2 and all(reply.content.strip() for reply in replies)
    assert replies[0].content != replies[1].content
    assert replies[1].content == chat.invoke("What is 2 + 2?").content  # batch is the same generation


def test_stop_strings_are_honoured(chat):
    counting = [HumanMessage("Count from 1 to 10, separated by commas.")]
    free = chat.invoke(counting).content
    assert "," in free
    stopped = chat.invoke(counting, stop=[","])
    assert stopped.content == free.split(",")[0]
    assert stopped.response_metadata["finish_reason"] == "stop"


def test_sampling_fields_are_model_attributes(local_model):
    seeded = PlaygroundChatModel(manager=local_model, temperature=1.0, top_p=1.0, top_k=0, seed=11, max_tokens=8)
    assert seeded.invoke("Tell me a word.").content == seeded.invoke("Tell me a word.").content
    assert PlaygroundChatModel(manager=local_model, max_tokens=3).invoke("Hi").usage_metadata["output_tokens"] <= 3
    with pytest.raises(ParameterError, match="temperature"):
        PlaygroundChatModel(manager=local_model, temperature=11).invoke("Hi")


def test_async_stream_in_process(local_model):
    async def collect() -> str:
        chat = PlaygroundChatModel(manager=local_model, temperature=0, max_tokens=6)
        return "".join([chunk.content async for chunk in chat.astream("Hi")])

    assert asyncio.run(collect()).strip()


def test_unsupported_messages_and_models_are_clear_errors(local_model, launched_server):
    with pytest.raises(PlaygroundError, match="ToolMessage"):
        PlaygroundChatModel(manager=local_model).invoke([ToolMessage("42", tool_call_id="x")])
    with pytest.raises(PlaygroundError, match="not loaded"):
        PlaygroundChatModel(manager=local_model, model="gpt-4o").invoke("Hi")
    with pytest.raises(PlaygroundError, match="needs base_url .* or manager"):
        PlaygroundChatModel().invoke("Hi")
    with pytest.raises(PlaygroundAPIError, match="gpt-4o") as raised:
        PlaygroundChatModel(base_url=f"{launched_server.url}/v1", model="gpt-4o").invoke("Hi")
    assert raised.value.status_code == 404
    with pytest.raises(PlaygroundAPIError, match="n=1|max_tokens") as raised:
        PlaygroundChatModel(base_url=launched_server.url, max_tokens=0).invoke("Hi")
    assert raised.value.status_code == 400


def test_breaking_out_of_a_stream_frees_the_manager(local_model):
    manager = local_model
    for chunk in PlaygroundChatModel(manager=manager, temperature=0, max_tokens=200).stream("Write a long story."):
        if chunk.content:
            break
    status = manager.status()
    assert (status["running"], status["queued"]) == (0, 0)


class Person(BaseModel):
    """A person."""

    name: str = Field(description="first name", max_length=30)
    age: int


class PersonDict(TypedDict):
    name: str
    age: int


def test_structured_output_in_both_modes(chat):
    chat = chat.model_copy(update={"max_tokens": 60})
    ask = "Describe a person with a name and an age."
    person = chat.with_structured_output(Person).invoke(ask)
    assert isinstance(person, Person)
    as_dict = chat.with_structured_output(PersonDict).invoke(ask)
    assert as_dict == person.model_dump()  # the same schema, the same greedy reply
    streamed = list(chat.with_structured_output(PERSON_SCHEMA).stream(ask))
    assert streamed[-1] == as_dict
    raw = chat.with_structured_output(Person, include_raw=True).invoke(ask)
    assert raw["parsed"] == person and raw["parsing_error"] is None and isinstance(raw["raw"], AIMessage)
    assert isinstance(chat.with_structured_output(None, method="json_mode").invoke(ask), dict)


def test_include_raw_keeps_a_reply_that_does_not_parse(local_model):
    cut = PlaygroundChatModel(manager=local_model, temperature=0, max_tokens=3).with_structured_output(
        Person, include_raw=True)
    result = cut.invoke("Describe a person.")  # three tokens cannot close the object
    assert result["parsed"] is None and result["parsing_error"] is not None
    assert result["raw"].response_metadata["finish_reason"] == "length"


def test_langsmith_params_name_the_model(chat):
    params = chat.model_copy(update={"stop": ["\n"]})._get_ls_params(stop=["END"])
    assert params["ls_provider"] == "yuan-playground" and params["ls_model_type"] == "chat"
    assert params["ls_temperature"] == 0 and params["ls_max_tokens"] == 12 and params["ls_stop"] == ["\n", "END"]
    if chat.base_url:  # over HTTP: the server's URL until a reply names the model
        chat.invoke("Hi")
    assert chat._get_ls_params()["ls_model_name"] == "SmolLM2-135M-Instruct"
    assert chat._get_ls_params(model="other")["ls_model_name"] == "other"
