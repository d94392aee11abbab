"""The local backend's generation: a transformers model's `generate` on the device's worker thread, streamed.

The prompt is encoded (and checked against the context) before the caller takes a place in the queue; on its turn
`stream_local` runs `generate` with the sampling settings' logits processors, a streamer and a cancel criterion,
and turns token ids into text deltas (cleaned by the chat format, cut at stop strings, never splitting a character).
"""

from __future__ import annotations

import queue
import random
import threading
import time
from contextlib import nullcontext
from typing import Any, Iterator

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from playground.errors import ParameterError
from playground.generation import scheduling
from playground.generation.events import (
    ExpertRouting,
    GenerationEvent,
    GenerationStats,
    TokenInfo,
    finish_timing,
    text_extension,
)
from playground.generation.scheduling import DeviceWorker, GenerationHandle
from playground.params import SamplingParams
from playground.spaces_support import GpuCalls
from playground.structured import CompiledFormat


class CancelCriteria(StoppingCriteria):
    """Stops generate after the current token once the caller cancels."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        done = self.event.is_set()
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class DistributionRecorder:
    """Per step: the next-token log-probabilities and their top-n, computed on the generation thread.

    Everything with more than a few elements is computed here, on the device worker, so the consuming thread only
    indexes: a second thread running parallel torch kernels would slow every later generation (see DeviceWorker).
    """

    def __init__(self, top_n: int):
        self.top_n = top_n
        self.steps: list[tuple[torch.Tensor, list[tuple[int, float]]]] = []

    def record(self, logits: torch.Tensor) -> None:
        logprobs = logits.detach().float().log_softmax(-1).cpu()
        top = []
        if self.top_n:
            values, ids = logprobs.topk(self.top_n)
            top = [(i, v) for i, v in zip(ids.tolist(), values.tolist()) if v > float("-inf")]
        self.steps.append((logprobs, top))


class ProcessedScoreRecorder(DistributionRecorder, LogitsProcessor):
    """Last in generate's processor list: sees the scores after temperature/top-k/top-p/min-p etc."""

    def __call__(self, input_ids, scores):
        self.record(scores[0])
        return scores


class RawLogitsRecorder(DistributionRecorder):
    """A forward hook on the output head: the model's raw next-token logits for each step."""

    def __call__(self, module, inputs, output):
        self.record(output[0, -1])


class TokenStreamer(BaseStreamer):
    """transformers streamer that hands each new token id (with a timestamp) to the consuming thread."""

    def __init__(self):
        self.queue: queue.Queue = queue.Queue()
        self._prompt_seen = False

    def put(self, value):
        if not self._prompt_seen:  # generate's first put is the prompt
            self._prompt_seen = True
            return
        for token_id in value.reshape(-1).tolist():
            self.queue.put((time.perf_counter(), int(token_id)))

    def end(self):
        self.queue.put(None)


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


def token_info(tokenizer, token_id, step, raw, processed) -> TokenInfo:
    info = TokenInfo(id=token_id, text=tokenizer.decode([token_id]))
    for recorder, value_attr, top_attr in ((raw, "logprob", "top"), (processed, "sampled_logprob", "sampled_top")):
        if recorder is None or step >= len(recorder.steps):
            continue
        logprobs, top = recorder.steps[step]
        setattr(info, value_attr, float(logprobs[token_id]))
        setattr(info, top_attr, [(i, tokenizer.decode([i]), v) for i, v in top])
    return info


