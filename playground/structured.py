"""Structured output: a reply held to a JSON Schema, any JSON object, a regular expression or an EBNF grammar.

`ResponseFormat` is the one type for it, parsed once where a request comes in (the OpenAI routes, LangChain, the
manager's `response_format` keyword); its wire shape is OpenAI's `response_format`, so a remote engine (vLLM) gets
it as is. A local model applies it by grammar-constrained decoding with xgrammar (the library vLLM and SGLang use):
`StructuredDecoding` compiles a format against the model's tokenizer (xgrammar keeps a cache of compiled grammars
per compiler, and there is one compiler per loaded model), and each reply gets a `GrammarConstraint`, a logits
processor that masks every token the grammar does not allow next (before the sampling warpers, so temperature,
top-p and the rest sample among allowed tokens only) and a stopping criterion that ends the reply as soon as the
structure is complete. The end-of-reply token is allowed only there.

xgrammar is imported when a format is first compiled: clients that only build requests (LangChain over HTTP) do not
need it.
"""

from __future__ import annotations

import json
import os
import re
import threading
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from playground.errors import ParameterError, not_unicode

FORMAT_FIELD = "response_format"
# What `{"type": "json_object"}` means (OpenAI: the reply is a JSON object), as a schema.
ANY_OBJECT = {"type": "object"}
COMPILER_CACHE_BYTES = 256 * 2**20
# A token that looks like a special token ("<n>", "<|im_end|>"): its text in a reply may not be its vocabulary entry.
SPECIAL_LOOKING = re.compile(rb"^<[^<>\s]{1,40}>$")


class JsonSchemaSpec(BaseModel):
    """OpenAI's `json_schema` object: a name, the schema, and `strict` (always enforced here, as vLLM does)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    name: str = Field("response", max_length=64, description="a name for the schema")
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema", description="a JSON Schema the reply must satisfy")
    strict: bool | None = Field(None, description="accepted; the schema is always enforced")


class ResponseFormat(BaseModel):
    """What shape a reply must have: OpenAI's `response_format`, plus `regex` and `grammar` (EBNF/GBNF)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["text", "json_object", "json_schema", "regex", "grammar"] = "text"
    json_schema: JsonSchemaSpec | None = None
    regex: str | None = Field(None, min_length=1, description="type regex: the whole reply matches it")
    grammar: str | None = Field(None, min_length=1, description="type grammar: an EBNF grammar with a root rule")

    @model_validator(mode="after")
    def _one_constraint(self) -> "ResponseFormat":
        given = {name for name in ("json_schema", "regex", "grammar") if getattr(self, name) is not None}
        needed = {self.type} & {"json_schema", "regex", "grammar"}
        for name in needed - given:
            raise ValueError(f"type {self.type} needs the field {name}")
        for name in given - needed:
            raise ValueError(f"the field {name} belongs to type {name}, not {self.type}")
        problem = not_unicode(json.dumps(self.to_wire(), ensure_ascii=False), "the response format")
        if problem:
            raise ValueError(problem)
        return self

    # ---------------------------------------------------------------------------------------- building

    @classmethod
    def parse(cls, value: "ResponseFormat | dict[str, Any] | None") -> "ResponseFormat | None":
        """A format from OpenAI's wire shape (or one already parsed); None for no constraint (None or "text").

        Raises ParameterError naming the field at fault."""
        if value is None or isinstance(value, ResponseFormat):
            return None if value is None or value.type == "text" else value
        if not isinstance(value, dict):
            raise ParameterError(f"{FORMAT_FIELD}: must be an object such as {{\"type\": \"json_object\"}}",
                                 field=FORMAT_FIELD)
        try:
            return cls.parse(cls.model_validate(value))
        except ValidationError as exc:
            raise ParameterError(format_errors(exc), field=FORMAT_FIELD) from None

    @classmethod
    def json_object(cls) -> "ResponseFormat":
        return cls(type="json_object")

    @classmethod
    def for_schema(cls, schema: dict[str, Any] | type[BaseModel], name: str | None = None) -> "ResponseFormat":
        """JSON Schema mode from a schema dict or a pydantic model class."""
        if isinstance(schema, type) and issubclass(schema, BaseModel):
            name, schema = name or schema.__name__, schema.model_json_schema()
        name = re.sub(r"[^A-Za-z0-9_-]", "_", name or "")[:64] or "response"  # OpenAI's rule for names
        return cls(type="json_schema", json_schema=JsonSchemaSpec(name=name, schema=schema, strict=True))

    @classmethod
    def pattern(cls, regex: str) -> "ResponseFormat":
        return cls(type="regex", regex=regex)

    def to_wire(self) -> dict[str, Any]:
        """OpenAI's `response_format` object (what a remote engine is sent)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)

    @property
    def json_schema_dict(self) -> dict[str, Any] | None:
        """The schema a reply must satisfy: the given one, or any object; None for regex and grammar."""
        if self.type == "json_object":
            return ANY_OBJECT
        return self.json_schema.schema_ if self.json_schema else None


def schema_from_text(text: str | None) -> ResponseFormat | None:
    """A form's "JSON Schema" box as a format: empty for free text; raises ParameterError naming the problem."""
    if not text or not text.strip():
        return None
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ParameterError(f"the structured-output schema is not JSON: {exc}", field=FORMAT_FIELD) from None
    if not isinstance(schema, dict):
        raise ParameterError("the structured-output schema must be a JSON object", field=FORMAT_FIELD)
    return ResponseFormat.for_schema(schema)


