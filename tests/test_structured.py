"""Structured output: the format type, constrained decoding on local models (SmolLM2 and Yuan's tokenizer), the
OpenAI routes through the official client, and the pass-through to a remote engine."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest
from pydantic import BaseModel

from fake_engine import FakeEngine
from harness import chat_call, chat_reply

from playground.errors import ParameterError
from playground.manager import ModelManager
from playground.structured import ResponseFormat, reply_vocabulary

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name", "age"],
}
PERSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
ASK_PERSON = [{"role": "user", "content": "Describe a person as JSON with a name and an age."}]
GREEDY = {"temperature": 0, "max_new_tokens": 60}
SAMPLED = {"temperature": 1.0, "top_p": 0.95, "top_k": 0, "seed": 7, "max_new_tokens": 60}
# Whose minimal instance is short: a random model can only choose true/false and one of two words.
TINY = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "colour": {"enum": ["red", "green"]}},
    "required": ["ok", "colour"],
}


class Person(BaseModel):
    name: str
    age: int


@pytest.fixture(scope="module")
def manager(embedded_manager) -> ModelManager:
    """The session's manager with the embedded model."""
    return embedded_manager


# ------------------------------------------------------------------------------------------ the format type


def test_formats_parse_from_openais_wire_shape():
    assert ResponseFormat.parse(None) is None and ResponseFormat.parse({"type": "text"}) is None
    assert ResponseFormat.parse({"type": "json_object"}).json_schema_dict == {"type": "object"}
    parsed = ResponseFormat.parse(PERSON_FORMAT)
    assert parsed.json_schema_dict == PERSON and parsed.to_wire() == PERSON_FORMAT
    assert ResponseFormat.parse(parsed) is parsed
    assert ResponseFormat.for_schema(Person).json_schema.name == "Person"
    assert ResponseFormat.for_schema(PERSON, name="a person!").json_schema.name == "a_person_"
    assert ResponseFormat.pattern(r"\d+").to_wire() == {"type": "regex", "regex": r"\d+"}


@pytest.mark.parametrize("value, says", [
    ({"type": "xml"}, "response_format.type: Input should be"),
    ({"type": "json_schema"}, "type json_schema needs the field json_schema"),
    ({"type": "json_object", "regex": "a"}, "the field regex belongs to type regex"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format.json_schema.schema: Field required"),
    ({"type": "json_object", "colour": "red"}, "response_format.colour: is not a field"),
    ({"type": "json_schema", "json_schema": {"schema": {"description": "\ud800"}}}, "half of a UTF-16 surrogate pair"),
    ("json", "must be an object"),
])
def test_malformed_formats_are_refused_by_name(value, says):
    with pytest.raises(ParameterError, match=re.escape(says)) as raised:
        ResponseFormat.parse(value)
    assert raised.value.field == "response_format"


@pytest.mark.parametrize("value, says", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {
        "a": {"type": "colour"}}}}},
     'the JSON schema cannot be used for constrained decoding: Unsupported type "colour"'),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/$defs/missing"}}}, "missing"),
    ({"type": "regex", "regex": "(ab"}, "the regular expression cannot be used"),
    ({"type": "grammar", "grammar": "root ::= undefined_rule"}, 'Rule "undefined_rule" is not defined'),
])
def test_formats_the_library_cannot_compile_are_parameter_errors(manager, value, says):
    with pytest.raises(ParameterError, match=re.escape(says)) as raised:
        manager.generate(messages=ASK_PERSON, params=GREEDY, response_format=value)
    assert raised.value.field == "response_format"
    assert "/project/cpp" not in str(raised.value)  # xgrammar's source location is not the user's business


# ------------------------------------------------------------------------------------------ local decoding


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
@pytest.mark.parametrize("response_format", [{"type": "json_object"}, PERSON_FORMAT], ids=["json_object", "schema"])
def test_local_replies_are_valid_json_and_end_with_the_structure(manager, params, response_format):
    result = manager.generate(messages=ASK_PERSON, params=params, response_format=response_format, logprobs=0)
    assert result.stats.finish_reason == "stop", result.text
    value = json.loads(result.text)
    jsonschema.validate(value, ResponseFormat.parse(response_format).json_schema_dict)
    # It stopped at the closing brace: no end-of-reply token was needed (one forward pass fewer).
    assert result.tokens[-1].text.endswith("}") and result.stats.new_tokens == len(result.tokens)


