"""A LangChain chat model for the playground: in-process through the model manager, or over HTTP.

    from playground.integrations.langchain import PlaygroundChatModel

    chat = PlaygroundChatModel(manager=manager, temperature=0)          # a ModelManager of this process
    chat = PlaygroundChatModel(base_url="http://127.0.0.1:7860",        # a running playground server
                               api_key="...", temperature=0)
    chat.invoke("Hello"); chat.stream("Hello"); chat.batch(["Hi", "Bye"])
    chat.with_structured_output(Person).invoke("Describe a person")    # a Person, decoded under its JSON schema

In-process, give it the manager the app was built with (`app.state.manager`) or one of your own with a model
loaded (`ModelManager().load()`); generations queue with every other caller of that manager. Over HTTP it speaks the server's /v1/chat/completions with server-sent events.
Sampling fields left unset keep the playground's defaults (SamplingParams). Structured output sends a
`response_format` (playground.structured) and parses the reply; there is no tool calling.
"""

from __future__ import annotations

from contextlib import closing
from operator import itemgetter
from typing import Any, Iterator, Literal

import openai
from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import LanguageModelInput
from langchain_core.language_models.base import LangSmithParams
from langchain_core.language_models.chat_models import BaseChatModel, generate_from_stream
from langchain_core.messages import AIMessageChunk, BaseMessage, ChatMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
from langchain_core.utils.function_calling import convert_to_json_schema
from langchain_core.utils.pydantic import is_basemodel_subclass
from pydantic import ConfigDict, Field, PrivateAttr, SecretStr, create_model

from playground.errors import PlaygroundError
from playground.generation.events import openai_finish_reason
from playground.params import OPENAI_FIELDS, SAMPLING_FIELDS, SamplingParams, from_wire, request_fields
from playground.structured import ResponseFormat

# LangChain message types -> chat roles.
ROLES = {"system": "system", "human": "user", "ai": "assistant"}
LS_PROVIDER = "yuan-playground"  # what LangSmith traces name as the provider


class PlaygroundAPIError(PlaygroundError):
    """The server answered with an error (its OpenAI-shaped message is kept)."""

    def __init__(self, status_code: int, message: str):
        super().__init__(f"{status_code}: {message}")
        self.status_code = status_code


# The OpenAI-style sampling fields (LangChain's names, as ChatOpenAI has them), from the playground's registry.
WIRE_SAMPLING_NAMES = [SAMPLING_FIELDS[name].wire_name for name in OPENAI_FIELDS]
_SamplingChatModel = create_model("_SamplingChatModel", __base__=BaseChatModel,
                                  **request_fields(OPENAI_FIELDS, wire=True))