def stream_local(loaded, input_ids: torch.Tensor, params: SamplingParams, handle: GenerationHandle, queue_wait: float,
                 logprobs: int | None, capture_routing: bool, worker: DeviceWorker,
                 gpu_calls: GpuCalls, grammar: CompiledFormat | None = None) -> Iterator[GenerationEvent]:
    """One reply from a local model: `generate` runs on the device's `worker` thread (through `gpu_calls`, for
    ZeroGPU), this thread decodes and yields `delta` events as tokens arrive, then the `done` event with the stats
    (and the routing if asked). `grammar`: a compiled response format the reply is held to (structured output)."""
    model, tokenizer, chat_format = loaded.model, loaded.tokenizer, loaded.chat_format
    input_ids = input_ids.to(loaded.device)  # encoded (and checked) before the caller joined the queue
    attention_mask = torch.ones_like(input_ids)
    prompt_tokens = int(input_ids.shape[1])
    seed = params.seed if params.seed is not None else random.randrange(2**32)
    eos_ids = end_token_ids(model, tokenizer) | set(chat_format.stop_token_ids)
    streamer = TokenStreamer()
    processed = ProcessedScoreRecorder(logprobs) if logprobs is not None else None
    raw = RawLogitsRecorder(logprobs) if logprobs is not None else None
    kwargs = params.generate_kwargs()
    if params.stop:
        kwargs["tokenizer"] = tokenizer
    # The grammar masks first, so the warpers (temperature, top-k, top-p...) sample among allowed tokens only, and
    # its stopping criterion ends the reply when the structure is complete.
    constraint = grammar.constraint(prompt_tokens) if grammar else None
    generate_kwargs = dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        streamer=streamer,
        stopping_criteria=StoppingCriteriaList(
            [CancelCriteria(handle.cancelled), *([constraint.stopping_criterion()] if constraint else [])]),
        logits_processor=LogitsProcessorList(
            [*([constraint] if constraint else []), *params.logits_warpers(), *([processed] if processed else [])]),
        eos_token_id=sorted(eos_ids) or None,
        pad_token_id=tokenizer.pad_token_id,
        **kwargs,
    )
    failure: list[BaseException] = []
    hook = model.get_output_embeddings().register_forward_hook(raw) if raw else None
    traces: list[Any] = []
    record_routing = capture_routing and loaded.has_experts and hasattr(model, "record_routing")

    def run():
        try:
            with torch.inference_mode(), (model.record_routing() if record_routing else nullcontext()) as trace:
                torch.manual_seed(seed)  # serialised by the gate, so the global RNG is ours
                # On a ZeroGPU Space the GPU exists only inside spaces.GPU; elsewhere this just calls.
                gpu_calls.run(lambda: model.generate(**generate_kwargs))
            if trace is not None:
                traces.append(trace.stacked())  # stacked here, on the generation thread
        except BaseException as exc:  # reported to the consumer, never lost in the thread
            failure.append(exc)
        finally:
            streamer.end()

    started = time.perf_counter()
    finished_event = worker.submit(run)
    new_ids: list[int] = []
    emitted = ""
    first_token_at = last_token_at = None
    try:
        while True:
            item = streamer.queue.get()
            if item is None:
                break
            stamp, token_id = item
            first_token_at = first_token_at or stamp
            last_token_at = stamp
            new_ids.append(token_id)
            infos = []
            if logprobs is not None:
                infos.append(token_info(tokenizer, token_id, len(new_ids) - 1, raw, processed))
            clean = trim_at_stop(
                chat_format.clean_output(tokenizer.decode(new_ids, skip_special_tokens=chat_format.skip_special_tokens)),
                params.stop,
            )[0]
            delta = text_extension(emitted, clean, hold=clean.endswith("\ufffd"))  # a partial multi-byte character
            emitted += delta
            if delta or infos:
                yield GenerationEvent("delta", text=delta, tokens=infos)
    except BaseException:  # the consumer went away (GeneratorExit) or failed: stop the model too
        handle.cancel()
        raise
    finally:
        finished_event.wait()
        if hook:
            hook.remove()
    finished = time.perf_counter()
    final, hit_stop = trim_at_stop(
        chat_format.clean_output(tokenizer.decode(new_ids, skip_special_tokens=chat_format.skip_special_tokens)),
        params.stop,
    )
    stats = GenerationStats(
        prompt_tokens=prompt_tokens, new_tokens=len(new_ids), queue_wait_s=queue_wait, total_s=finished - started,
        seed=seed,
    )
    finish_timing(stats, started, first_token_at, last_token_at)
    if failure:
        exc = failure[0]
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
    if traces:
        experts, weights = traces[0]
        # The last sampled token never went through the model; the trace covers prompt + all but the last.
        token_ids = input_ids[0].tolist() + new_ids[: experts.shape[2] - prompt_tokens]
        routing = ExpertRouting(
            experts=experts[:, 0], weights=weights[:, 0], token_ids=token_ids, prompt_tokens=prompt_tokens,
            num_experts=int(getattr(model.config, "num_experts", experts.max().item() + 1)),
        )
    yield GenerationEvent("done", text=final, stats=stats, routing=routing)


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


__all__ = ["encode_prompt", "stream_local", "token_info"]
