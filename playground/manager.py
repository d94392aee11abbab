"""The model manager: the one process-wide object that owns the loaded model and every generation.

The chat tab, the sampling lab, the HTTP APIs and the LangChain integration all go through `get_manager()`.
Generations are serialised per device in arrival order (a waiting caller can read its place), each can be
cancelled and stops within one token, and each ends with stats.
"""

from __future__ import annotations

import gc
import itertools
import json
import os
import queue
import random
import threading
import time
from collections import deque
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from playground.chat_format import ChatFormat, PlainChatFormat, TemplateChatFormat, normalise_messages
from playground.errors import (
    LoadInProgressError,
    ModelFolderError,
    ModelNotLoadedError,
    ParameterError,
    PlaygroundError,
)
from playground.memory import MemorySampler
from playground.params import SamplingParams
from playground.spaces_support import run_on_gpu

Progress = Callable[[float, str], None]
EMBEDDED = "embedded"


# --------------------------------------------------------------------------------------------- data types


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    chat_format: ChatFormat
    name: str
    kind: str  # "embedded", "transformers", "yuan", "yuan-int4"
    path: str
    device: str
    dtype: str
    parameters: int
    memory_bytes: int
    load_time_s: float
    context_length: int
    has_experts: bool = False


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    queue_wait_s: float = 0.0
    time_to_first_token_s: float | None = None
    decode_tokens_per_s: float | None = None
    total_s: float = 0.0
    finish_reason: str = "stop"  # stop, length, cancelled, error
    seed: int | None = None
    error: str | None = None
    # Who failed: None (this process), "remote" (the remote engine), "remote-timeout" (it stayed silent) or
    # "remote-rejected" (it refused the request itself, e.g. a prompt longer than its context).
    error_source: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """The line shown under a reply."""
        parts = [f"{self.new_tokens} tokens"]
        if self.time_to_first_token_s is not None:
            parts.append(f"first token {self.time_to_first_token_s:.2f} s")
        if self.decode_tokens_per_s:
            parts.append(f"{self.decode_tokens_per_s:.1f} tok/s")
        parts.append(f"prompt {self.prompt_tokens}")
        if self.seed is not None:
            parts.append(f"seed {self.seed}")
        parts.append(self.finish_reason)
        return " · ".join(parts)


@dataclass
class TokenInfo:
    """One generated token; logprob fields are filled only when the caller asked for them."""

    id: int
    text: str
    logprob: float | None = None  # under the model's raw distribution
    sampled_logprob: float | None = None  # under the distribution after the sampling settings
    top: list[tuple[int, str, float]] = field(default_factory=list)  # raw top alternatives
    sampled_top: list[tuple[int, str, float]] = field(default_factory=list)


@dataclass
class ExpertRouting:
    """Which experts each token went to, per layer (Mixture-of-Experts models, when asked for).

    `experts` and `weights` are [layers, tokens, top_k] over the prompt's tokens then the reply's; `token_ids`
    names those tokens.
    """

    experts: torch.Tensor
    weights: torch.Tensor
    token_ids: list[int]
    prompt_tokens: int
    num_experts: int


@dataclass
class GenerationEvent:
    """What a stream yields: `queued` (position), `delta` (text, tokens) and finally `done` (stats)."""

    kind: str
    text: str = ""  # delta text for "delta", the full clean reply for "done"
    position: int | None = None
    tokens: list[TokenInfo] = field(default_factory=list)
    stats: GenerationStats | None = None
    routing: ExpertRouting | None = None  # on "done", when the stream was asked to capture routing


@dataclass
class GenerationResult:
    text: str
    stats: GenerationStats
    tokens: list[TokenInfo]


# ---------------------------------------------------------------------------------------- the FIFO gate


class GenerationHandle:
    """A caller's ticket: its place in the queue and its cancel switch."""

    _ids = itertools.count(1)

    def __init__(self, owner: str | None):
        self.id = next(self._ids)
        self.owner = owner
        self.cancelled = threading.Event()
        self.created = time.monotonic()

    def cancel(self) -> None:
        self.cancelled.set()


