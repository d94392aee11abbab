"""Hugging Face Spaces support, kept apart from the rest: the ZeroGPU shim and its memory figures.

On a ZeroGPU Space a GPU is attached only while a function decorated with `spaces.GPU` runs, so the manager runs
each model call (generate, the explorer's forward pass) through `GpuCalls.run`. When the `spaces` package is not
importable (everywhere else) `GpuCalls.run` just calls the job. torch.cuda figures read outside such a call say
nothing on ZeroGPU, so it records them at the end of each call for the memory panel.
"""

from __future__ import annotations

import importlib.util
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

MIB = 2**20


@dataclass
class GpuCallMemory:
    """torch.cuda memory at the end of one wrapped call (MiB), and when it was read."""

    allocated_mib: float
    peak_allocated_mib: float
    reserved_mib: float
    at: float  # time.time()
    zero_gpu: bool


class GpuCalls:
    """Runs model calls inside `spaces.GPU` when the spaces package is importable (a ZeroGPU Space), else directly,
    and keeps torch's CUDA figures from the end of the last call. The model manager holds the process's one."""

    def __init__(self):
        self._lock = threading.Lock()
        self._runner: Callable[[Callable[[], Any]], Any] | None = None
        self.zero_gpu = False  # True once the first call found the spaces package
        self.last_memory: GpuCallMemory | None = None  # None: no CUDA, or nothing ran yet

    @staticmethod
    def keeps_device_state(device: str) -> bool:
        """Whether tensors one call leaves on `device` are still usable in the next: not on ZeroGPU, where the GPU
        is attached only during a call (so the prompt cache is off there)."""
        return not (device.startswith("cuda") and importlib.util.find_spec("spaces") is not None)

    def run(self, job: Callable[[], Any]) -> Any:
        """Run `job()` (inside `spaces.GPU` on ZeroGPU); returns its result."""
        with self._lock:
            if self._runner is None:  # decorated once, on first use (ZeroGPU registers the function when decorated)
                self._runner = self._build_runner()
            runner = self._runner
        return runner(job)

    def _build_runner(self) -> Callable[[Callable[[], Any]], Any]:
        try:
            import spaces  # the Hugging Face Spaces package; present on Spaces only
        except ImportError:
            self.zero_gpu = False
            return self._call_and_record
        self.zero_gpu = True
        return spaces.GPU(self._call_and_record)

    def _call_and_record(self, job: Callable[[], Any]) -> Any:
        """Run the job; then, with CUDA, keep its memory figures (read inside the GPU call, where they mean
        something)."""
        import torch

        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        try:
            return job()
        finally:
            if cuda:
                self.last_memory = GpuCallMemory(
                    allocated_mib=torch.cuda.memory_allocated() / MIB,
                    peak_allocated_mib=torch.cuda.max_memory_allocated() / MIB,
                    reserved_mib=torch.cuda.memory_reserved() / MIB,
                    at=time.time(),
                    zero_gpu=self.zero_gpu,
                )
