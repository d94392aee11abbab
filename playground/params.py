"""Sampling parameters: one validated type, and the registry of its fields that every part of the playground reads.

`SamplingParams` declares each field once, with its limits and where it is accepted (a `Limits` in the field's
metadata). `SAMPLING_FIELDS` is derived from it: the chat's controls, the lab's table and sweep, the explorer's
sliders, the HTTP request schemas, the LangChain model and the remote engine's capability table all come from
there, so a field's name, range, default and help are written here and nowhere else.

They are applied through transformers' own generation (GenerationConfig → its logits processors, stop
strings and streamer); nothing here samples by hand.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any, Iterable, Literal, Mapping

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from playground.errors import ParameterError, not_unicode

MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 200
MAX_NEW_TOKENS_LIMIT = 8192
SEED_LIMIT = 2**32 - 1

# Where a field is accepted beyond the playground's own UI and POST /:
#   "openai": a field of OpenAI's own request schema;
#   "vllm":   an extension that vLLM's OpenAI server and this server's /v1 routes both take;
#   "local":  the local backend only (transformers has it; OpenAI-style servers do not).
Api = Literal["openai", "vllm", "local"]


@dataclass(frozen=True)
class Limits:
    """What a field's declaration in SamplingParams says beyond its type, default and help."""

    reads: str  # how the allowed values read in messages and hints
    low: float | None = None
    high: float | None = None
    exclusive_low: bool = False  # a value of exactly `low` makes no sense (top_p 0)
    api: Api = "local"
    wire_name: str | None = None  # its name in OpenAI-style requests, where that differs
    step: float = 1  # a UI control's step
    slider: tuple[float, float] | None = None  # the explorer's slider range, for fields that shape the distribution
    example: tuple[float, ...] | None = None  # the lab's example: its default table and sweep vary this field so

    def check(self, value: Any) -> str | None:
        """Why `value` is out of range, or None."""
        if value is None or self.low is None:
            return None
        if isinstance(value, float) and math.isnan(value):
            return f"must be {self.reads}"
        too_low = value <= self.low if self.exclusive_low else value < self.low
        if too_low or value > self.high:
            return f"must be {self.reads}, got {int(value) if float(value).is_integer() else value}"
        return None


def reject_bools(value: Any) -> Any:
    # bool is an int in Python; `top_k: true` is a client bug, not 1.
    if isinstance(value, bool):
        raise ValueError("must be a number, not true/false")
    return value


