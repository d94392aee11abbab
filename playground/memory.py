"""Device memory readings for the Memory tab.

With NVML (nvidia-ml-py) it reads each GPU's used/total memory, utilisation, temperature and this process's
share, plus torch's own allocator figures. Without NVML (no driver, no GPU) it says why and reads the
process's resident memory and the system's memory instead. A background thread samples into a ring buffer
so the UI only reads; sampling never touches the model or the generation lock.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import psutil

MIB = 1024 * 1024


@dataclass
class GpuReading:
    index: int
    name: str
    used_mib: float
    total_mib: float
    utilisation_pct: float | None
    temperature_c: float | None
    process_used_mib: float | None
    torch_allocated_mib: float | None = None
    torch_reserved_mib: float | None = None


@dataclass
class MemorySample:
    time: float
    process_rss_mib: float
    system_used_mib: float
    system_total_mib: float
    gpus: list[GpuReading] = field(default_factory=list)
    remote: dict[str, float] | None = None  # a remote engine's Prometheus metrics, when it serves some

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class NvmlUnavailable(RuntimeError):
    pass


class NvmlReader:
    """The NVML boundary: the only place that calls pynvml (tests replace this object, nothing else)."""

    def __init__(self):
        try:
            import pynvml  # provided by nvidia-ml-py
        except ImportError as exc:  # pragma: no cover - nvidia-ml-py is a requirement
            raise NvmlUnavailable("nvidia-ml-py is not installed") from exc
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            raise NvmlUnavailable(f"NVML could not start ({exc}); no NVIDIA driver or GPU is visible") from exc
        self.nvml = pynvml

    def device_count(self) -> int:
        return self.nvml.nvmlDeviceGetCount()

    def read(self, index: int, pid: int) -> dict[str, Any]:
        nvml = self.nvml
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        reading: dict[str, Any] = {
            "name": _text(nvml.nvmlDeviceGetName(handle)),
            "used": memory.used,
            "total": memory.total,
            "utilisation": None,
            "temperature": None,
            "process_used": None,
        }
        try:
            reading["utilisation"] = nvml.nvmlDeviceGetUtilizationRates(handle).gpu
        except nvml.NVMLError:
            pass
        try:
            reading["temperature"] = nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)
        except nvml.NVMLError:
            pass
        try:
            processes = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
            mine = [p.usedGpuMemory for p in processes if p.pid == pid and p.usedGpuMemory is not None]
            reading["process_used"] = sum(mine) if mine else 0
        except nvml.NVMLError:
            pass
        return reading


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def torch_allocator(index: int) -> tuple[float | None, float | None]:
    """torch's allocated/reserved MiB on a CUDA device, or (None, None) without CUDA."""
    try:
        import torch

        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            return None, None
        return torch.cuda.memory_allocated(index) / MIB, torch.cuda.memory_reserved(index) / MIB
    except Exception:  # a broken CUDA setup must not break the panel
        return None, None


