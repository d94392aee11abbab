"""The backends behind the manager, with one interface (`Backend`): a model loaded in this process, or a remote
OpenAI-compatible engine. The manager picks one when a model is loaded and delegates; nothing else asks which.

Each backend says which FIFO gate orders its callers (`gate_key`), whether several requests may run at once
(`batches`), checks a `GenerationRequest` before it is queued (`prepare`), streams it (`stream`), and reports what
it cannot take and what the status shows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol

import torch

from playground.chat_format import PlainChatFormat
from playground.errors import ParameterError, PlaygroundError
from playground.generation.events import GenerationEvent
from playground.generation.local import PrefixedRun, encode_prompt, end_token_ids, stream_local
from playground.generation.prompt_cache import PromptCache, default_budget_bytes, empty_cache, resumable
from playground.generation.remote import stream_remote
from playground.generation.scheduling import DeviceWorker, GenerationHandle
from playground.model_loading import LoadedModel
from playground.params import SamplingParams
from playground.spaces_support import GpuCalls
from playground.structured import CompiledFormat, ResponseFormat, StructuredDecoding


@dataclass(frozen=True)
class GenerationRequest:
    """One reply asked of a backend: chat `messages` (checked) or a raw `prompt`, and how to generate it."""

    messages: list[dict] | None
    prompt: str | None
    params: SamplingParams
    response_format: ResponseFormat | None = None
    logprobs: int | None = None  # top alternatives per token (0: the chosen token's logprob only; None: none)
    capture_routing: bool = False  # attach the experts every token went to (models with experts)


class Backend(Protocol):
    """What the manager needs of a backend."""

    batches: bool  # several requests may run at once (the gate gets more slots)
    loaded: LoadedModel

    @property
    def gate_key(self) -> str: ...  # the FIFO gate that orders this backend's callers

    def local(self, what: str) -> LoadedModel: ...  # the model in this process, or a PlaygroundError saying why not

    def prepare(self, request: GenerationRequest) -> Any: ...  # checks before the queue; what `stream` needs

    def stream(self, request: GenerationRequest, prepared: Any, handle: GenerationHandle,
               queue_wait: float) -> Iterator[GenerationEvent]: ...

    def unavailable_params(self) -> list[str]: ...

    def status_fields(self) -> dict[str, Any]: ...

    def metrics(self) -> dict[str, float] | None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class LocalRequest:
    """A local request checked before it is queued: the prompt's ids and the compiled response format, if any."""

    input_ids: torch.Tensor
    grammar: CompiledFormat | None = None