class PlaygroundChatModel(_SamplingChatModel):
    """The playground's loaded model as a LangChain chat model (invoke, stream, batch and their async forms)."""

    model_config = ConfigDict(populate_by_name=True)

    model_name: str | None = Field(None, alias="model", description="None: whichever model is loaded")
    base_url: str | None = Field(None, description="a playground server, e.g. http://127.0.0.1:7860 "
                                                    "(or give `manager`)")
    manager: Any = Field(None, exclude=True, repr=False,
                         description="a ModelManager of this process, for in-process use (or give `base_url`)")
    api_key: SecretStr | None = Field(None, description="the server's --api-key, if it has one")
    timeout: float = Field(300.0, description="seconds to wait for a server (HTTP mode)")
    _last_served: str | None = PrivateAttr(None)  # the model the server named in its latest reply (HTTP mode)

    @property
    def _llm_type(self) -> str:
        return "yuan-playground"

    def _manager(self):
        if self.manager is None:
            raise PlaygroundError("PlaygroundChatModel needs base_url (a playground server) or manager (a ModelManager "
                                  "of this process)")
        return self.manager

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        """LangSmith's standard fields: which model answered, its temperature, token limit and stop strings."""
        params = super()._get_ls_params(stop=stop, **kwargs)
        model = kwargs.get("model")
        params.update(ls_provider=LS_PROVIDER, ls_model_type="chat",
                      ls_model_name=model if isinstance(model, str) else self.served_model())
        stops = self._sampling(stop).get("stop")
        if stops:
            params["ls_stop"] = stops
        return params

    def served_model(self) -> str:
        """The model's name: the one asked for, else the loaded one (in-process) or the one the server named in its
        latest reply (over HTTP; the server's URL before any reply)."""
        if self.model_name:
            return self.model_name
        if self.base_url is None:
            loaded = self._manager().loaded
            return loaded.name if loaded is not None else "no model loaded"
        return self._last_served or server_root(self.base_url)

    def with_structured_output(
        self,
        schema: dict[str, Any] | type | None = None,
        *,
        method: Literal["json_schema", "function_calling", "json_mode"] = "json_schema",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, Any]:
        """A runnable whose output is `schema`'s type: a pydantic model's instance, else a dict.

        `schema`: a pydantic model class, a TypedDict or a JSON Schema dict. `method`: "json_schema" (the default)
        holds the reply to the schema by constrained decoding; "function_calling" does the same (there is no tool
        calling here, so the schema is decoded directly); "json_mode" only makes the reply a JSON object (ask for
        the keys in the prompt). `strict` is accepted; the schema is always enforced. `include_raw`: return
        {"raw": AIMessage, "parsed": ..., "parsing_error": ...} as LangChain's own models do.
        """
        if kwargs:
            raise ValueError(f"unexpected arguments to with_structured_output: {', '.join(sorted(kwargs))}")
        if method not in ("json_schema", "function_calling", "json_mode"):
            raise ValueError(f"method must be json_schema, function_calling or json_mode, got {method!r}")
        if schema is None and method != "json_mode":
            raise ValueError(f"method {method} needs a schema")
        if method == "json_mode":
            response_format = ResponseFormat.json_object()
        else:
            json_schema = convert_to_json_schema(schema)
            response_format = ResponseFormat.for_schema(json_schema, name=json_schema.get("title"))
        # LangSmith records the schema of a structured call (LangChain's own models do the same).
        traced = {} if schema is None else {
            "ls_structured_output_format": {"kwargs": {"method": method, "strict": strict}, "schema": schema}}
        bound = self.bind(response_format=response_format.to_wire(), **traced)
        parser = PydanticOutputParser(pydantic_object=schema) if is_pydantic_class(schema) else JsonOutputParser()
        if not include_raw:
            return bound | parser
        parsed = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
        unparsed = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=bound) | parsed.with_fallbacks([unparsed], exception_key="parsing_error")

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.model_name, "base_url": self.base_url, **self._sampling()}

    def _sampling(self, stop: list[str] | None = None) -> dict[str, Any]:
        """The sampling fields that are set, in the OpenAI API's names; `stop` adds to the model's own."""
        values = {name: getattr(self, name) for name in WIRE_SAMPLING_NAMES}
        own = [values["stop"]] if isinstance(values["stop"], str) else values["stop"] or []
        values["stop"] = [*own, *(stop or [])] or None  # LangChain's stop argument adds to the model's own
        return {name: value for name, value in values.items() if value is not None}

    # ------------------------------------------------------------------------------------ LangChain hooks

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return generate_from_stream(self._stream(messages, stop=stop, run_manager=run_manager, **kwargs))

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        chat = [chat_message(message) for message in messages]
        model = kwargs.pop("model", None) or self.model_name  # a per-call model, as LangChain's models take
        response_format = ResponseFormat.parse(kwargs.pop("response_format", None))
        sampling = {**self._sampling(stop), **kwargs}
        chunks = (self._remote_chunks(chat, sampling, model, response_format) if self.base_url
                  else self._local_chunks(chat, sampling, model, response_format))
        with closing(chunks):  # stopping early (a caller breaking out) cancels the generation
            for chunk in chunks:
                if run_manager and chunk.text:
                    run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk

    # ------------------------------------------------------------------------------------------ backends

    def _local_chunks(self, messages: list[dict[str, str]], sampling: dict[str, Any], model: str | None,
                      response_format: ResponseFormat | None) -> Iterator[ChatGenerationChunk]:
        manager = self._manager()
        name = manager.require_model().name
        if model and model != name:
            raise PlaygroundError(f"the model {model!r} is not loaded; the manager has {name!r}")
        params = SamplingParams.parse(from_wire(sampling))
        events = manager.stream(messages=messages, params=params, owner="langchain", response_format=response_format)
        with closing(events):
            for event in events:
                if event.kind == "delta" and event.text:
                    yield ChatGenerationChunk(message=AIMessageChunk(content=event.text))
                elif event.kind == "done":
                    stats = event.stats
                    if stats.finish_reason == "error":
                        raise PlaygroundError(f"the generation failed: {stats.error}")
                    yield last_chunk(name, openai_finish_reason(stats.finish_reason), stats.prompt_tokens, stats.new_tokens, stats.cached_tokens)

    def _remote_chunks(self, messages: list[dict[str, str]], sampling: dict[str, Any], model: str | None,
                       response_format: ResponseFormat | None) -> Iterator[ChatGenerationChunk]:
        client = openai.OpenAI(base_url=server_root(self.base_url) + "/v1", timeout=self.timeout, max_retries=0,
                               api_key=self.api_key.get_secret_value() if self.api_key else "none")
        # The playground's own fields (top_k, min_p, regex formats...) are beyond OpenAI's typed parameters: they go
        # in the body as they are, and the server validates them all.
        extra = {**sampling, **({"response_format": response_format.to_wire()} if response_format else {})}
        served, reason, usage = model or "", "stop", None
        try:
            with client.chat.completions.create(model=model or "", messages=messages, stream=True,
                                                stream_options={"include_usage": True}, extra_body=extra) as stream:
                for chunk in stream:
                    served = self._last_served = chunk.model or served
                    usage = chunk.usage or usage
                    for choice in chunk.choices:
                        reason = choice.finish_reason or reason
                        if choice.delta.content:
                            yield ChatGenerationChunk(message=AIMessageChunk(content=choice.delta.content))
        except openai.APIStatusError as exc:
            raise PlaygroundAPIError(exc.status_code, error_message(exc)) from None
        except openai.APIError as exc:  # an error event in the stream, or no answer at all
            raise PlaygroundAPIError(getattr(exc, "status_code", None) or 500, error_message(exc)) from None
        details = usage.prompt_tokens_details if usage else None
        yield last_chunk(served, reason, usage.prompt_tokens if usage else 0, usage.completion_tokens if usage else 0,
                         (details.cached_tokens if details else 0) or 0)