class MemorySampler:
    """Samples memory every `interval` seconds into a ring buffer of the last `window` seconds."""

    def __init__(self, interval: float = 1.0, window: float = 300.0, nvml_factory=NvmlReader,
                 remote_source: Callable[[], dict[str, float] | None] | None = None):
        self.interval = interval
        self.remote_source = remote_source
        self.window = window
        self.pid = os.getpid()
        self._process = psutil.Process(self.pid)
        self._lock = threading.Lock()
        self._samples: deque[MemorySample] = deque()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.paused = False
        try:
            self._nvml = nvml_factory()
            self.nvml_error: str | None = None
        except NvmlUnavailable as exc:
            self._nvml = None
            self.nvml_error = str(exc)

    @property
    def has_nvml(self) -> bool:
        return self._nvml is not None

    def describe_source(self) -> str:
        if self.has_nvml:
            return "GPU memory from NVML, allocator figures from torch."
        return (
            f"No GPU readings: {self.nvml_error}. "
            "Showing this process's resident memory (RSS) and the system's memory instead."
        )

    def sample(self) -> MemorySample:
        """One reading now."""
        system = psutil.virtual_memory()
        reading = MemorySample(
            time=time.time(),
            process_rss_mib=self._process.memory_info().rss / MIB,
            system_used_mib=(system.total - system.available) / MIB,
            system_total_mib=system.total / MIB,
        )
        if self._nvml is not None:
            for index in range(self._nvml.device_count()):
                raw = self._nvml.read(index, self.pid)
                allocated, reserved = torch_allocator(index)
                reading.gpus.append(
                    GpuReading(
                        index=index,
                        name=raw["name"],
                        used_mib=raw["used"] / MIB,
                        total_mib=raw["total"] / MIB,
                        utilisation_pct=raw["utilisation"],
                        temperature_c=raw["temperature"],
                        process_used_mib=None if raw["process_used"] is None else raw["process_used"] / MIB,
                        torch_allocated_mib=allocated,
                        torch_reserved_mib=reserved,
                    )
                )
        if self.remote_source is not None:
            try:
                reading.remote = self.remote_source()
            except Exception:  # an engine that cannot be read leaves this sample without its figures
                reading.remote = None
        return reading

    def record(self) -> MemorySample:
        reading = self.sample()
        with self._lock:
            self._samples.append(reading)
            cutoff = reading.time - self.window
            while self._samples and self._samples[0].time < cutoff:
                self._samples.popleft()
        return reading

    def history(self) -> list[MemorySample]:
        with self._lock:
            return list(self._samples)

    def latest(self) -> MemorySample | None:
        with self._lock:
            return self._samples[-1] if self._samples else None

    def set_interval(self, seconds: float) -> None:
        self.interval = max(0.1, float(seconds))
        self._wake.set()

    def start(self) -> None:
        if self._thread and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.paused:
                try:
                    self.record()
                except Exception:  # one bad reading must not end the sampler
                    pass
            self._wake.wait(self.interval)
            self._wake.clear()

    def frame(self):
        """The history as a long pandas DataFrame: seconds_ago, series, MiB (for gr.LinePlot)."""
        import pandas as pd

        samples = self.history()
        rows = []
        now = time.time()
        for s in samples:
            ago = round(s.time - now, 1)
            if s.gpus:
                for g in s.gpus:
                    rows.append({"seconds": ago, "series": f"GPU{g.index} used", "MiB": g.used_mib})
                    if g.torch_reserved_mib is not None:
                        rows.append({"seconds": ago, "series": f"GPU{g.index} torch reserved", "MiB": g.torch_reserved_mib})
                        rows.append({"seconds": ago, "series": f"GPU{g.index} torch allocated", "MiB": g.torch_allocated_mib})
            else:
                rows.append({"seconds": ago, "series": "process RSS", "MiB": s.process_rss_mib})
                rows.append({"seconds": ago, "series": "system used", "MiB": s.system_used_mib})
        return pd.DataFrame(rows, columns=["seconds", "series", "MiB"])

    def remote_frame(self):
        """The remote engine's figures over time as a long DataFrame: seconds, series, value, unit.

        Token rates come from the counters' growth between samples.
        """
        import pandas as pd

        samples = [s for s in self.history() if s.remote]
        rows = []
        now = time.time()
        previous: MemorySample | None = None
        for s in samples:
            ago = round(s.time - now, 1)
            metrics = s.remote
            for words, value, unit in remote_gauges(metrics):
                rows.append({"seconds": ago, "series": words, "value": value, "unit": unit})
            if previous is not None and s.time > previous.time:
                for name, words in REMOTE_RATES:
                    if name in metrics and name in previous.remote and metrics[name] >= previous.remote[name]:
                        rate = (metrics[name] - previous.remote[name]) / (s.time - previous.time)
                        rows.append({"seconds": ago, "series": words, "value": rate, "unit": "tokens/s"})
            previous = s
        return pd.DataFrame(rows, columns=["seconds", "series", "value", "unit"])


# vLLM's gauges: (names, in the order tried, since older releases say gpu_cache and newer kv_cache), words, unit,
# scale. The counters below become rates.
REMOTE_GAUGES = [
    (("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"), "KV cache used", "%", 100.0),
    (("vllm:num_requests_running",), "requests running", "requests", 1.0),
    (("vllm:num_requests_waiting",), "requests waiting", "requests", 1.0),
]
REMOTE_RATES = [("vllm:generation_tokens_total", "generated tokens/s"), ("vllm:prompt_tokens_total", "prompt tokens/s")]


def remote_gauges(metrics: dict[str, float]) -> list[tuple[str, float, str]]:
    """(words, value, unit) for each vLLM gauge the engine's metrics have (KV cache use in percent)."""
    found = []
    for names, words, unit, scale in REMOTE_GAUGES:
        name = next((name for name in names if name in metrics), None)
        if name is not None:
            found.append((words, metrics[name] * scale, unit))
    return found