def test_the_constraint_is_done_exactly_when_the_structure_closes(manager):
    import torch

    compiled = manager._backend.structured().compile(ResponseFormat.parse(PERSON_FORMAT))
    constraint = compiled.constraint(prompt_tokens=0)
    ids = manager.loaded.tokenizer('{"name": "Al", "age": 30}', add_special_tokens=False)["input_ids"]
    done = [constraint.done(torch.tensor([ids[:length]])) for length in range(1, len(ids) + 1)]
    assert done == [False] * (len(ids) - 1) + [True]  # "30" could still grow until the brace


def test_the_grammar_composes_with_sampling(manager):
    first = manager.generate(messages=ASK_PERSON, params=SAMPLED, response_format=PERSON_FORMAT)
    again = manager.generate(messages=ASK_PERSON, params=SAMPLED, response_format=PERSON_FORMAT)
    other = manager.generate(messages=ASK_PERSON, params={**SAMPLED, "temperature": 1.5, "seed": 8},
                             response_format=PERSON_FORMAT)
    assert first.text == again.text  # the same seed, the same constrained sample
    assert json.loads(other.text).keys() == {"name", "age"}
    # The distribution sampled from (after the grammar, then the warpers) has only tokens that open the object.
    traced = manager.generate(messages=ASK_PERSON, params=SAMPLED, response_format=PERSON_FORMAT, logprobs=5)
    assert traced.tokens[0].sampled_top and all(text.startswith("{") for _, text, _ in traced.tokens[0].sampled_top)
    assert not all(text.startswith("{") for _, text, _ in traced.tokens[0].top)  # the model alone would say more


def test_regex_and_grammar_modes(manager):
    pattern = r"(yes|no), because [a-z ]{1,30}\."
    answer = manager.generate(messages=[{"role": "user", "content": "Is the sky blue?"}], params=GREEDY,
                              response_format={"type": "regex", "regex": pattern})
    assert re.fullmatch(pattern, answer.text) and answer.stats.finish_reason == "stop"
    grammar = 'root ::= "Colour: " ("red" | "green" | "blue")'
    colour = manager.generate(messages=[{"role": "user", "content": "Name a colour."}], params=GREEDY,
                              response_format={"type": "grammar", "grammar": grammar})
    assert colour.text in ("Colour: red", "Colour: green", "Colour: blue")


def test_a_penalty_that_bans_every_allowed_token_does_not_break_the_reply(manager):
    # no_repeat_ngram_size 1 forbids every token already generated, the quotes of the second key included.
    result = manager.generate(messages=ASK_PERSON, params={**GREEDY, "no_repeat_ngram_size": 1},
                              response_format=PERSON_FORMAT)
    jsonschema.validate(json.loads(result.text), PERSON)


def test_yuan_tokenizer_under_a_json_grammar(new_manager, tmp_path_factory, yuan_tokenizer_dir):
    from playground.models.yuan.make_tiny import make_tiny_checkpoint

    folder = make_tiny_checkpoint(tmp_path_factory.mktemp("yuan-structured") / "Yuan2-tiny", seed=11,
                                  tokenizer_dir=yuan_tokenizer_dir, hidden_size=128, attention_projection_size=256,
                                  num_attention_heads=2, num_hidden_layers=1)
    yuan = new_manager()
    assert yuan.load(folder, device="cpu")["chat_format"] == "yuan"
    loaded = yuan.require_local("the test")
    vocabulary = reply_vocabulary(loaded.tokenizer, loaded.chat_format, 135040, frozenset({77185})).decoded_vocab
    assert vocabulary[loaded.tokenizer.convert_tokens_to_ids("<n>")] == b"\n"  # a line break in a reply
    assert vocabulary[loaded.tokenizer.convert_tokens_to_ids("<sep>")] == b""  # never inside a structure
    for seed in range(3):  # random weights, sampled: whatever the model prefers, the grammar decides the shape
        params = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "seed": seed, "max_new_tokens": 24}
        result = yuan.generate(messages=[{"role": "user", "content": "状态?"}], params=params,
                               response_format=ResponseFormat.for_schema(TINY))
        assert result.stats.finish_reason == "stop", result.text
        jsonschema.validate(json.loads(result.text), TINY)


# ------------------------------------------------------------------------------------------ the OpenAI routes


@pytest.fixture(scope="module")
def client(launched_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{launched_server.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(launched_server) -> str:
    return launched_server.status()["name"]


def test_openai_client_gets_schema_valid_json(client, model):
    reply = client.chat.completions.create(model=model, messages=ASK_PERSON, temperature=0, max_tokens=60,
                                           response_format=PERSON_FORMAT)
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].message.content), PERSON)
    chunks = client.chat.completions.create(messages=ASK_PERSON, temperature=0, max_tokens=60, stream=True,
                                            response_format=PERSON_FORMAT, model=model)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert streamed == reply.choices[0].message.content
    parsed = client.chat.completions.parse(messages=ASK_PERSON, temperature=1.0, seed=3, max_tokens=60,
                                           response_format=Person, model=model)
    assert isinstance(parsed.choices[0].message.parsed, Person)


