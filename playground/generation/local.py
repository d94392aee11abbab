"""The local backend's generation: a transformers model's `generate` on the device's worker thread, streamed.

The prompt is encoded (and checked against the context) before the caller takes a place in the queue; on its turn
`stream_local` runs `generate` with the sampling settings' logits processors, a streamer and a cancel criterion,
and turns token ids into text deltas (cleaned by the chat format, cut at stop strings, never splitting a character).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from contextlib import nullcontext
from typing import Iterator

import torch
from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from playground.errors import ParameterError
from playground.generation import scheduling
from playground.generation.events import ExpertRouting, GenerationEvent, GenerationStats, finish_timing, text_extension
from playground.generation.prompt_cache import PromptCache, Reuse, empty_cache
from playground.generation.scheduling import DeviceWorker, GenerationHandle
from playground.generation.streaming import (
    IncrementalText,
    ProcessedDistribution,
    RawDistribution,
    TokenStreamer,
    token_info,
)
from playground.params import SamplingParams
from playground.spaces_support import GpuCalls
from playground.structured import CompiledFormat

logger = logging.getLogger(__name__)


class CancelCriteria(StoppingCriteria):
    """Stops generate after the current token once the caller cancels."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        done = self.event.is_set()
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


# A prompt longer than this many characters per context token is first tokenized in part: when that part alone
# fills the context the prompt is refused without tokenizing the rest. No tokenizer averages 16 characters a token
# on real text, so a prompt that could fit is always tokenized whole.
CHARS_PER_TOKEN_BOUND = 16


def encode_prompt(loaded, text: str, params: SamplingParams, known: tuple[str, torch.Tensor] | None = None) -> torch.Tensor:
    """The prompt's ids [1, n]; rejects an empty prompt or one that leaves no room for the reply.

    `known`: (text, ids) of an earlier encoding; the same text is not tokenized again (the lab's settings share
    one prompt)."""
    if not text or not text.strip():
        raise ParameterError("the prompt is empty", field="prompt")
    room = loaded.context_length - params.max_new_tokens
    if known is not None and known[0] == text:
        input_ids = known[1]
    else:
        bound = loaded.context_length * CHARS_PER_TOKEN_BOUND
        if len(text) > bound:
            part = loaded.tokenizer(text[:bound], add_special_tokens=False)["input_ids"]
            if len(part) > room:
                raise context_error(loaded, f"more than {len(part)}", params)
        input_ids = loaded.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    if int(input_ids.shape[1]) > room:
        raise context_error(loaded, str(int(input_ids.shape[1])), params)
    return input_ids


def context_error(loaded, tokens: str, params: SamplingParams) -> ParameterError:
    return ParameterError(
        f"the prompt is {tokens} tokens and max_new_tokens is {params.max_new_tokens}, "
        f"but the model's context is {loaded.context_length} tokens; shorten the prompt or the reply",
        field="prompt",
    )