class LocalBackend:
    """A model in this process: one generation at a time per device, on that device's worker thread."""

    batches = False

    def __init__(self, loaded: LoadedModel, worker_for: Callable[[str], DeviceWorker], gpu_calls: GpuCalls,
                 prompt_cache_bytes: int | None = None):
        """`prompt_cache_bytes`: the prompt cache's budget (None: sized from the memory free now, 0: off)."""
        self.loaded = loaded
        self._worker_for = worker_for
        self._gpu_calls = gpu_calls
        self._cacheable = gpu_calls.keeps_device_state(loaded.device) and resumable(empty_cache(loaded.model))
        self.prompt_cache = PromptCache(0)
        self.resize_prompt_cache(prompt_cache_bytes)
        self._last_encoded: tuple[str, Any] | None = None  # (prompt text, ids): the lab's settings share a prompt
        self._structured: StructuredDecoding | None = None  # made on the first structured request

    @property
    def gate_key(self) -> str:
        return self.loaded.device

    def local(self, what: str) -> LoadedModel:
        """The loaded model, for `what` needs its tokenizer or weights."""
        return self.loaded

    def prepare(self, request: GenerationRequest) -> LocalRequest:
        """The prompt's token ids and the compiled format: bad input (a schema xgrammar cannot compile too) fails
        here, before it takes a place in the queue."""
        messages = request.messages
        text = self.loaded.chat_format.build_prompt(messages) if messages is not None else request.prompt
        input_ids = encode_prompt(self.loaded, text, request.params, known=self._last_encoded)
        self._last_encoded = (text, input_ids)  # one pair, replaced whole: safe to read from other threads
        response_format = request.response_format
        grammar = self.structured().compile(response_format) if response_format is not None else None
        return LocalRequest(input_ids, grammar)

    def structured(self) -> StructuredDecoding:
        """The model's grammar compiler (its compiled formats are cached there)."""
        if self._structured is None:
            loaded = self.loaded
            head = loaded.model.get_output_embeddings()
            vocab_size = getattr(head, "out_features", None) or loaded.model.config.vocab_size
            ends = end_token_ids(loaded.model, loaded.tokenizer) | set(loaded.chat_format.stop_token_ids)
            self._structured = StructuredDecoding(loaded.tokenizer, loaded.chat_format, vocab_size, ends)
        return self._structured

    def stream(self, request: GenerationRequest, prepared: LocalRequest, handle: GenerationHandle,
               queue_wait: float) -> Iterator[GenerationEvent]:
        return stream_local(self.loaded, prepared.input_ids, request.params, handle, queue_wait, request.logprobs,
                            request.capture_routing, self._worker_for(self.loaded.device), self._gpu_calls,
                            prepared.grammar, self._active_prompt_cache())

    def _active_prompt_cache(self) -> PromptCache | None:
        return self.prompt_cache if self.prompt_cache.budget_bytes else None

    def resize_prompt_cache(self, budget_bytes: int | None) -> None:
        """None: a share of the memory free now. Stays off (0) where caches cannot be kept or resumed."""
        if budget_bytes is None:
            budget_bytes = default_budget_bytes(self.loaded.device)
        self.prompt_cache.resize(budget_bytes if self._cacheable else 0)

    def next_token_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The raw next-token logits [vocab] (float32, CPU) after `input_ids`, on the device's worker thread, computing
        only what the prompt cache lacks. The caller holds the device's turn in the queue."""
        loaded = self.loaded
        run = PrefixedRun.for_model(loaded, input_ids.to(loaded.device), self._active_prompt_cache())

        def forward() -> torch.Tensor:
            logits = self._gpu_calls.run(run.next_token_logits)
            run.keep()
            return logits

        try:
            return self._worker_for(loaded.device).submit(forward).result()
        except Exception as exc:
            raise PlaygroundError(f"the forward pass failed: {exc}") from exc

    def unavailable_params(self) -> list[str]:
        return []

    def status_fields(self) -> dict[str, Any]:
        return {"prompt_cache": {**self.prompt_cache.stats(), "resume_step": self.loaded.resume_step}}

    def metrics(self) -> dict[str, float] | None:
        return None

    def close(self) -> None:
        """The prompt cache's memory goes now; the weights go when the last reference does."""
        self.prompt_cache.clear()


class RemoteBackend:
    """A remote engine (`playground.remote.RemoteEngine`): up to its concurrency at once, so it can batch them."""

    batches = True
    gate_key = "remote"

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.engine = loaded.model

    @classmethod
    def for_engine(cls, engine, load_time_s: float) -> "RemoteBackend":
        """The backend for a connected engine; the prompt format is the engine's unless built here (Yuan's)."""
        return cls(LoadedModel(
            model=engine, tokenizer=None, chat_format=engine.local_format or PlainChatFormat(),
            name=engine.model, kind="remote", path=engine.base_url, device="remote", dtype="remote",
            parameters=0, memory_bytes=0, load_time_s=load_time_s, context_length=engine.context_length,
        ))

    def local(self, what: str) -> LoadedModel:
        raise PlaygroundError(
            f"{what} needs a local model; the model {self.loaded.name} is remote ({self.loaded.path})"
        )

    def prepare(self, request: GenerationRequest) -> None:
        """Checks what the engine can take, before the queue."""
        if request.messages is None and (not request.prompt or not request.prompt.strip()):
            raise ParameterError("the prompt is empty", field="prompt")
        self.engine.request_fields(request.params)  # a field the engine cannot take fails here, before the queue
        self.engine.check_response_format(request.response_format)

    def stream(self, request: GenerationRequest, prepared: None, handle: GenerationHandle,
               queue_wait: float) -> Iterator[GenerationEvent]:
        return stream_remote(self.loaded, request.messages, request.prompt, request.params, handle, queue_wait,
                             request.logprobs, request.response_format)

    def unavailable_params(self) -> list[str]:
        return self.engine.unavailable_params()

    def status_fields(self) -> dict[str, Any]:
        engine = self.engine
        return dict(
            base_url=self.loaded.path, remote_owner=engine.owner, unavailable_params=engine.unavailable_params(),
            remote_chat_format=engine.chat_format, remote_concurrency=engine.concurrency,
            remote_timeout_s=engine.timeout_s, remote_last_success_at=engine.last_success_at,
            remote_last_failure=engine.last_failure, remote_metrics_error=engine.metrics_error,
        )

    def metrics(self) -> dict[str, float] | None:
        return self.engine.metrics()

    def close(self) -> None:
        self.engine.close()


__all__ = ["Backend", "GenerationRequest", "LocalBackend", "RemoteBackend"]