# -------------------------------------------------------------------------------------------- helpers


def is_pydantic_class(schema: Any) -> bool:
    """A pydantic model class (v2, or v1 through pydantic.v1): parsed into an instance, not a dict."""
    return isinstance(schema, type) and is_basemodel_subclass(schema)


def chat_message(message: BaseMessage) -> dict[str, str]:
    role = message.role if isinstance(message, ChatMessage) else ROLES.get(message.type)
    if role not in ("system", "user", "assistant"):
        raise PlaygroundError(
            f"{type(message).__name__} is not supported: the playground takes system, human and AI messages"
        )
    return {"role": role, "content": message.text}


def last_chunk(model: str, finish_reason: str, prompt_tokens: int, completion_tokens: int,
               cached_tokens: int = 0) -> ChatGenerationChunk:
    """The closing chunk: no text, but the finish reason, the model and the token counts (with the prompt's tokens
    read from the prompt cache)."""
    usage = UsageMetadata(
        input_tokens=prompt_tokens, output_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens,
        input_token_details={"cache_read": cached_tokens},
    )
    metadata = {"finish_reason": finish_reason, "model_name": model}
    return ChatGenerationChunk(
        message=AIMessageChunk(content="", usage_metadata=usage, response_metadata=metadata, chunk_position="last"),
        generation_info={"finish_reason": finish_reason},
    )


def server_root(base_url: str) -> str:
    """The server's root URL; OpenAI-style base URLs ending in /v1 are accepted too."""
    return base_url.rstrip("/").removesuffix("/v1")


def error_message(exc: openai.APIError) -> str:
    """The server's own words: the `message` of its OpenAI-shaped error, else what the client says."""
    body = exc.body if isinstance(exc.body, dict) else {}
    return str(body.get("message") or exc.message)