class SamplingParams(BaseModel):
    """How one reply is sampled. temperature 0 means greedy decoding."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    temperature: Annotated[float, Limits(
        "between 0 and 5 (0 means greedy)", 0.0, 5.0, api="openai", step=0.05, slider=(0, 2), example=(0.0, 0.7, 1.2),
    )] = Field(0.7, allow_inf_nan=False, title="Temperature",
                description="flattens (above 1) or sharpens (below 1) the distribution")
    top_p: Annotated[float, Limits(
        "greater than 0 and at most 1", 0.0, 1.0, exclusive_low=True, api="openai", step=0.01, slider=(0.01, 1),
    )] = Field(0.9, allow_inf_nan=False, title="Top-p",
                description="keeps the smallest set of tokens holding this much probability")
    top_k: Annotated[int, Limits(
        "an integer between 0 and 10000 (0 turns it off)", 0, 10_000, api="vllm", slider=(0, 200),
    )] = Field(50, description="keeps the k most likely tokens", title="Top-k")
    min_p: Annotated[float, Limits(
        "between 0 and 1 (0 turns it off)", 0.0, 1.0, api="vllm", step=0.01, slider=(0, 1),
    )] = Field(0.0, allow_inf_nan=False, title="Min-p",
                description="drops tokens less likely than this fraction of the top one")
    typical_p: Annotated[float, Limits(
        "greater than 0 and at most 1 (1 turns it off)", 0.0, 1.0, exclusive_low=True, step=0.01,
    )] = Field(1.0, allow_inf_nan=False, description="locally typical sampling", title="Typical-p")
    repetition_penalty: Annotated[float, Limits(
        "greater than 0 and at most 10 (1 turns it off)", 0.0, 10.0, exclusive_low=True, api="vllm", step=0.01,
        slider=(0.5, 2),
    )] = Field(1.0, allow_inf_nan=False, title="Repetition penalty",
                description="makes tokens already in the text less likely")
    no_repeat_ngram_size: Annotated[int, Limits(
        "an integer between 0 and 64 (0 turns it off)", 0, 64,
    )] = Field(0, description="never repeats an n-gram of this size", title="No-repeat n-gram size")
    max_new_tokens: Annotated[int, Limits(
        f"an integer between 1 and {MAX_NEW_TOKENS_LIMIT}", 1, MAX_NEW_TOKENS_LIMIT, api="openai",
        wire_name="max_tokens",
    )] = Field(256, description="new tokens at most", title="Max new tokens")
    seed: Annotated[int | None, Limits(
        f"an integer between 0 and {SEED_LIMIT}, or empty for a random seed", 0, SEED_LIMIT, api="openai",
    )] = Field(None, title="Seed",
                description="the same seed and settings give the same text; empty: a new random seed")
    stop: Annotated[list[str], Limits(
        f"at most {MAX_STOP_STRINGS} strings of 1 to {MAX_STOP_LENGTH} characters", api="openai",
    )] = Field(default_factory=list, description="the reply ends before any of these strings", title="Stop strings")

    @field_validator("*", mode="before")
    @classmethod
    def _reject_bools(cls, value: Any) -> Any:
        return reject_bools(value)

    @field_validator("*", mode="after")
    @classmethod
    def _in_range(cls, value: Any, info) -> Any:
        problem = SAMPLING_FIELDS[info.field_name].limits.check(value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value: Any) -> Any:
        if value is None:
            return []
        if isinstance(value, str):
            return [value]
        return value

    @field_validator("stop", mode="after")
    @classmethod
    def _stop_strings(cls, value: list[str]) -> list[str]:
        if len(value) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(value)}")
        for text in value:
            if not text:
                raise ValueError("stop strings must not be empty")
            if len(text) > MAX_STOP_LENGTH:
                raise ValueError(f"each stop string must be at most {MAX_STOP_LENGTH} characters")
            problem = not_unicode(text, "a stop string")
            if problem:
                raise ValueError(problem)
        return value

    @classmethod
    def parse(cls, values: Mapping[str, Any] | "SamplingParams" | None = None, **overrides: Any) -> "SamplingParams":
        """Validate a dict (from the UI or an API); raises ParameterError naming the field and its range."""
        if isinstance(values, SamplingParams):
            values = values.model_dump()
        merged = {**(values or {}), **overrides}
        try:
            return cls(**merged)
        except ValidationError as exc:
            raise parameter_error(exc) from None

    @classmethod
    def from_form(cls, values: Mapping[str, Any]) -> "SamplingParams":
        """Values typed into a form (the chat's boxes, a lab table row): a blank keeps the field's default.

        Text and whole floats are converted by pydantic's own rules ("0.7" -> 0.7, 64.0 -> 64; 2.5 is not an
        integer), so every form converts the same way.
        """
        return cls.parse({name: plain(value) for name, value in values.items() if not is_blank(value)})

    @classmethod
    def one_forward_pass(cls) -> "SamplingParams":
        """A budget of one new token: what a single forward pass (the next-token explorer's) needs room for."""
        return cls(max_new_tokens=1)

    def replace(self, **changes: Any) -> "SamplingParams":
        return SamplingParams.parse(self, **changes)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def describe(self, names: Iterable[str]) -> str:
        """`name value` pairs for a summary line."""
        return ", ".join(f"{name} {getattr(self, name)}" for name in names)

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for transformers' `generate` (the caller adds the tokenizer for stop strings)."""
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "repetition_penalty": self.repetition_penalty,
            "no_repeat_ngram_size": self.no_repeat_ngram_size,
        }
        if self.greedy:
            # Unset the sampling knobs so generate neither warns nor applies them.
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None, min_p=None, typical_p=None)
        else:
            # The warpers come from logits_warpers() so that they run before any recorder the caller appends
            # (generate would otherwise add its own after every custom processor); its own are set neutral.
            kwargs.update(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, min_p=None, typical_p=1.0)
        if self.stop:
            kwargs["stop_strings"] = list(self.stop)
        return kwargs

    def logits_warpers(self):
        """transformers' own warpers for these settings, in the order generate applies them (empty if greedy)."""
        # Imported here: the registry above is read by clients (LangChain over HTTP) that need no transformers.
        from transformers import (
            LogitsProcessorList, MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
            TypicalLogitsWarper,
        )

        warpers = LogitsProcessorList()
        if self.greedy:
            return warpers
        if self.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(self.temperature))
        if self.top_k:
            warpers.append(TopKLogitsWarper(top_k=self.top_k))
        if self.top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p=self.top_p))
        if self.min_p:
            warpers.append(MinPLogitsWarper(min_p=self.min_p))
        if self.typical_p < 1.0:
            warpers.append(TypicalLogitsWarper(mass=self.typical_p))
        return warpers

    def next_token_scores(self, input_ids, scores):
        """Scores [1, vocab] after these settings, as generate would sample from them: the repetition penalty,
        then the warpers in generate's order; greedy keeps only the most likely token (others -inf)."""
        from transformers import RepetitionPenaltyLogitsProcessor

        if self.repetition_penalty != 1.0 and input_ids.numel():
            scores = RepetitionPenaltyLogitsProcessor(penalty=self.repetition_penalty)(input_ids, scores.clone())
        if self.greedy:
            kept = scores.new_full(scores.shape, -math.inf)
            best = scores.argmax(-1, keepdim=True)
            return kept.scatter(-1, best, scores.gather(-1, best))
        return self.logits_warpers()(input_ids, scores)