def stream_local(loaded, input_ids: torch.Tensor, params: SamplingParams, handle: GenerationHandle, queue_wait: float,
                 logprobs: int | None, capture_routing: bool, worker: DeviceWorker,
                 gpu_calls: GpuCalls, grammar: CompiledFormat | None = None,
                 prompt_cache: PromptCache | None = None) -> Iterator[GenerationEvent]:
    """One reply from a local model: `generate` runs on the device's `worker` thread (through `gpu_calls`, for
    ZeroGPU), resuming from the longest beginning of the prompt in `prompt_cache`; this thread decodes and yields
    `delta` events as tokens arrive, then the `done` event with the stats (and the routing if asked). `grammar`: a
    compiled response format the reply is held to (structured output)."""
    model, tokenizer, chat_format = loaded.model, loaded.tokenizer, loaded.chat_format
    input_ids = input_ids.to(loaded.device)  # encoded (and checked) before the caller joined the queue
    prompt_tokens = int(input_ids.shape[1])
    seed = params.seed if params.seed is not None else random.randrange(2**32)
    eos_ids = end_token_ids(model, tokenizer) | set(chat_format.stop_token_ids)
    processed = ProcessedDistribution(logprobs) if logprobs is not None else None
    raw = RawDistribution(logprobs) if logprobs is not None else None
    streamer = TokenStreamer([d for d in (raw, processed) if d is not None])
    kwargs = params.generate_kwargs()
    if params.stop:
        kwargs["tokenizer"] = tokenizer
    if loaded.prefill_chunk_tokens:
        # Bounded activations for long prompts; aligned chunks make a prompt the same numbers whatever was cached.
        kwargs["prefill_chunk_size"] = loaded.prefill_chunk_tokens
    # The grammar masks first, so the warpers (temperature, top-k, top-p...) sample among allowed tokens only, and
    # its stopping criterion ends the reply when the structure is complete.
    constraint = grammar.constraint(prompt_tokens) if grammar else None
    generate_kwargs = dict(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        streamer=streamer,
        stopping_criteria=StoppingCriteriaList(
            [CancelCriteria(handle.cancelled), *([constraint.stopping_criterion()] if constraint else [])]),
        logits_processor=LogitsProcessorList(
            [*([constraint] if constraint else []), *params.logits_warpers(), *([processed] if processed else [])]),
        eos_token_id=sorted(eos_ids) or None,
        pad_token_id=tokenizer.pad_token_id,
        **kwargs,
    )
    hook = model.get_output_embeddings().register_forward_hook(raw) if raw else None
    run = PrefixedRun.for_model(loaded, input_ids, prompt_cache)

    def generate():
        try:
            # On a ZeroGPU Space the GPU exists only inside spaces.GPU; elsewhere this just calls.
            gpu_calls.run(lambda: run.generate(seed, generate_kwargs))
        except BaseException as exc:  # the GPU call itself failed: reported like the model's own failure
            run.failed(exc)
        finally:
            streamer.end()  # the consumer can finish while the cache is stored
        try:
            run.keep()  # the cache is on only where device state outlives a GPU call: no call needed here
        except Exception:  # a reply that was delivered does not fail for want of caching it
            logger.exception("keeping the computed prompt in the prompt cache failed")

    started = time.perf_counter()
    job = worker.submit(generate)
    text = IncrementalText(tokenizer, chat_format.skip_special_tokens)
    emitted = ""
    first_token_at = last_token_at = None
    try:
        while True:
            item = streamer.queue.get()
            if item is None:
                break
            stamp, token_id, figures = item
            first_token_at = first_token_at or stamp
            last_token_at = stamp
            text.add(token_id)
            infos = ([token_info(tokenizer, token_id, figures, logprobs, greedy=params.greedy)]
                     if logprobs is not None else [])
            clean = trim_at_stop(chat_format.clean_output(text.text), params.stop)[0]
            delta = text_extension(emitted, clean)
            emitted += delta
            if delta or infos:
                yield GenerationEvent("delta", text=delta, tokens=infos)
    except BaseException:  # the consumer went away (GeneratorExit) or failed: stop the model too
        handle.cancel()
        raise
    finally:
        run.generated.wait()
        if hook:
            hook.remove()
    finished = time.perf_counter()
    # The cache is being stored while the last pieces go out; the reply ends once it is (a process that exits after
    # its last reply must not find the worker still copying tensors).
    job.result()
    new_ids = text.ids
    # Decoded whole once, at the end: the streamed pieces are only what could be shown so far.
    final, hit_stop = trim_at_stop(
        chat_format.clean_output(tokenizer.decode(new_ids, skip_special_tokens=chat_format.skip_special_tokens)),
        params.stop,
    )
    stats = GenerationStats(
        prompt_tokens=prompt_tokens, new_tokens=len(new_ids), queue_wait_s=queue_wait, total_s=finished - started,
        seed=seed, cached_tokens=run.reused,
    )
    finish_timing(stats, started, first_token_at, last_token_at)
    if run.failure is not None:
        exc = run.failure
        stats.finish_reason = "error"
        if isinstance(exc, torch.OutOfMemoryError):
            stats.error = "out of memory during generation; caches were freed, try a shorter prompt or reply"
        else:
            stats.error = f"{type(exc).__name__}: {exc}"
        scheduling.free_device_memory()
    elif handle.cancelled.is_set():
        stats.finish_reason = "cancelled"
    elif new_ids and new_ids[-1] in eos_ids:
        stats.finish_reason = "stop"
    elif hit_stop:
        stats.finish_reason = "stop"
    elif len(new_ids) >= params.max_new_tokens:
        stats.finish_reason = "length"
    held_back = text_extension(emitted, final)
    if held_back:
        yield GenerationEvent("delta", text=held_back)
    routing = None
    if capture_routing and run.routing is not None:
        experts, weights = run.routing
        # The last sampled token never went through the model; the routing covers prompt + all but the last.
        token_ids = input_ids[0].tolist() + new_ids[: experts.shape[2] - prompt_tokens]
        routing = ExpertRouting(
            experts=experts[:, 0], weights=weights[:, 0], token_ids=token_ids, prompt_tokens=prompt_tokens,
            num_experts=int(getattr(model.config, "num_experts", experts.max().item() + 1)),
        )
    yield GenerationEvent("done", text=final, stats=stats, routing=routing)


