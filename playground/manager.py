"""The model manager: the one process-wide object that owns the loaded model and every generation.

The entry point (`server.create_app`) builds one and hands it to the chat tab, the sampling lab, the HTTP APIs
(`request.app.state.manager`, a FastAPI dependency) and the LangChain integration; nothing fetches a global.
Generations are serialised per device in arrival order (a waiting caller can read its place), each can be
cancelled and stops within one token, and each ends with stats. The pieces live beside it: loading in
`model_loading.py`, the queue, events and the two generation paths (local, remote engine) in `generation/`.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable, Iterator

import torch

from playground.chat_format import checked_input, normalise_messages
from playground.defaults import DEFAULT_CONCURRENCY, DEFAULT_MAX_PROMPT_CHARS, DEFAULT_TIMEOUT_S
from playground.errors import LoadInProgressError, ModelFolderError, ModelNotLoadedError, ParameterError, PlaygroundError
from playground.generation import scheduling
from playground.generation.events import GenerationEvent, GenerationResult, GenerationStats, TokenInfo
from playground.generation.backends import Backend, GenerationRequest, LocalBackend, RemoteBackend
from playground.generation.scheduling import DeviceWorker, FifoGate, GenerationHandle, start_on_thread
from playground.memory import MemorySampler
from playground.model_loading import EMBEDDED, LoadedModel, Progress, build_local_model, resolve_device
from playground.params import SamplingParams
from playground.spaces_support import GpuCalls
from playground.structured import ResponseFormat


# ------------------------------------------------------------------------------------------- the manager



class ModelManager:
    def __init__(self, max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS, prompt_cache_bytes: int | None = None):
        self._backend: Backend | None = None  # the current model, local or remote
        self._load_lock = threading.Lock()
        self._loading: dict[str, Any] | None = None
        self._last_error: str | None = None
        self._gates: dict[str, FifoGate] = {}
        self._workers: dict[str, DeviceWorker] = {}
        self._gates_lock = threading.Lock()
        self._handles: dict[int, GenerationHandle] = {}
        self._handles_lock = threading.Lock()
        self._memory: MemorySampler | None = None
        self.gpu_calls = GpuCalls()  # model calls go through it (ZeroGPU); it keeps the last call's CUDA figures
        self.max_prompt_chars = max_prompt_chars
        self.prompt_cache_bytes = prompt_cache_bytes  # the prompt cache's budget (None: sized at each load)

    # --------------------------------------------------------------------------------------- loading

    def load_on_thread(self, model: str | os.PathLike | None = None, device: str = "auto", dtype: str = "auto"
                       ) -> "Future[dict[str, Any]]":
        """`load` on a thread of its own that ends with it (a long-lived thread that ran torch kernels, such as a
        web server's worker, would keep an OpenMP team alive and slow every later generation; see DeviceWorker)."""
        return start_on_thread(lambda: self.load(model, device=device, dtype=dtype), name="model-load")

    def load(
        self,
        model: str | os.PathLike | None = None,
        device: str = "auto",
        dtype: str = "auto",
        progress: Progress | None = None,
    ) -> dict[str, Any]:
        """Load a model and make it current. On failure the previous model stays and the error is kept.

        `model`: None or "embedded" for the embedded SmolLM2, else a model folder (or a .gguf file).
        Raises LoadInProgressError when another load is running, ModelFolderError for a bad folder.
        """
        if not self._load_lock.acquire(blocking=False):
            raise LoadInProgressError("another model is loading; wait for it to finish")
        started = time.perf_counter()
        target = EMBEDDED if model in (None, "", EMBEDDED) else str(model)
        self._loading = {"model": target, "fraction": 0.0, "message": "starting"}

        def report(fraction: float, message: str) -> None:
            self._loading = {"model": target, "fraction": float(fraction), "message": message}
            if progress:
                progress(fraction, message)

        try:
            resolved_device = resolve_device(device)
            loaded = self._build(target, resolved_device, dtype, report)
            loaded.load_time_s = time.perf_counter() - started
            report(1.0, "ready")
            self._switch_to(LocalBackend(loaded, self._worker, self.gpu_calls, self.prompt_cache_bytes))
            del loaded  # a running generation keeps its own reference until it ends
            scheduling.free_device_memory()
        except Exception as exc:
            self._last_error = f"loading {target} failed: {exc}"
            scheduling.free_device_memory()
            if isinstance(exc, PlaygroundError):
                raise
            raise ModelFolderError(self._last_error) from exc
        finally:
            self._loading = None
            self._load_lock.release()
        return self.status()

    def _build(self, target: str, device: str, dtype: str, report: Progress) -> LoadedModel:
        return build_local_model(target, device, dtype, report)

    def load_remote(self, base_url: str, api_key: str | None = None, model: str | None = None,
                    timeout_s: float | None = None, concurrency: int | None = None,
                    chat_format: str = "auto", extensions: set[str] | None = None) -> dict[str, Any]:
        """Serve a remote OpenAI-compatible engine instead of a local model; nothing is loaded here.

        `concurrency`: how many of this playground's requests the engine gets at once (it batches them); the rest
        wait in this playground's queue, in order. `extensions`: the sampling fields beyond OpenAI's that the engine
        takes (None: known from its `owned_by`). On failure (engine down, key refused, no such model) the error
        is kept in the status, naming the URL, and raised: RemoteUnreachable when trying again later may work.
        """
        from playground.remote import RemoteEngine, RemoteUnreachable

        if not self._load_lock.acquire(blocking=False):
            raise LoadInProgressError("another model is loading; wait for it to finish")
        started = time.perf_counter()
        self._loading = {"model": base_url, "fraction": 0.0, "message": f"connecting to {base_url}"}
        try:
            engine = RemoteEngine(base_url, api_key=api_key, model=model,
                                  timeout_s=timeout_s or DEFAULT_TIMEOUT_S,
                                  concurrency=concurrency or DEFAULT_CONCURRENCY, chat_format=chat_format,
                                  extensions=extensions)
            try:
                engine.connect()
            except PlaygroundError as exc:
                engine.close()
                self._last_error = f"the remote engine at {base_url} is not usable: {exc}"
                kind = RemoteUnreachable if isinstance(exc, RemoteUnreachable) else PlaygroundError
                raise kind(self._last_error) from None
            backend = RemoteBackend.for_engine(engine, load_time_s=time.perf_counter() - started)
            self._gate(backend.gate_key).set_slots(engine.concurrency)
            self._switch_to(backend)
        finally:
            self._loading = None
            self._load_lock.release()
        return self.status()

    def keep_connecting_remote(self, base_url: str, *, first_delay_s: float = 1.0, max_delay_s: float = 30.0,
                               **kwargs) -> bool:
        """`load_remote` until it works, waiting longer after each unreachable try (an engine still starting up:
        vLLM takes minutes to load a model). Stops on an error that waiting cannot fix (a refused key, no such
        model) or once some model has been loaded another way. Returns whether the engine is now served."""
        from playground.remote import RemoteUnreachable

        delay = first_delay_s
        while self._backend is None:
            try:
                self.load_remote(base_url, **kwargs)
                return True
            except RemoteUnreachable:
                self._last_error = f"{self._last_error}; trying again in {delay:.0f} s"
            except LoadInProgressError:
                pass  # a load from the model panel; check again after it
            except PlaygroundError:
                return False
            time.sleep(delay)
            delay = min(max_delay_s, delay * 2)
        return False

    def cancel_all(self) -> int:
        """Cancel every queued or running generation (the server is stopping); returns how many."""
        return self._cancel_where(lambda handle: True)

    def _cancel_where(self, chosen: Callable[[GenerationHandle], bool]) -> int:
        with self._handles_lock:
            handles = [handle for handle in self._handles.values() if chosen(handle)]
        for handle in handles:
            handle.cancel()
        return len(handles)

    def close(self) -> None:
        """Cancel what runs, let the model go and stop this manager's threads (device workers, memory sampler): for an
        app that ends while its process goes on (tests, an embedding application)."""
        self.cancel_all()
        backend, self._backend = self._backend, None
        if backend is not None:
            backend.close()
        with self._gates_lock:
            workers, self._workers = list(self._workers.values()), {}
        for worker in workers:
            worker.shutdown(wait=True)
        if self._memory is not None:
            self._memory.stop()
            self._memory = None

    def _switch_to(self, backend: Backend) -> None:
        previous, self._backend = self._backend, backend
        self._last_error = None
        if previous is not None:
            previous.close()

    def unavailable_params(self) -> list[str]:
        """Sampling fields the current backend cannot take (always none for a local model)."""
        return self._backend.unavailable_params() if self._backend is not None else []

    def set_prompt_cache_budget(self, budget_bytes: int | None) -> dict[str, int]:
        """Resize the current local model's prompt cache (None: sized from the memory free now; 0: empty and off)
        and return its figures. Later loads keep this setting."""
        backend = self._require_backend()
        backend.local("a prompt cache")  # a remote engine keeps its own: this says so
        self.prompt_cache_bytes = budget_bytes
        backend.resize_prompt_cache(budget_bytes)
        return backend.prompt_cache.stats()

    def require_local(self, what: str) -> LoadedModel:
        """The loaded model, when it is local; `what` needs its tokenizer or weights."""
        return self._require_backend().local(what)

    @property
    def loaded(self) -> LoadedModel | None:
        backend = self._backend
        return backend.loaded if backend is not None else None

    def _require_backend(self) -> Backend:
        backend = self._backend
        if backend is None:
            if self._loading:
                raise ModelNotLoadedError(f"the model is still loading ({self._loading['message']})")
            raise ModelNotLoadedError(self._last_error or "no model is loaded")
        return backend

    def require_model(self) -> LoadedModel:
        return self._require_backend().loaded

    def status(self) -> dict[str, Any]:
        backend = self._backend
        loaded = backend.loaded if backend is not None else None
        info: dict[str, Any] = {
            "state": "loading" if self._loading else ("ready" if loaded else ("error" if self._last_error else "empty")),
            "loading": dict(self._loading) if self._loading else None,
            "last_error": self._last_error,
            "queued": sum(g.queued() for g in self._gates.values()),
            "running": sum(g.running_count() for g in self._gates.values()),
        }
        if loaded:
            info.update(
                name=loaded.name, kind=loaded.kind, path=loaded.path, device=loaded.device, dtype=loaded.dtype,
                parameters=loaded.parameters, memory_mib=round(loaded.memory_bytes / 2**20, 1),
                load_time_s=round(loaded.load_time_s, 2), context_length=loaded.context_length,
                chat_format=loaded.chat_format.name, has_experts=loaded.has_experts,
            )
            info.update(backend.status_fields())
        return info

    # ------------------------------------------------------------------------------------- generation

    def _gate(self, device: str) -> FifoGate:
        with self._gates_lock:
            return self._gates.setdefault(device, FifoGate())

    def _worker(self, device: str) -> DeviceWorker:
        with self._gates_lock:
            if device not in self._workers:
                self._workers[device] = DeviceWorker(device)
            return self._workers[device]

    def build_prompt(self, messages: list[dict[str, Any]]) -> str:
        loaded = self.require_local("building the prompt in the model's chat format")
        return loaded.chat_format.build_prompt(normalise_messages(messages))

    def busy(self, owner: str) -> bool:
        """Whether `owner` (a UI session) has a generation queued or running."""
        with self._handles_lock:
            return any(h.owner == owner for h in self._handles.values())

    def cancel(self, owner: str) -> int:
        """Cancel every queued or running generation of `owner` (a UI session); returns how many."""
        return self._cancel_where(lambda handle: handle.owner == owner)

    def stream(
        self,
        messages: list[dict[str, Any]] | None = None,
        prompt: str | None = None,
        params: SamplingParams | dict | None = None,
        owner: str | None = None,
        handle: GenerationHandle | None = None,
        logprobs: int | None = None,
        capture_routing: bool = False,
        response_format: ResponseFormat | dict | None = None,
    ) -> Iterator[GenerationEvent]:
        """Stream one reply: `queued` events while waiting, `delta` events, then one `done` event.

        Give chat `messages` (formatted by the model's chat format) or a raw `prompt`. Closing the iterator
        early (a client going away) cancels the generation. `logprobs`: how many top alternatives to attach
        to each token (0 for only the chosen token's logprob, None for none). `capture_routing`: attach the
        experts every token went to (models with experts only) to the `done` event. `response_format`: hold the
        reply to a JSON schema, any JSON object, a regex or a grammar (`playground.structured.ResponseFormat`, or its
        OpenAI-shaped dict such as {"type": "json_object"}); a format that cannot be compiled is a ParameterError.
        """
        params, response_format = SamplingParams.parse(params), ResponseFormat.parse(response_format)
        if (messages is None) == (prompt is None):
            raise ParameterError("give either messages or a prompt")
        if logprobs is not None and not 0 <= int(logprobs) <= 20:
            raise ParameterError("logprobs must be between 0 and 20", field="logprobs")
        backend = self._require_backend()
        messages = checked_input(messages, prompt, self.max_prompt_chars)
        request = GenerationRequest(messages, prompt, params, response_format, logprobs, capture_routing)
        prepared = backend.prepare(request)  # bad input fails here, not queued
        handle = handle or GenerationHandle(owner)
        with self._handles_lock:
            self._handles[handle.id] = handle
        gate = self._gate(backend.gate_key)
        gate.join(handle)
        queued_at = time.perf_counter()
        try:
            last_position = None
            # Timeout 0 first: a caller that has to wait learns its place at once.
            while not gate.wait_turn(handle, timeout=0.2 if last_position is not None else 0):
                if handle.cancelled.is_set():
                    stats = GenerationStats(finish_reason="cancelled", queue_wait_s=time.perf_counter() - queued_at)
                    yield GenerationEvent("done", stats=stats)
                    return
                position = gate.position(handle)
                if position != last_position:
                    last_position = position
                    yield GenerationEvent("queued", position=position)
            # The model may have been swapped while this caller waited: use the current one if this gate orders it.
            current = self._require_backend()
            if current is not backend and current.gate_key == backend.gate_key:
                backend, prepared = current, current.prepare(request)
            yield from backend.stream(request, prepared, handle, time.perf_counter() - queued_at)
        finally:
            handle.cancel()  # no-op after a normal end; stops a generation whose consumer went away
            gate.leave(handle)
            with self._handles_lock:
                self._handles.pop(handle.id, None)

    def generate(self, **kwargs) -> GenerationResult:
        """Non-streaming convenience over `stream`."""
        tokens: list[TokenInfo] = []
        for event in self.stream(**kwargs):
            tokens.extend(event.tokens)
            if event.kind == "done":
                return GenerationResult(text=event.text, stats=event.stats, tokens=tokens)
        raise PlaygroundError("generation ended without a result")  # pragma: no cover

    def stream_each(self, requests: list[dict[str, Any]], owner: str | None = None
                    ) -> Iterator[tuple[int, GenerationEvent | PlaygroundError]]:
        """Several independent generations (`stream` keyword arguments each), as (index, event) pairs.

        With a remote engine they all start at once, so the engine batches them (this playground's queue still
        bounds how many run); with a local model they run one after another, each joining the queue in turn. A
        request refused before it starts gives (index, error) and the others go on. Closing the iterator early
        cancels whatever still runs.
        """
        handles = [GenerationHandle(owner) for _ in requests]
        if self._backend is None or not self._backend.batches:
            for index, kwargs in enumerate(requests):
                try:
                    for event in self.stream(handle=handles[index], **kwargs):
                        yield index, event
                except PlaygroundError as exc:
                    yield index, exc
            return
        inbox: queue.SimpleQueue = queue.SimpleQueue()
        finished = object()

        def run(index: int, kwargs: dict[str, Any]) -> None:
            try:
                for event in self.stream(handle=handles[index], **kwargs):
                    inbox.put((index, event))
            except PlaygroundError as exc:
                inbox.put((index, exc))
            except BaseException as exc:  # noqa: BLE001  (reported, never lost in the thread)
                inbox.put((index, PlaygroundError(f"{type(exc).__name__}: {exc}")))
            finally:
                inbox.put((index, finished))

        # Short-lived threads that only wait on HTTP: no torch work runs on them.
        for index, kwargs in enumerate(requests):
            threading.Thread(target=run, args=(index, kwargs), name=f"stream-each-{index}", daemon=True).start()
        remaining = len(requests)
        try:
            while remaining:
                index, item = inbox.get()
                if item is finished:
                    remaining -= 1
                else:
                    yield index, item
        finally:
            for handle in handles:
                handle.cancel()  # a no-op for those that ended

    # ------------------------------------------------------------------------------------- insight views

    def next_token_logits(self, messages=None, prompt=None, owner: str | None = None) -> tuple[list[int], torch.Tensor]:
        """One forward pass, through the queue: (prompt token ids, raw next-token logits [vocab] float32 on CPU).

        The sampling lab's next-token explorer redraws its distribution from this without running the model again.
        """
        if (messages is None) == (prompt is None):
            raise ParameterError("give either messages or a prompt")
        backend = self._require_backend()
        loaded = backend.local("the next-token explorer")
        messages = checked_input(messages, prompt, self.max_prompt_chars)
        # The prompt's ids, prepared as a reply's prompt.
        input_ids = backend.prepare(GenerationRequest(messages, prompt, SamplingParams.one_forward_pass())).input_ids
        handle = GenerationHandle(owner)
        gate = self._gate(loaded.device)
        gate.join(handle)
        try:
            while not gate.wait_turn(handle, timeout=0.2):
                pass
            logits = backend.next_token_logits(input_ids)
        finally:
            gate.leave(handle)
        return input_ids[0].tolist(), logits

    @staticmethod
    def compute(fn: Callable[[], Any]) -> Any:
        """Run a small torch computation off the generation thread, on a thread that ends with it (see
        `start_on_thread`)."""
        return start_on_thread(fn, name="compute").result()

    # ----------------------------------------------------------------------------------------- memory

    def memory(self) -> MemorySampler:
        """The process's memory sampler (started on first use)."""
        if self._memory is None:
            self._memory = MemorySampler(remote_source=self._remote_metrics)
            self._memory.start()
        return self._memory

    def _remote_metrics(self) -> dict[str, float] | None:
        """The remote engine's Prometheus figures for the memory sampler; None for a local model."""
        return self._backend.metrics() if self._backend is not None else None