def test_openai_client_completions_take_a_response_format(client, model):
    ask = dict(model=model, prompt="A person as JSON:", temperature=0, max_tokens=60,
               extra_body={"response_format": {"type": "json_object"}})
    text = client.completions.create(**ask).choices[0].text
    assert isinstance(json.loads(text), dict)
    streamed = "".join(chunk.choices[0].text for chunk in client.completions.create(**ask, stream=True)
                       if chunk.choices)
    assert streamed == text


def test_an_uncompilable_schema_is_a_400_naming_the_problem(client, model):
    broken = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "colour"}}}
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as raised:
            client.chat.completions.create(model=model, messages=ASK_PERSON, response_format=broken, stream=stream)
        assert raised.value.status_code == 400 and raised.value.param == "response_format"
        assert 'Unsupported type "colour"' in raised.value.message
    with pytest.raises(openai.BadRequestError, match="response_format.type"):
        client.chat.completions.create(model=model, messages=ASK_PERSON, response_format={"type": "xml"})


# ------------------------------------------------------------------------------------------ a remote engine


def test_the_format_is_passed_through_to_a_remote_engine(new_manager):
    with FakeEngine() as engine:
        remote = new_manager()
        remote.load_remote(engine.base_url)
        remote.generate(messages=ASK_PERSON, params={"max_new_tokens": 8}, response_format=PERSON_FORMAT)
        assert engine.requests[-1]["body"]["response_format"] == PERSON_FORMAT
        remote.generate(prompt="A person:", params={"max_new_tokens": 8}, response_format={"type": "json_object"})
        assert engine.requests[-1]["path"] == "/completions"
        assert engine.requests[-1]["body"]["response_format"] == {"type": "json_object"}
        remote.generate(prompt="A person:", params={"max_new_tokens": 8})
        assert "response_format" not in engine.requests[-1]["body"]
        sent = len(engine.requests)
        with pytest.raises(ParameterError, match="regex is not available on the remote engine"):
            remote.generate(prompt="A number:", response_format={"type": "regex", "regex": r"\d+"})
        assert len(engine.requests) == sent  # refused before anything was sent


def test_regex_goes_to_a_remote_playground(new_manager):
    with FakeEngine(owned_by="yuan-playground") as engine:
        remote = new_manager()
        remote.load_remote(engine.base_url)
        remote.generate(prompt="A number:", params={"max_new_tokens": 8},
                        response_format={"type": "regex", "regex": r"\d+"})
        assert engine.requests[-1]["body"]["response_format"] == {"type": "regex", "regex": r"\d+"}


# ------------------------------------------------------------------------------------- the chat and the lab


COLOUR = {"type": "object", "properties": {"colour": {"type": "string", "maxLength": 12}}, "required": ["colour"]}
CHAT_SETTINGS = dict(temperature=0.0, top_p=0.9, top_k=50, min_p=0.0, typical_p=1.0, repetition_penalty=1.1,
                     no_repeat_ngram_size=0, max_new_tokens=40, seed=1, stop="")


def test_the_chat_and_the_lab_take_a_schema_and_check_the_reply(launched_server):
    from gradio_client import Client

    from playground.ui.lab_tab import SETTING_FIELDS

    ui = Client(launched_server.url, verbose=False)
    chat, status, _ = ui.predict(**chat_call("Name a colour as JSON.", **CHAT_SETTINGS), response_schema=json.dumps(COLOUR),
                                 api_name="/chat")
    assert "valid JSON matching the schema" in status, status
    shown = chat_reply(chat)  # the reply alone: what its copy button copies
    jsonschema.validate(json.loads(shown), COLOUR)
    assert "\n  " in shown  # pretty-printed for people
    _, refused, box = ui.predict(**chat_call("Hi", **CHAT_SETTINGS), response_schema="{not json", api_name="/chat")
    assert "the structured-output schema is not JSON" in refused and box == "Hi"
    row = [0.0, 0.9, 50, 0.0, 1.0, 1.1, 0, 40, 1]
    table = {"headers": SETTING_FIELDS, "data": [row, [0.7, *row[1:]]]}
    out = ui.predict("Name a colour as JSON.", table, json.dumps(COLOUR), api_name="/lab_run")
    assert out[14].startswith("Done"), out[14]
    notes = [note["value"] if isinstance(note, dict) else note for note in out[6:8]]
    assert all("valid JSON matching the schema" in note for note in notes), notes