class PrefixedRun:
    """One model run on the generation thread that starts from the prompt cache and leaves what it computed there.

    `generate` takes the longest cached beginning of the prompt (a copy), runs `model.generate` on the rest, and
    records the routing (models with experts: it is kept with the cache, so a resumed prompt still has its
    routing); `keep` then stores the sequence it computed, the prompt and all reply tokens but the last.
    """

    def __init__(self, model, input_ids: torch.Tensor, prompt_cache: PromptCache | None, record_routing: bool,
                 prefill_chunk: int | None = None, resume_step: int = 1):
        self.model = model
        self.prefill_chunk = prefill_chunk
        self.resume_step = resume_step
        self.input_ids = input_ids
        self.prompt_cache = prompt_cache
        self.record_routing = record_routing and hasattr(model, "record_routing")
        self.reused = 0
        self.cache = None
        self.prefix_routing: tuple[torch.Tensor, torch.Tensor] | None = None
        self.sequence: torch.Tensor | None = None
        self.routing: tuple[torch.Tensor, torch.Tensor] | None = None
        self.failure: BaseException | None = None
        self.generated = threading.Event()  # set once generate has returned (or failed)

    @classmethod
    def for_model(cls, loaded, input_ids: torch.Tensor, prompt_cache: PromptCache | None) -> "PrefixedRun":
        return cls(loaded.model, input_ids, prompt_cache, record_routing=loaded.has_experts,
                   prefill_chunk=loaded.prefill_chunk_tokens, resume_step=loaded.resume_step)

    def generate(self, seed: int, generate_kwargs: dict) -> None:
        try:
            with torch.inference_mode(), self._routing_trace() as trace:
                self._resume()
                torch.manual_seed(seed)  # serialised by the gate, so the global RNG is ours
                self.sequence = self.model.generate(**generate_kwargs, cache=self.cache)
            self._keep_routing(trace)
        except BaseException as exc:  # reported to the consumer, never lost in the thread
            self.failed(exc)
        finally:
            self.generated.set()

    def failed(self, exc: BaseException) -> None:
        self.failure = self.failure or exc
        self.generated.set()

    def next_token_logits(self) -> torch.Tensor:
        """One forward pass over the prompt (what the cache lacks of it): the raw next-token logits [vocab]."""
        with torch.inference_mode(), self._routing_trace() as trace:
            self._resume()
            ids = self.input_ids
            rest = ids[:, self.reused:]
            # In the chunks `generate` computes a prompt in, so the logits are the ones a reply starts from.
            end = self.reused
            for chunk in rest.split(self.prefill_chunk, dim=1) if self.prefill_chunk else (rest,):
                end += chunk.shape[1]
                output = self.model(input_ids=chunk, attention_mask=torch.ones_like(ids[:, :end]), cache=self.cache,
                                    use_cache=True, logits_to_keep=1)
        self.sequence = ids
        self._keep_routing(trace)
        return output.logits[0, -1].float().cpu()

    def _resume(self) -> None:
        ids = self.input_ids[0].tolist()
        if self.prompt_cache is None:
            self.cache = empty_cache(self.model)
            return
        reuse = self.prompt_cache.lookup(self.model, ids, self.resume_step)
        if self.record_routing and reuse.tokens and reuse.extras is None:
            reuse = Reuse(0, empty_cache(self.model))  # blocks without routing: recompute rather than show a gap
        self.cache, self.reused = reuse.cache, reuse.tokens
        self.prefix_routing = tuple(reuse.extras) if reuse.extras is not None else None

    def _routing_trace(self):
        return self.model.record_routing() if self.record_routing else nullcontext()

    def _keep_routing(self, trace) -> None:
        """The routing of every computed position: the cached prefix's, then what this run traced."""
        if trace is None:
            return
        traced = trace.stacked()
        if self.prefix_routing is not None:
            traced = tuple(torch.cat((cached.to(new.device), new), dim=2)
                           for cached, new in zip(self.prefix_routing, traced))
        self.routing = traced

    def keep(self) -> None:
        """Store the computed sequence in the prompt cache (nothing after a failure: the cache may be half-written)."""
        if self.prompt_cache is None or self.failure is not None or self.sequence is None:
            return
        with torch.inference_mode():
            length = self.cache.get_seq_length()
            ids = self.sequence[0, :length].tolist()
            extras = list(self.routing) if self.routing is not None else None
            if extras is not None and extras[0].shape[2] != length:
                extras = None
            self.prompt_cache.store(ids, self.cache, extras)
        self.cache = None


def end_token_ids(model, tokenizer) -> set[int]:
    """The model's and the tokenizer's end-of-sequence ids."""
    ids: set[int] = set()
    for value in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def trim_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """Cut the text at the first stop string (the stop string itself is not part of the reply)."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


__all__ = ["PrefixedRun", "encode_prompt", "stream_local"]
