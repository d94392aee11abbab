"""Who runs when: callers' handles, the FIFO gate per device, and the one worker thread per device."""

from __future__ import annotations

import gc
import itertools
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, TypeVar

import torch

T = TypeVar("T")


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


class DeviceWorker(ThreadPoolExecutor):
    """One long-lived thread per device that runs every `generate` call for that device (`submit` gives a Future).

    PyTorch's CPU backend (OpenMP) runs fastest when one live thread does all the heavy tensor work: each thread
    that runs parallel kernels keeps its own OpenMP team, and once there are more team threads than cores they
    stop spinning between kernels, which made decoding about a third slower on two cores (bench/stream_overhead.py).
    So generation always runs on this one thread, and the consuming threads only read what it produced.
    """

    def __init__(self, device: str):
        super().__init__(max_workers=1, thread_name_prefix=f"generate-{device}")


def start_on_thread(fn: Callable[[], T], name: str) -> "Future[T]":
    """Run `fn` on a new thread that ends with it; its result or exception arrives in the Future, never lost.

    For torch work off the device's worker (a load, a small computation): a long-lived thread that runs parallel
    torch kernels keeps an OpenMP team alive and slows every later generation (see DeviceWorker).
    """
    future: Future[T] = Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn())
        except BaseException as exc:  # noqa: BLE001  (handed to whoever reads the Future)
            future.set_exception(exc)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


def free_device_memory() -> None:
    """Collect garbage and return the CUDA cache (after a load, a swap or an out-of-memory error)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


__all__ = ["DeviceWorker", "FifoGate", "GenerationHandle", "free_device_memory", "start_on_thread"]