# ------------------------------------------------------------------------------------- the field registry


@dataclass(frozen=True)
class SamplingField:
    """One field of SamplingParams as the rest of the playground sees it."""

    name: str
    annotation: Any
    default: Any
    help: str
    limits: Limits
    label: str  # how people read its name (a control's label): "Top-p" for top_p

    @property
    def wire_name(self) -> str:
        """The field's name in OpenAI-style requests (the playground's /v1, vLLM, LangChain)."""
        return self.limits.wire_name or self.name

    @property
    def numeric(self) -> bool:
        return self.limits.low is not None

    @property
    def integer(self) -> bool:
        return self.numeric and int in getattr(self.annotation, "__args__", (self.annotation,))

    def request_type(self) -> Any:
        """The type a request schema declares for it: optional, booleans refused like SamplingParams does."""
        if self.numeric:
            return Annotated[(int if self.integer else float) | None, BeforeValidator(reject_bools)]
        return str | list[str] | None


SAMPLING_FIELDS: dict[str, SamplingField] = {
    name: SamplingField(name, info.annotation, info.get_default(call_default_factory=True), info.description or "",
                        next(item for item in info.metadata if isinstance(item, Limits)), info.title or name)
    for name, info in SamplingParams.model_fields.items()
}
# The numbers: the lab's table columns and its sweep list.
NUMERIC_FIELDS = [name for name, field in SAMPLING_FIELDS.items() if field.numeric]
# What the next-token explorer varies: the fields that reshape one step's distribution.
DISTRIBUTION_FIELDS = [name for name, field in SAMPLING_FIELDS.items() if field.limits.slider]
# The lab's example: the field its default table and sweep vary (and the values), from a fixed seed and short replies.
EXAMPLE_FIELD = next(field for field in SAMPLING_FIELDS.values() if field.limits.example)
EXAMPLE_BASE = {"seed": 1234, "max_new_tokens": 64}
# What OpenAI-style APIs take (this server's /v1, vLLM's, the LangChain model); the extensions among them.
OPENAI_FIELDS = [name for name, field in SAMPLING_FIELDS.items() if field.limits.api != "local"]
VLLM_EXTENSIONS = {name for name, field in SAMPLING_FIELDS.items() if field.limits.api == "vllm"}
# Beyond OpenAI's own schema: a remote engine may or may not take each of these.
EXTENSION_FIELDS = [name for name, field in SAMPLING_FIELDS.items() if field.limits.api != "openai"]
# The playground's name -> the OpenAI-style name, where they differ.
WIRE_NAMES = {name: field.wire_name for name, field in SAMPLING_FIELDS.items() if field.wire_name != name}
# A greedy default, for endpoints that decode greedily unless told otherwise (the tutorial's POST /).
GREEDY = {"temperature": 0.0}