def checked_reply(text: str, response_format: ResponseFormat) -> tuple[str, str]:
    """A structured reply for people: (the JSON pretty-printed when it parses, a verdict against the schema)."""
    import jsonschema  # imported here: only replies shown in the UI are checked

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return text, f"not valid JSON ({exc.msg}; the reply may have been cut at the token limit)"
    pretty = json.dumps(value, indent=2, ensure_ascii=False)
    schema = response_format.json_schema_dict
    if schema is None:
        return pretty, "valid JSON"
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError as exc:
        return pretty, f"JSON that does not match the schema: {exc.message}"
    return pretty, "valid JSON matching the schema"


def format_errors(exc: ValidationError) -> str:
    """`response_format.<field>: what is wrong`, for each of pydantic's errors."""
    parts = []
    for error in exc.errors():
        where = ".".join([FORMAT_FIELD, *(str(part) for part in error.get("loc", ()))])
        message = str(error.get("msg", "is invalid")).removeprefix("Value error, ")
        if error.get("type") == "extra_forbidden":
            message = "is not a field of a response format"
        parts.append(f"{where}: {message}")
    return "; ".join(parts)


# ------------------------------------------------------------------------------------- local decoding


@dataclass(frozen=True)
class CompiledFormat:
    """A format compiled for one model's tokenizer; `constraint()` makes the per-reply matcher."""

    grammar: Any  # xgrammar.CompiledGrammar
    vocab_size: int
    stop_token_ids: frozenset[int]

    def constraint(self, prompt_tokens: int) -> "GrammarConstraint":
        return GrammarConstraint(self, prompt_tokens)


class StructuredDecoding:
    """One loaded model's grammar compiler: its vocabulary as replies show it, and a cache of compiled formats."""

    def __init__(self, tokenizer: Any, chat_format: Any, vocab_size: int, stop_token_ids: set[int]):
        self.tokenizer, self.chat_format = tokenizer, chat_format
        self.vocab_size, self.stop_token_ids = int(vocab_size), frozenset(stop_token_ids)
        self._compiler = None
        self._lock = threading.Lock()

    def compile(self, response_format: ResponseFormat) -> CompiledFormat:
        """The compiled grammar; a format xgrammar cannot compile is a ParameterError that says why."""
        compiler = self._compiler_once()
        try:
            if response_format.type == "regex":
                grammar = compiler.compile_regex(response_format.regex)
            elif response_format.type == "grammar":
                grammar = compiler.compile_grammar(response_format.grammar)
            else:
                # Compact JSON (no free whitespace): a small model cannot pad the reply with blank lines for ever.
                # Properties the schema does not name are refused (xgrammar's strict mode, vLLM's default), except
                # in json_object mode, where any object is the point.
                grammar = compiler.compile_json_schema(
                    json.dumps(response_format.json_schema_dict), any_whitespace=False,
                    strict_mode=response_format.type == "json_schema")
        except (RuntimeError, ValueError, TypeError) as exc:
            raise ParameterError(compile_error(response_format, exc), field=FORMAT_FIELD) from None
        return CompiledFormat(grammar, self.vocab_size, self.stop_token_ids)

    def _compiler_once(self):
        with self._lock:  # requests prepare on their own threads; the vocabulary is read once
            if self._compiler is None:
                import xgrammar

                info = reply_vocabulary(self.tokenizer, self.chat_format, self.vocab_size, self.stop_token_ids)
                self._compiler = xgrammar.GrammarCompiler(info, max_threads=min(8, os.cpu_count() or 1),
                                                          cache_limit_bytes=COMPILER_CACHE_BYTES)
            return self._compiler


def compile_error(response_format: ResponseFormat, exc: Exception) -> str:
    """xgrammar's message without its timestamp and C++ source location."""
    reason = re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", str(exc).strip()) or type(exc).__name__
    what = {"regex": "the regular expression", "grammar": "the grammar"}.get(response_format.type, "the JSON schema")
    return f"{FORMAT_FIELD}: {what} cannot be used for constrained decoding: {reason}"