class FifoGate:
    """`slots` generations at a time (one for a local model), served strictly in arrival order."""

    def __init__(self, slots: int = 1):
        self._cond = threading.Condition()
        self._waiting: deque[GenerationHandle] = deque()
        self._running: list[GenerationHandle] = []
        self.slots = slots

    @property
    def running(self) -> GenerationHandle | None:
        """The earliest of the running generations, or None."""
        with self._cond:
            return self._running[0] if self._running else None

    def running_count(self) -> int:
        with self._cond:
            return len(self._running)

    def set_slots(self, slots: int) -> None:
        with self._cond:
            self.slots = max(1, int(slots))
            self._cond.notify_all()

    def join(self, handle: GenerationHandle) -> None:
        with self._cond:
            self._waiting.append(handle)

    def position(self, handle: GenerationHandle) -> int:
        """0 while running; 1 when next in line, 2 when one caller waits ahead, ...; -1 when gone."""
        with self._cond:
            if handle in self._running:
                return 0
            try:
                return self._waiting.index(handle) + 1
            except ValueError:
                return -1

    def wait_turn(self, handle: GenerationHandle, timeout: float) -> bool:
        """Block until it is this handle's turn (True) or `timeout` passes (False)."""
        with self._cond:
            ok = self._cond.wait_for(
                lambda: len(self._running) < self.slots and self._waiting and self._waiting[0] is handle, timeout
            )
            if ok:
                self._waiting.popleft()
                self._running.append(handle)
                self._cond.notify_all()  # the next in line may have a free slot too
            return ok

    def leave(self, handle: GenerationHandle) -> None:
        with self._cond:
            if handle in self._running:
                self._running.remove(handle)
            else:
                try:
                    self._waiting.remove(handle)
                except ValueError:
                    pass
            self._cond.notify_all()

    def queued(self) -> int:
        with self._cond:
            return len(self._waiting)


# ------------------------------------------------------------------------------ generation plumbing


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


class DeviceWorker:
    """One long-lived thread per device that runs every `generate` call for that device.

    PyTorch's CPU backend (OpenMP) runs fastest when one live thread does all the heavy tensor work: each thread
    that runs parallel kernels keeps its own OpenMP team, and once there are more team threads than cores they
    stop spinning between kernels, which made decoding about a third slower on two cores (bench/stream_overhead.py).
    So generation always runs on this one thread, and the consuming threads only read what it produced.
    """

    def __init__(self, device: str):
        self._jobs: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=f"generate-{device}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job, done = self._jobs.get()
            try:
                job()
            finally:
                done.set()

    def submit(self, job: Callable[[], None]) -> threading.Event:
        """Run `job` on the worker thread; the returned event is set when it has finished."""
        done = threading.Event()
        self._jobs.put((job, done))
        return done


def _close_remote(loaded: "LoadedModel | None") -> None:
    """Close a remote engine's connections once it is no longer the current model."""
    if loaded is not None and loaded.kind == "remote":
        loaded.model.close()


def _free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------- the manager


