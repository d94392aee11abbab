"""Request bodies of the OpenAI-compatible routes, validated by pydantic.

Fields OpenAI defines that this server cannot honour are rejected with a reason (n > 1, non-zero
presence/frequency penalties, tools...) rather than silently ignored; unknown extra fields are ignored,
as OpenAI clients send some (user, metadata...). Ranges of the sampling fields are checked by
SamplingParams, the type every part of the playground shares; `response_format` is the playground's
ResponseFormat (json_object, json_schema, and the extensions regex and grammar), on both routes.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

from playground.api.http_errors import from_parameter_error
from playground.errors import ParameterError
from playground.params import SAMPLING_FIELDS, WIRE_NAMES, SamplingParams, from_wire, reject_bools, request_fields
from playground.structured import ResponseFormat

MAX_TOP_LOGPROBS = 20
# Every sampling field of the playground's registry under its wire name: OpenAI's own, vLLM-style extensions and
# those only transformers has (typical_p, no_repeat_ngram_size). A local model honours them all; in front of a remote
# engine a non-default value the engine cannot take is a 400 naming it (RemoteEngine.request_fields), never dropped.
SamplingFields = create_model("SamplingFields", **request_fields(SAMPLING_FIELDS, wire=True))


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingRequest(SamplingFields):
    """What chat and text completions share: the model, sampling fields and streaming."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, description="the loaded model's id (GET /v1/models); omit for the loaded one")
    n: int | None = Field(1, description="only 1 is supported")
    presence_penalty: float | None = Field(0, description="only 0 is supported")
    frequency_penalty: float | None = Field(0, description="only 0 is supported")
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = Field(
        None, description='structured output: {"type": "json_object"}, {"type": "json_schema", "json_schema": '
                          '{"name", "schema", "strict"}}, or this server\'s {"type": "regex", "regex": ...} and '
                          '{"type": "grammar", "grammar": EBNF}')

    @field_validator("n", "presence_penalty", "frequency_penalty", mode="before")
    @classmethod
    def _no_bools(cls, value: Any) -> Any:
        return reject_bools(value)

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int | None) -> int | None:
        if value not in (None, 1):
            raise ValueError(f"only n=1 is supported (one choice per request), got {value}")
        return value

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_openai_penalties(cls, value: float | None, info) -> float | None:
        if value not in (None, 0):
            raise ValueError(
                f"transformers has no {info.field_name.replace('_', ' ')} processor, so only 0 is accepted; "
                "the repetition penalty (an extension of this server) is the nearest alternative"
            )
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, value: dict | None) -> dict | None:
        if value:
            raise ValueError("logit_bias is not supported by this server")
        return value

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling_params(self) -> SamplingParams:
        """The validated SamplingParams; fields the client left out keep the playground's defaults."""
        try:
            return SamplingParams.parse(from_wire(self.model_dump(include=set(SamplingFields.model_fields))))
        except ParameterError as exc:
            raise from_parameter_error(exc, WIRE_NAMES) from None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    # "developer" is OpenAI's newer name for the system role.
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def as_dict(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(None, description="OpenAI's newer name for max_tokens")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[dict[str, Any]] | None = None

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, value: list | None) -> list | None:
        if value:
            raise ValueError("tool calling is not supported by this server")
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _with_logprobs(cls, value: int | None, info) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs set to true")
        return value

    @field_validator("messages")
    @classmethod
    def _something_to_answer(cls, value: list[ChatMessage]) -> list[ChatMessage]:
        if not value:
            raise ValueError("give at least one message to answer")
        # The chat template would wrap blank turns into a non-empty prompt; there is still nothing to answer.
        if all(not message.as_dict()["content"].strip() for message in value):
            raise ValueError("every message is empty or only whitespace")
        return value

    @model_validator(mode="after")
    def _settle(self) -> "ChatCompletionRequest":
        # OpenAI's newer name for the wire's max_tokens; the older one wins if both are sent.
        if self.max_tokens is None:
            self.max_tokens = self.max_completion_tokens
        return self

    def message_dicts(self) -> list[dict[str, str]]:
        return [message.as_dict() for message in self.messages]

    @property
    def logprobs_count(self) -> int | None:
        """What manager.stream's `logprobs` takes: top alternatives per token, or None for no logprobs."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(SamplingRequest):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="top alternatives per token")
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError(f"give one prompt (a string, or a list of one string), got {len(value)}")
        return value

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool) -> bool:
        if value:
            raise ValueError("echo is not supported by this server")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value:
            raise ValueError("suffix (insertion) is not supported by this server")
        return value

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, value: int | None) -> int | None:
        if value not in (None, 1):
            raise ValueError(f"only best_of=1 is supported, got {value}")
        return value

    @property
    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]