def reply_vocabulary(tokenizer: Any, chat_format: Any, vocab_size: int, stop_token_ids: frozenset[int]):
    """xgrammar's view of the vocabulary, corrected to what each token adds to the reply the user sees.

    xgrammar reads special tokens as their literal text, so `<|im_start|>` could stand inside a JSON string while the
    reply drops it, and Yuan's `<n>` (a line break in replies) could stand where a line break is not allowed. Tokens
    that look special are decoded as a reply would be: `<n>` becomes "\\n", tokens that vanish become unmatchable.
    """
    import xgrammar

    base = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                   stop_token_ids=sorted(stop_token_ids) or None)
    vocabulary = list(base.decoded_vocab)
    candidates = {i for i, entry in enumerate(vocabulary) if SPECIAL_LOOKING.match(entry)}
    candidates |= {i for i in getattr(tokenizer, "all_special_ids", []) if i < vocab_size}
    for token_id in candidates:
        vocabulary[token_id] = reply_text(tokenizer, chat_format, token_id)
    return xgrammar.TokenizerInfo(vocabulary, xgrammar.VocabType.RAW, vocab_size=vocab_size,
                                  stop_token_ids=list(base.stop_token_ids), add_prefix_space=base.add_prefix_space)


def reply_text(tokenizer: Any, chat_format: Any, token_id: int) -> bytes:
    """The bytes one token adds to a cleaned reply, seen between two letters (a reply's ends are stripped)."""
    piece = tokenizer.decode([token_id], skip_special_tokens=chat_format.skip_special_tokens)
    framed = chat_format.clean_output(f"x{piece}x")
    if len(framed) >= 2 and framed[0] == "x" and framed[-1] == "x":
        return framed[1:-1].encode("utf-8")
    return b""  # the token removes text around it (Yuan's <sep>): never inside a structure


class GrammarConstraint:
    """One reply's matcher, both a logits processor (mask what the grammar forbids) and a stopping criterion (end
    once the structure is complete and only an end token could follow). Token ids are read from `input_ids`, so
    the two roles stay in step whichever generate calls first."""

    def __init__(self, compiled: CompiledFormat, prompt_tokens: int):
        import torch
        import xgrammar

        self._xgr = xgrammar
        self.matcher = xgrammar.GrammarMatcher(compiled.grammar)
        self.prompt_tokens = prompt_tokens
        self.accepted = 0
        self.mask = xgrammar.allocate_token_bitmask(1, compiled.vocab_size)
        self.mask_fresh = False
        # The mask with the end tokens' bits cleared: whether anything but an end token is allowed, in one AND.
        ends = torch.zeros(self.mask.shape[1] * 32, dtype=torch.bool)
        ends[[i for i in compiled.stop_token_ids if i < ends.numel()]] = True
        self.not_end_bits = ~pack_bits(ends)

    def _catch_up(self, input_ids) -> None:
        new = input_ids[0, self.prompt_tokens + self.accepted:].tolist()
        for token_id in new:
            if self.matcher.is_terminated():
                break
            if not self.matcher.accept_token(token_id):
                raise RuntimeError(f"the grammar refused token {token_id}, which it had allowed")
            self.accepted += 1
        if new or not self.mask_fresh:
            if not self.matcher.is_terminated():
                self.matcher.fill_next_token_bitmask(self.mask)
            self.mask_fresh = True

    def __call__(self, input_ids, scores):
        """The logits processor: forbidden tokens get -inf."""
        self._catch_up(input_ids)
        if self.matcher.is_terminated():
            return scores
        mask = self.mask.to(scores.device, non_blocking=True)
        self._xgr.apply_token_bitmask_inplace(scores, mask)
        if not scores.isfinite().any():
            # no_repeat_ngram_size had already ruled out every token the grammar allows: choose among the allowed
            # ones evenly rather than sample from nothing.
            scores = scores.zero_()
            self._xgr.apply_token_bitmask_inplace(scores, mask)
        return scores

    def done(self, input_ids) -> bool:
        """The stopping criterion's question: is the structure complete with nothing but an end token to follow?"""
        self._catch_up(input_ids)
        if self.matcher.is_terminated():
            return True
        return self.matcher.is_completed() and not bool((self.mask & self.not_end_bits).any())

    def stopping_criterion(self) -> "StructureComplete":
        return StructureComplete(self)


class StructureComplete:
    """A GrammarConstraint's stopping criterion, for generate's `stopping_criteria` (which takes any such callable;
    not a transformers subclass, so that building requests never imports transformers)."""

    def __init__(self, constraint: GrammarConstraint):
        self.constraint = constraint

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.full((input_ids.shape[0],), self.constraint.done(input_ids), dtype=torch.bool,
                          device=input_ids.device)


def pack_bits(flags):
    """Booleans [n * 32] -> int32 words [1, n], bit j of word i for flag 32 i + j (xgrammar's mask layout)."""
    import torch

    bits = flags.view(-1, 32).to(torch.int64) << torch.arange(32, dtype=torch.int64)
    words = bits.sum(dim=1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).unsqueeze(0)


__all__ = ["CompiledFormat", "GrammarConstraint", "JsonSchemaSpec", "ResponseFormat", "StructuredDecoding"]
