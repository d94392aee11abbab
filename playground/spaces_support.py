"""Hugging Face Spaces support, kept apart from the rest: the ZeroGPU shim and its memory figures.

On a ZeroGPU Space a GPU is attached only while a function decorated with `spaces.GPU` runs, so the manager runs
each model call (generate, the explorer's forward pass) through `run_on_gpu`. When the `spaces` package is not
importable (everywhere else) `run_on_gpu` just calls the job. torch.cuda figures read outside such a call say
nothing on ZeroGPU, so the shim records them at the end of each call for the memory panel.
"""

from __future__ import annotations

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


_lock = threading.Lock()
_runner: Callable[[Callable[[], Any]], Any] | None = None
_zero_gpu = False
_last_memory: GpuCallMemory | None = None


def _call_and_record(job: Callable[[], Any]) -> Any:
    """Run the job; then, with CUDA, keep its memory figures (read inside the GPU call, where they mean something)."""
    import torch

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        return job()
    finally:
        if cuda:
            global _last_memory
            _last_memory = GpuCallMemory(
                allocated_mib=torch.cuda.memory_allocated() / MIB,
                peak_allocated_mib=torch.cuda.max_memory_allocated() / MIB,
                reserved_mib=torch.cuda.memory_reserved() / MIB,
                at=time.time(),
                zero_gpu=_zero_gpu,
            )


def _build_runner() -> Callable[[Callable[[], Any]], Any]:
    global _zero_gpu
    try:
        import spaces  # the Hugging Face Spaces package; present on Spaces only
    except ImportError:
        _zero_gpu = False
        return _call_and_record
    _zero_gpu = True
    return spaces.GPU(_call_and_record)


def run_on_gpu(job: Callable[[], Any]) -> Any:
    """Run `job()` inside `spaces.GPU` when the spaces package is importable, else directly; returns its result."""
    global _runner
    with _lock:
        if _runner is None:  # decorated once, on first use (ZeroGPU registers the function when decorated)
            _runner = _build_runner()
        runner = _runner
    return runner(job)


def zero_gpu_active() -> bool:
    """True once `run_on_gpu` has found the spaces package (it looks on its first call)."""
    return _zero_gpu


def last_call_memory() -> GpuCallMemory | None:
    """Memory figures from the end of the last wrapped call, or None (no CUDA, or nothing ran yet)."""
    return _last_memory


def reset() -> None:
    """Forget the runner and figures, so the next call looks for `spaces` again (tests inject a fake module)."""
    global _runner, _zero_gpu, _last_memory
    with _lock:
        _runner, _zero_gpu, _last_memory = None, False, None
