"""The test harness: launch the real app the way users start it (`python launch.py ...`) on a free loopback port.

A module of its own, not conftest.py, so test files import it by a name no other conftest.py shadows.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def count_tokens(manager, text: str) -> int:
    """The loaded local model's token count for `text`, as a prompt (no special tokens added)."""
    return len(manager.require_local("counting tokens").tokenizer(text, add_special_tokens=False)["input_ids"])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LaunchedServer:
    """`python launch.py ...` in a subprocess, as a user starts it."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, log_dir: Path | None = None,
                 host: str | None = "127.0.0.1"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # host=None leaves --host out, to see where the server binds by default.
        self.args = [*(["--host", host] if host else []), "--port", str(self.port), *args]
        # With --api-key even /healthz needs the key; the harness sends it.
        key = args[args.index("--api-key") + 1] if "--api-key" in args else (env or {}).get("PLAYGROUND_API_KEY")
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.log_path = (log_dir or Path("/tmp")) / f"server-{self.port}.log"
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [sys.executable, str(REPO / "launch.py"), *self.args],
            cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            start_new_session=True,
        )

    def status(self) -> dict:
        return httpx.get(f"{self.url}/healthz", timeout=5, headers=self.headers).json()

    def wait_until(self, states=("ready",), timeout: float = 240) -> dict:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                last = self.status()
                if last["state"] in states:
                    return last
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server not in {states} after {timeout} s (last status {last}):\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()[-5000:]

    def stop(self) -> None:
        stop_process_group(self.process, grace_s=15)
        self._log.close()


def stop_process_group(process: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM a server started in its own session (and its children), SIGKILL after `grace_s` seconds."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