class ModelManager:
    def __init__(self):
        self._loaded: LoadedModel | None = None
        self._load_lock = threading.Lock()
        self._loading: dict[str, Any] | None = None
        self._last_error: str | None = None
        self._gates: dict[str, FifoGate] = {}
        self._workers: dict[str, DeviceWorker] = {}
        self._gates_lock = threading.Lock()
        self._handles: dict[int, GenerationHandle] = {}
        self._handles_lock = threading.Lock()
        self._memory: MemorySampler | None = None
        self.generations_done = 0
        # The saved chats and lab runs (playground.storage.Storage), opened by server.create_app; None: not saved.
        self.storage = None

    # --------------------------------------------------------------------------------------- loading

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
            previous, self._loaded = self._loaded, loaded
            self._last_error = None
            _close_remote(previous)
            del previous  # a running generation keeps its own reference until it ends
            _free_device_memory()
        except Exception as exc:
            self._last_error = f"loading {target} failed: {exc}"
            _free_device_memory()
            if isinstance(exc, PlaygroundError):
                raise
            raise ModelFolderError(self._last_error) from exc
        finally:
            self._loading = None
            self._load_lock.release()
        return self.status()

    def _build(self, target: str, device: str, dtype: str, report: Progress) -> LoadedModel:
        if target == EMBEDDED:
            from playground.embedded import EMBEDDED_NAME, ensure_converted

            folder = ensure_converted(report)
            return self._load_transformers_folder(folder, device, dtype, report, name=EMBEDDED_NAME, kind="embedded")
        path = Path(target).expanduser()
        if not path.exists():
            raise ModelFolderError(f"model folder {path} does not exist")
        if path.is_file():
            if path.suffix == ".gguf":
                return self._load_gguf(path, device, dtype, report)
            raise ModelFolderError(f"{path} is a file; give a model folder (or a .gguf file)")
        if _model_type(path) == "yuan":
            return self._load_yuan_folder(path, device, dtype, report)
        return self._load_transformers_folder(path, device, dtype, report, name=path.name, kind="transformers")

    def _load_transformers_folder(self, folder, device, dtype, report, name, kind) -> LoadedModel:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise ModelFolderError(f"{folder} has no config.json; is it a model folder?")
        if not list(folder.glob("*.safetensors")):
            raise ModelFolderError(f"{folder} has no *.safetensors weights (only safetensors are read, never pickle)")
        report(0.2, f"loading {name}")
        torch_dtype = resolve_dtype(dtype, device)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch_dtype, local_files_only=True, trust_remote_code=False, use_safetensors=True
        )
        return self._finish(model, tokenizer, name, kind, str(folder), device, report)

    def _load_gguf(self, path: Path, device, dtype, report) -> LoadedModel:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        report(0.2, f"dequantising {path.name}")
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=resolve_dtype(dtype, device))
        return self._finish(model, tokenizer, path.stem, "gguf", str(path), device, report)

    def _load_yuan_folder(self, path: Path, device, dtype, report) -> LoadedModel:
        from playground.models.yuan.loading import check_yuan_folder, load_yuan
        from playground.models.yuan.prompt import YuanChatFormat

        folder = check_yuan_folder(path)  # names the missing or damaged file before anything is built
        # "auto": INT4 runs on int4 kernels (bf16 weights, fp32 activations on CPU; bf16 on CUDA), float folders in
        # the checkpoint's dtype on CUDA and fp32 on CPU; "float32" is the exact mode (playground.models.yuan.precision).
        torch_dtype = None if dtype in (None, "", "auto") else resolve_dtype(dtype, device)
        model, tokenizer = load_yuan(folder, device=device, dtype=torch_dtype, progress=report)
        return self._finish(
            model, tokenizer, path.name, "yuan-int4" if folder.quantized else "yuan", str(path), device, report,
            chat_format=YuanChatFormat(tokenizer), has_experts=True,
        )

    def _finish(self, model, tokenizer, name, kind, path, device, report, chat_format=None, has_experts=False):
        report(0.9, f"moving to {device}")
        if str(getattr(model, "device", device)) != device:
            model = model.to(device)
        model.eval()
        if chat_format is None:
            chat_format = TemplateChatFormat(tokenizer) if getattr(tokenizer, "chat_template", None) else PlainChatFormat()
        if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
            tokenizer.pad_token = tokenizer.eos_token
        tensors = list(model.parameters()) + list(model.buffers())
        # Packed INT4 layers hold their weights as buffers: count them as the weights they stand for.
        parameters = sum(p.numel() for p in model.parameters()) + sum(
            m.in_features * m.out_features for m in model.modules() if hasattr(m, "qweight")
        )
        memory = sum(t.numel() * t.element_size() for t in tensors)
        dtype = next((str(p.dtype) for p in model.parameters() if p.is_floating_point()), "unknown")
        if getattr(model, "compute_precision", None) is not None:  # Yuan: mixed precisions, described by the loader
            dtype = model.compute_precision.describe()
        context = int(
            getattr(model.config, "max_position_embeddings", None)
            or getattr(tokenizer, "model_max_length", None)
            or 2048
        )
        return LoadedModel(
            model=model, tokenizer=tokenizer, chat_format=chat_format, name=name, kind=kind, path=path,
            device=device, dtype=dtype.replace("torch.", ""), parameters=parameters, memory_bytes=memory,
            load_time_s=0.0, context_length=context, has_experts=has_experts,
        )

    def load_remote(self, base_url: str, api_key: str | None = None, model: str | None = None,
                    timeout_s: float | None = None, concurrency: int | None = None,
                    chat_format: str = "auto", extensions: set[str] | None = None) -> dict[str, Any]:
        """Serve a remote OpenAI-compatible engine instead of a local model; nothing is loaded here.

        `concurrency`: how many of this playground's requests the engine gets at once (it batches them); the rest
        wait in this playground's queue, in order. `extensions`: the sampling fields beyond OpenAI's that the engine
        takes (None: known from its `owned_by`). On failure (engine down, key refused, no such model) the error
        is kept in the status, naming the URL, and raised: RemoteUnreachable when trying again later may work.
        """
        from playground.remote import DEFAULT_CONCURRENCY, DEFAULT_TIMEOUT_S, RemoteEngine, RemoteUnreachable

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
            previous = self._loaded
            self._gate("remote").set_slots(engine.concurrency)
            self._loaded = LoadedModel(
                model=engine, tokenizer=None, chat_format=engine.local_format or PlainChatFormat(),
                name=engine.model, kind="remote", path=engine.base_url, device="remote", dtype="remote",
                parameters=0, memory_bytes=0, load_time_s=time.perf_counter() - started,
                context_length=engine.context_length,
            )
            self._last_error = None
            _close_remote(previous)
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
        while self._loaded is None:
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

    def remote_engine(self):
        """The RemoteEngine when a remote engine is being served, else None."""
        loaded = self._loaded
        return loaded.model if loaded is not None and loaded.kind == "remote" else None

    def unavailable_params(self) -> list[str]:
        """Sampling fields the current engine cannot take (always none for a local model)."""
        engine = self.remote_engine()
        return engine.unavailable_params() if engine else []

    def require_local(self, what: str) -> LoadedModel:
        """The loaded model, when it is local; `what` needs its tokenizer or weights."""
        loaded = self.require_model()
        if loaded.kind == "remote":
            raise PlaygroundError(f"{what} needs a local model; the model {loaded.name} is remote ({loaded.path})")
        return loaded

    def unload(self) -> None:
        previous, self._loaded = self._loaded, None
        _close_remote(previous)
        _free_device_memory()

    @property
    def loaded(self) -> LoadedModel | None:
        return self._loaded

    def require_model(self) -> LoadedModel:
        loaded = self._loaded
        if loaded is None:
            if self._loading:
                raise ModelNotLoadedError(f"the model is still loading ({self._loading['message']})")
            raise ModelNotLoadedError(self._last_error or "no model is loaded")
        return loaded

    def status(self) -> dict[str, Any]:
        loaded = self._loaded
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
            if loaded.kind == "remote":
                engine = loaded.model
                info.update(base_url=loaded.path, remote_owner=engine.owner,
                            unavailable_params=engine.unavailable_params(), remote_chat_format=engine.chat_format,
                            remote_concurrency=engine.concurrency, remote_timeout_s=engine.timeout_s,
                            remote_last_success_at=engine.last_success_at, remote_last_failure=engine.last_failure)
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

    def count_tokens(self, text: str) -> int:
        loaded = self.require_local("counting tokens")
        return len(loaded.tokenizer(text, add_special_tokens=False)["input_ids"])

    def cancel(self, owner: str) -> int:
        """Cancel every queued or running generation of `owner` (a UI session); returns how many."""
        with self._handles_lock:
            handles = [h for h in self._handles.values() if h.owner == owner]
        for handle in handles:
            handle.cancel()
        return len(handles)

    def stream(
        self,
        messages: list[dict[str, Any]] | None = None,
        prompt: str | None = None,
        params: SamplingParams | dict | None = None,
        owner: str | None = None,
        handle: GenerationHandle | None = None,
        logprobs: int | None = None,
        capture_routing: bool = False,
    ) -> Iterator[GenerationEvent]:
        """Stream one reply: `queued` events while waiting, `delta` events, then one `done` event.

        Give chat `messages` (formatted by the model's chat format) or a raw `prompt`. Closing the iterator
        early (a client going away) cancels the generation. `logprobs`: how many top alternatives to attach
        to each token (0 for only the chosen token's logprob, None for none). `capture_routing`: attach the
        experts every token went to (models with experts only) to the `done` event.
        """
        params = SamplingParams.parse(params)
        if (messages is None) == (prompt is None):
            raise ParameterError("give either messages or a prompt")
        if logprobs is not None and not 0 <= int(logprobs) <= 20:
            raise ParameterError("logprobs must be between 0 and 20", field="logprobs")
        loaded = self.require_model()
        if loaded.kind == "remote":
            messages = normalise_messages(messages) if messages is not None else None
            if messages is None and (not prompt or not prompt.strip()):
                raise ParameterError("the prompt is empty", field="prompt")
            loaded.model.request_fields(params)  # a field the engine cannot take fails here, before the queue
            input_ids = None
        else:
            text = loaded.chat_format.build_prompt(normalise_messages(messages)) if messages is not None else prompt
            input_ids = self._encode(loaded, text, params)  # bad input fails here, before it takes a place in the queue
        handle = handle or GenerationHandle(owner)
        with self._handles_lock:
            self._handles[handle.id] = handle
        gate = self._gate(loaded.device)
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
            if loaded.kind == "remote":  # the queue still orders this playground's callers
                yield from self._generate_remote(
                    loaded, messages, prompt, params, handle, time.perf_counter() - queued_at, logprobs
                )
                return
            # The model may have been swapped while this caller waited: use the current one.
            if self.require_model() is not loaded:
                loaded = self.require_model()
                if messages is not None:
                    text = loaded.chat_format.build_prompt(normalise_messages(messages))
                input_ids = self._encode(loaded, text, params)
            yield from self._generate(
                loaded, input_ids, params, handle, time.perf_counter() - queued_at, logprobs, capture_routing
            )
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
        if self.remote_engine() is None:
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

    def _generate_remote(self, loaded, messages, prompt, params, handle, queue_wait, logprobs) -> Iterator[GenerationEvent]:
        """One reply from the remote engine, as the same events a local generation yields."""
        from playground.remote import RemoteError, RemoteRejected, RemoteTimeout

        engine, chat_format = loaded.model, loaded.chat_format
        stats = GenerationStats(queue_wait_s=queue_wait, seed=params.seed)
        started = time.perf_counter()
        first_at = last_at = None
        raw, emitted, deltas, reason = "", "", 0, None
        items = engine.stream(messages, prompt, params, logprobs, handle.cancelled)
        try:
            for kind, value in items:
                if kind == "delta":
                    delta, token_dicts = value
                    last_at = time.perf_counter()
                    first_at = first_at or last_at
                    deltas += max(1, len(token_dicts))
                    raw += delta
                    tokens = [TokenInfo(id=-1, text=t["text"], logprob=t["logprob"],
                                        top=[(-1, alt, lp) for alt, lp in t["top"]]) for t in token_dicts]
                    # A prompt format built here (Yuan's) comes back with its special tokens: clean as locally,
                    # holding back a special token that is only half received.
                    text = _extension(emitted, chat_format.clean_output(raw), hold=_partial_special_token(raw, chat_format))
                    emitted += text
                    if text or tokens:
                        yield GenerationEvent("delta", text=text, tokens=tokens)
                elif kind == "finish":
                    reason = value
                elif kind == "usage":
                    stats.prompt_tokens = int(value.get("prompt_tokens") or 0)
                    stats.new_tokens = int(value.get("completion_tokens") or 0)
        except RemoteError as exc:
            stats.finish_reason, stats.error = "error", str(exc)
            stats.error_source = ("remote-timeout" if isinstance(exc, RemoteTimeout)
                                  else "remote-rejected" if isinstance(exc, RemoteRejected) else "remote")
        except BaseException:  # the consumer went away: closing the generator closes the HTTP stream
            handle.cancel()
            items.close()
            raise
        finally:
            items.close()
        stats.total_s = time.perf_counter() - started
        stats.new_tokens = stats.new_tokens or deltas
        stats.time_to_first_token_s = (first_at - started) if first_at else None
        if first_at and last_at and last_at > first_at and stats.new_tokens > 1:
            stats.decode_tokens_per_s = (stats.new_tokens - 1) / (last_at - first_at)
        if stats.finish_reason != "error":
            if handle.cancelled.is_set():
                stats.finish_reason = "cancelled"
            elif reason is None:
                stats.finish_reason, stats.error = "error", "the remote engine went away mid-reply"
                stats.error_source = "remote"
            else:
                stats.finish_reason = "length" if reason == "length" else "stop"
        held_back = _extension(emitted, chat_format.clean_output(raw))
        if held_back:  # so the deltas add up to the reply
            yield GenerationEvent("delta", text=held_back, tokens=[])
            emitted += held_back
        self.generations_done += 1
        yield GenerationEvent("done", text=emitted, stats=stats)

    def _generate(self, loaded, input_ids, params, handle, queue_wait, logprobs, capture_routing) -> Iterator[GenerationEvent]:
        model, tokenizer, chat_format = loaded.model, loaded.tokenizer, loaded.chat_format
        input_ids = input_ids.to(loaded.device)  # encoded (and checked) before the caller joined the queue
        attention_mask = torch.ones_like(input_ids)
        prompt_tokens = int(input_ids.shape[1])
        seed = params.seed if params.seed is not None else random.randrange(2**32)
        eos_ids = _eos_ids(model, tokenizer) | set(chat_format.stop_token_ids)
        streamer = TokenStreamer()
        processed = ProcessedScoreRecorder(logprobs) if logprobs is not None else None
        raw = RawLogitsRecorder(logprobs) if logprobs is not None else None
        kwargs = params.generate_kwargs()
        if params.stop:
            kwargs["tokenizer"] = tokenizer
        generate_kwargs = dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
            streamer=streamer,
            stopping_criteria=StoppingCriteriaList([CancelCriteria(handle.cancelled)]),
            logits_processor=LogitsProcessorList([*params.logits_warpers(), *([processed] if processed else [])]),
            eos_token_id=sorted(eos_ids) or None,
            pad_token_id=tokenizer.pad_token_id,
            **kwargs,
        )
        failure: list[BaseException] = []
        hook = model.get_output_embeddings().register_forward_hook(raw) if raw else None
        traces: list[Any] = []
        record_routing = capture_routing and loaded.has_experts and hasattr(model, "record_routing")

        def worker():
            try:
                with torch.inference_mode(), (model.record_routing() if record_routing else nullcontext()) as trace:
                    torch.manual_seed(seed)  # serialised by the gate, so the global RNG is ours
                    # On a ZeroGPU Space the GPU exists only inside spaces.GPU; elsewhere this just calls.
                    run_on_gpu(lambda: model.generate(**generate_kwargs))
                if trace is not None:
                    traces.append(trace.stacked())  # stacked here, on the generation thread
            except BaseException as exc:  # reported to the consumer, never lost in the thread
                failure.append(exc)
            finally:
                streamer.end()

        started = time.perf_counter()
        finished_event = self._worker(loaded.device).submit(worker)
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
                    infos.append(self._token_info(tokenizer, token_id, len(new_ids) - 1, raw, processed))
                clean = _trim_at_stop(
                    chat_format.clean_output(tokenizer.decode(new_ids, skip_special_tokens=chat_format.skip_special_tokens)),
                    params.stop,
                )[0]
                delta = _extension(emitted, clean, hold=clean.endswith("\ufffd"))  # a partial multi-byte character
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
        final, hit_stop = _trim_at_stop(
            chat_format.clean_output(tokenizer.decode(new_ids, skip_special_tokens=chat_format.skip_special_tokens)),
            params.stop,
        )
        stats = GenerationStats(
            prompt_tokens=prompt_tokens,
            new_tokens=len(new_ids),
            queue_wait_s=queue_wait,
            time_to_first_token_s=(first_token_at - started) if first_token_at else None,
            decode_tokens_per_s=((len(new_ids) - 1) / (last_token_at - first_token_at))
            if first_token_at and last_token_at and last_token_at > first_token_at
            else None,
            total_s=finished - started,
            seed=seed,
        )
        if failure:
            exc = failure[0]
            stats.finish_reason = "error"
            if isinstance(exc, torch.OutOfMemoryError):
                stats.error = "out of memory during generation; caches were freed, try a shorter prompt or reply"
            else:
                stats.error = f"{type(exc).__name__}: {exc}"
            _free_device_memory()
        elif handle.cancelled.is_set():
            stats.finish_reason = "cancelled"
        elif new_ids and new_ids[-1] in eos_ids:
            stats.finish_reason = "stop"
        elif hit_stop:
            stats.finish_reason = "stop"
        elif len(new_ids) >= params.max_new_tokens:
            stats.finish_reason = "length"
        self.generations_done += 1
        held_back = _extension(emitted, final)
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

    # ------------------------------------------------------------------------------------- insight views

    def next_token_logits(self, messages=None, prompt=None, owner: str | None = None) -> tuple[list[int], torch.Tensor]:
        """One forward pass, through the queue: (prompt token ids, raw next-token logits [vocab] float32 on CPU).

        The sampling lab's next-token explorer redraws its distribution from this without running the model again.
        """
        if (messages is None) == (prompt is None):
            raise ParameterError("give either messages or a prompt")
        loaded = self.require_local("the next-token explorer")
        text = loaded.chat_format.build_prompt(normalise_messages(messages)) if messages is not None else prompt
        input_ids = self._encode(loaded, text, SamplingParams(max_new_tokens=1))
        handle = GenerationHandle(owner)
        gate = self._gate(loaded.device)
        gate.join(handle)
        try:
            while not gate.wait_turn(handle, timeout=0.2):
                pass
            result: list[Any] = []

            def forward():
                try:
                    def last_logits():
                        with torch.inference_mode():
                            ids = input_ids.to(loaded.device)
                            # Only the last position's logits: the vocabulary projection of every other is waste.
                            output = loaded.model(input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=1)
                            return output.logits[0, -1].float().cpu()

                    result.append(run_on_gpu(last_logits))
                except BaseException as exc:
                    result.append(exc)

            self._worker(loaded.device).submit(forward).wait()
        finally:
            gate.leave(handle)
        if isinstance(result[0], BaseException):
            raise PlaygroundError(f"the forward pass failed: {result[0]}") from result[0]
        return input_ids[0].tolist(), result[0]

    @staticmethod
    def compute(fn: Callable[[], Any]) -> Any:
        """Run a small torch computation off the generation thread, on a thread that ends with it.

        A long-lived thread that runs parallel torch kernels keeps an OpenMP team alive and slows every
        generation (see DeviceWorker); a short-lived one takes its team with it.
        """
        outcome: list[Any] = []

        def run():
            try:
                outcome.append((True, fn()))
            except BaseException as exc:
                outcome.append((False, exc))

        thread = threading.Thread(target=run, name="compute")
        thread.start()
        thread.join()
        ok, value = outcome[0]
        if not ok:
            raise value
        return value

    @staticmethod
    def _encode(loaded: LoadedModel, text: str, params: SamplingParams) -> torch.Tensor:
        """The prompt's ids [1, n]; rejects an empty prompt or one that leaves no room for the reply."""
        if not text or not text.strip():
            raise ParameterError("the prompt is empty", field="prompt")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:  # a lone UTF-16 surrogate (e.g. "\ud800" in JSON) makes tokenizers fail
            raise ParameterError(
                f"the prompt contains {exc.object[exc.start]!r}, half of a UTF-16 surrogate pair, which is not a "
                "character; send valid Unicode text", field="prompt",
            ) from None
        input_ids = loaded.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        prompt_tokens = int(input_ids.shape[1])
        if prompt_tokens + params.max_new_tokens > loaded.context_length:
            raise ParameterError(
                f"the prompt is {prompt_tokens} tokens and max_new_tokens is {params.max_new_tokens}, "
                f"but the model's context is {loaded.context_length} tokens; shorten the prompt or the reply",
                field="prompt",
            )
        return input_ids

    @staticmethod
    def _token_info(tokenizer, token_id, step, raw, processed) -> TokenInfo:
        info = TokenInfo(id=token_id, text=tokenizer.decode([token_id]))
        for recorder, value_attr, top_attr in ((raw, "logprob", "top"), (processed, "sampled_logprob", "sampled_top")):
            if recorder is None or step >= len(recorder.steps):
                continue
            logprobs, top = recorder.steps[step]
            setattr(info, value_attr, float(logprobs[token_id]))
            setattr(info, top_attr, [(i, tokenizer.decode([i]), v) for i, v in top])
        return info

    # ----------------------------------------------------------------------------------------- memory

    def memory(self) -> MemorySampler:
        """The process's memory sampler (started on first use)."""
        if self._memory is None:
            self._memory = MemorySampler(remote_source=self._remote_metrics)
            self._memory.start()
        return self._memory

    def _remote_metrics(self) -> dict[str, float] | None:
        """The remote engine's Prometheus figures for the memory sampler; None for a local model."""
        engine = self.remote_engine()
        return engine.metrics() if engine is not None else None