def request_fields(names: Iterable[str], wire: bool = False, defaults: Mapping[str, Any] | None = None,
                   described: Mapping[str, str] | None = None) -> dict[str, Any]:
    """pydantic field definitions (for `create_model`) of a request schema taking `names`.

    Each is optional and its range is not checked here: the request builds SamplingParams, which checks once.
    `wire` uses the OpenAI-style names; `defaults` and `described` override a field's default and help.
    """
    definitions = {}
    for name in names:
        field = SAMPLING_FIELDS[name]
        default = (defaults or {}).get(name)
        description = (described or {}).get(name) or f"{field.help}; {field.limits.reads}"
        definitions[field.wire_name if wire else name] = (field.request_type(), Field(default, description=description))
    return definitions


def from_wire(values: Mapping[str, Any]) -> dict[str, Any]:
    """OpenAI-style names -> the playground's; fields left None are dropped (they keep their defaults)."""
    names = {wire: name for name, wire in WIRE_NAMES.items()}
    return {names.get(key, key): value for key, value in values.items() if value is not None}


def to_wire(params: SamplingParams, names: Iterable[str]) -> dict[str, Any]:
    """`names` of `params` under their OpenAI-style names; an unset seed and empty stop list are left out."""
    body = {SAMPLING_FIELDS[name].wire_name: getattr(params, name) for name in names}
    return {key: value for key, value in body.items() if value not in (None, [])}


def is_blank(value: Any) -> bool:
    """An empty form field: None, "" or whitespace (NaN is a value, and refused)."""
    return value is None or (isinstance(value, str) and not value.strip())


def plain(value: Any) -> Any:
    """A Python scalar for numpy's (pandas cells hold numpy numbers, which pydantic's int does not take)."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (str, list)) else value


# Why a value of the wrong type was refused, by pydantic's error type.
TYPE_PROBLEMS = {"int_from_float": "not a whole number", "int_parsing": "not a whole number",
                 "float_parsing": "not a number", "float_type": "not a number", "int_type": "not a whole number",
                 "finite_number": "not a finite number"}


def parameter_error(exc: ValidationError) -> ParameterError:
    """One readable message from pydantic's errors: `field: what is wrong`."""
    parts = []
    first_field = None
    for error in exc.errors():
        field = ".".join(str(p) for p in error.get("loc", ())) or "parameters"
        first_field = first_field or field
        message = error.get("msg", "is invalid").removeprefix("Value error, ")
        if error.get("type") == "extra_forbidden":
            message = "is not a sampling parameter"
        elif field in SAMPLING_FIELDS and error.get("type") != "value_error":
            why = TYPE_PROBLEMS.get(error.get("type"), message)
            message = f"must be {SAMPLING_FIELDS[field].limits.reads}, got {error.get('input')!r} ({why})"
        parts.append(f"{field}: {message}")
    return ParameterError("; ".join(parts), field=first_field)
