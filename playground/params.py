"""Sampling parameters: one validated type shared by the chat tab, the lab, the HTTP APIs and LangChain.

They are applied through transformers' own generation (GenerationConfig → its logits processors, stop
strings and streamer); nothing here samples by hand.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from transformers import (
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from playground.errors import ParameterError

MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 200
MAX_NEW_TOKENS_LIMIT = 8192
SEED_LIMIT = 2**32 - 1

# field -> (low, high, how the bounds read); the messages users see come from this table.
RANGES: dict[str, tuple[float, float, str]] = {
    "temperature": (0.0, 5.0, "between 0 and 5 (0 means greedy)"),
    "top_p": (0.0, 1.0, "greater than 0 and at most 1"),
    "top_k": (0, 10_000, "an integer between 0 and 10000 (0 turns it off)"),
    "min_p": (0.0, 1.0, "between 0 and 1 (0 turns it off)"),
    "typical_p": (0.0, 1.0, "greater than 0 and at most 1 (1 turns it off)"),
    "repetition_penalty": (0.0, 10.0, "greater than 0 and at most 10 (1 turns it off)"),
    "no_repeat_ngram_size": (0, 64, "an integer between 0 and 64 (0 turns it off)"),
    "max_new_tokens": (1, MAX_NEW_TOKENS_LIMIT, f"an integer between 1 and {MAX_NEW_TOKENS_LIMIT}"),
    "seed": (0, SEED_LIMIT, f"an integer between 0 and {SEED_LIMIT}, or empty for a random seed"),
}
# Bounds that exclude their low end (a value of exactly 0 makes no sense there).
EXCLUSIVE_LOW = {"top_p", "typical_p", "repetition_penalty"}


class SamplingParams(BaseModel):
    """How one reply is sampled. temperature 0 means greedy decoding."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    temperature: float = Field(0.7, allow_inf_nan=False)
    top_p: float = Field(0.9, allow_inf_nan=False)
    top_k: int = 50
    min_p: float = Field(0.0, allow_inf_nan=False)
    typical_p: float = Field(1.0, allow_inf_nan=False)
    repetition_penalty: float = Field(1.0, allow_inf_nan=False)
    no_repeat_ngram_size: int = 0
    max_new_tokens: int = 256
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)

    @field_validator("*", mode="before")
    @classmethod
    def _reject_bools(cls, value: Any, info) -> Any:
        # bool is an int in Python; `top_k: true` is a client bug, not 1.
        if isinstance(value, bool):
            raise ValueError("must be a number, not true/false")
        return value

    @field_validator(*RANGES, mode="after")
    @classmethod
    def _in_range(cls, value: Any, info) -> Any:
        if value is None:
            return value
        low, high, words = RANGES[info.field_name]
        if isinstance(value, float) and math.isnan(value):
            raise ValueError(f"must be {words}")
        too_low = value <= low if info.field_name in EXCLUSIVE_LOW else value < low
        if too_low or value > high:
            raise ValueError(f"must be {words}, got {value}")
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
        return value

    @classmethod
    def parse(cls, values: dict[str, Any] | "SamplingParams" | None = None, **overrides: Any) -> "SamplingParams":
        """Validate a dict (from the UI or an API); raises ParameterError naming the field and its range."""
        if isinstance(values, SamplingParams):
            values = values.model_dump()
        merged = {**(values or {}), **overrides}
        try:
            return cls(**merged)
        except ValidationError as exc:
            raise parameter_error(exc) from None

    def replace(self, **changes: Any) -> "SamplingParams":
        return SamplingParams.parse(self, **changes)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

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


    def logits_warpers(self) -> LogitsProcessorList:
        """transformers' own warpers for these settings, in the order generate applies them (empty if greedy)."""
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


def parameter_error(exc: ValidationError) -> ParameterError:
    """One readable message from pydantic's errors: `field: what is wrong`."""
    parts = []
    first_field = None
    for error in exc.errors():
        field = ".".join(str(p) for p in error.get("loc", ())) or "parameters"
        first_field = first_field or field
        message = error.get("msg", "is invalid")
        message = message.removeprefix("Value error, ")
        if error.get("type") == "extra_forbidden":
            message = "is not a sampling parameter"
        elif field in RANGES and error.get("type") != "value_error":
            message = f"must be {RANGES[field][2]} ({message})"
        parts.append(f"{field}: {message}")
    return ParameterError("; ".join(parts), field=first_field)