def _model_type(folder: Path) -> str | None:
    """config.json's model_type, or None when there is no readable config (the loader then says what is wrong)."""
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def _eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for value in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def _extension(emitted: str, clean: str, hold: bool = False) -> str:
    """The text that extends what was already sent: "" while held back, or when cleaning rewrote earlier text."""
    return clean[len(emitted):] if not hold and clean.startswith(emitted) else ""


def _partial_special_token(text: str, chat_format) -> bool:
    """Whether the text ends inside a `<...>` special token of a format that writes them as text."""
    if chat_format.skip_special_tokens:
        return False
    opening = text.rfind("<", max(0, len(text) - 16))
    return opening >= 0 and ">" not in text[opening:]


def _trim_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """Cut the text at the first stop string (the stop string itself is not part of the reply)."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def resolve_device(device: str) -> str:
    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ParameterError(f"device {device!r} was asked for, but CUDA is not available here", field="device")
    if device not in ("cpu", "mps") and not device.startswith("cuda"):
        raise ParameterError(f"unknown device {device!r}; use auto, cpu or cuda[:N]", field="device")
    return device


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype in (None, "", "auto"):
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise ParameterError(f"unknown dtype {dtype!r}; use auto, float32, float16 or bfloat16", field="dtype")
    return DTYPES[dtype]


_manager: ModelManager | None = None
_manager_lock = threading.Lock()


def get_manager() -> ModelManager:
    """The process-wide model manager."""
    global _manager
    with _manager_lock:
        if _manager is None:
            _manager = ModelManager()
        return _manager
