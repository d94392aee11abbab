"""The memory sampler: NVML missing is the real case here; only the NVML boundary is faked for the GPU case."""

from __future__ import annotations

import os
import time
from types import SimpleNamespace

import psutil
import pytest

from harness import wait_for

from playground.memory import MIB, MemorySampler, NvmlReader, NvmlUnavailable


def test_without_nvml_it_says_so_and_reads_process_and_system():
    sampler = MemorySampler()  # the real NvmlReader: this machine has no NVIDIA driver
    assert not sampler.has_nvml
    assert "No GPU readings" in sampler.describe_source() and "RSS" in sampler.describe_source()
    reading = sampler.sample()
    rss = psutil.Process(os.getpid()).memory_info().rss / MIB
    assert abs(reading.process_rss_mib - rss) < 0.25 * rss
    assert 0 < reading.system_used_mib < reading.system_total_mib
    assert reading.gpus == []


def test_history_is_a_bounded_window_and_a_plot_frame():
    sampler = MemorySampler(window=0.3)
    for _ in range(3):
        sampler.record()
    assert len(sampler.history()) == 3
    time.sleep(0.35)
    sampler.record()
    assert len(sampler.history()) == 1  # older readings fell out of the window
    frame = sampler.frame()
    assert set(frame["series"]) == {"process RSS", "system used"}
    assert list(frame.columns) == ["seconds", "series", "MiB"]


def test_background_thread_samples_pauses_and_changes_interval():
    sampler = MemorySampler(interval=0.05)
    sampler.start()
    try:
        wait_for(lambda: len(sampler.history()) >= 4, 10, "four samples at a 0.05 s interval", every=0.02)
        sampler.paused = True
        time.sleep(0.1)
        paused_at = len(sampler.history())
        time.sleep(0.3)
        assert len(sampler.history()) == paused_at
        sampler.paused = False
        sampler.set_interval(0.2)
        assert sampler.interval == 0.2
    finally:
        sampler.stop()


class FakeNvml:
    """Stands in for NvmlReader: two GPUs, this process using 1 GiB on the second."""

    def device_count(self):
        return 2

    def read(self, index, pid):
        return {
            "name": f"Fake GPU {index}", "used": (10 + index) * 1024 * MIB, "total": 80 * 1024 * MIB,
            "utilisation": 50 + index, "temperature": 40 + index, "process_used": index * 1024 * MIB,
        }


def test_with_nvml_readings_per_device():
    sampler = MemorySampler(nvml_factory=FakeNvml)
    assert sampler.has_nvml and "NVML" in sampler.describe_source()
    reading = sampler.record()
    assert [g.name for g in reading.gpus] == ["Fake GPU 0", "Fake GPU 1"]
    second = reading.gpus[1]
    assert second.used_mib == 11 * 1024 and second.total_mib == 80 * 1024
    assert second.utilisation_pct == 51 and second.temperature_c == 41 and second.process_used_mib == 1024
    assert second.torch_allocated_mib is None  # no CUDA in this process
    assert set(sampler.frame()["series"]) == {"GPU0 used", "GPU1 used"}


def test_nvml_reader_maps_pynvml(monkeypatch):
    """The reader's own mapping from pynvml structures, with the pynvml module replaced."""
    import pynvml

    handle = object()
    fake = SimpleNamespace(
        NVMLError=pynvml.NVMLError,
        NVML_TEMPERATURE_GPU=0,
        nvmlInit=lambda: None,
        nvmlDeviceGetCount=lambda: 1,
        nvmlDeviceGetHandleByIndex=lambda i: handle,
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(used=3 * MIB, total=8 * MIB),
        nvmlDeviceGetName=lambda h: b"H200",
        nvmlDeviceGetUtilizationRates=lambda h: SimpleNamespace(gpu=77),
        nvmlDeviceGetTemperature=lambda h, kind: 61,
        nvmlDeviceGetComputeRunningProcesses=lambda h: [
            SimpleNamespace(pid=os.getpid(), usedGpuMemory=2 * MIB), SimpleNamespace(pid=1, usedGpuMemory=MIB)
        ],
    )
    monkeypatch.setitem(__import__("sys").modules, "pynvml", fake)
    reader = NvmlReader()
    assert reader.device_count() == 1
    raw = reader.read(0, os.getpid())
    assert raw == {"name": "H200", "used": 3 * MIB, "total": 8 * MIB, "utilisation": 77, "temperature": 61,
                   "process_used": 2 * MIB}


def test_the_real_nvml_reader_works_exactly_where_an_nvidia_driver_is():
    import ctypes.util

    driver = ctypes.util.find_library("nvidia-ml") is not None or os.path.exists("/proc/driver/nvidia/version")
    if driver:
        assert NvmlReader().device_count() >= 1
    else:  # this project's machines: the panel falls back, saying why
        with pytest.raises(NvmlUnavailable, match="NVML"):
            NvmlReader()
