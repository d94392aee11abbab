"""The test harness: the real app on a free loopback port, launched the way users start it (`python launch.py ...`,
`LaunchedServer`) or, for the option matrix, built by the same entry code and served from this process (`ServedApp`).

A module of its own, not conftest.py, so test files import it by a name no other conftest.py shadows.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def count_tokens(manager, text: str) -> int:
    """The loaded local model's token count for `text`, as a prompt (no special tokens added)."""
    return len(manager.require_local("counting tokens").tokenizer(text, add_special_tokens=False)["input_ids"])


def cached_when_repeated(status: dict, prompt_tokens: int) -> int:
    """How many tokens of a prompt sent again come from the prompt cache, by a manager's or server's status: all
    but the last, in the loaded model's resume steps."""
    from playground.generation.prompt_cache import longest_resume

    return longest_resume(prompt_tokens, status["prompt_cache"]["resume_step"])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerChecks:
    """What a test asks of a running server: its status, waiting for a state."""

    url: str
    headers: dict[str, str]

    def status(self) -> dict:
        return httpx.get(f"{self.url}/healthz", timeout=5, headers=self.headers).json()

    def wait_until(self, states=("ready",), timeout: float = 240) -> dict:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                last = self.status()
                if last["state"] in states:
                    return last
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not in {states} after {timeout} s (last status {last}):\n{self.log()}")

    def check_alive(self) -> None:
        """Raises when the server has ended."""

    def log(self) -> str:
        return ""


class ServedApp(ServerChecks):
    """The app `launch.py` builds for these options (`create_app`, the background load), served by uvicorn on a
    loopback port from a thread of this process: what a subprocess gives, without its 8 s of imports. `manager`
    shares an already loaded model manager instead of building and loading one. Options only (no environment)."""

    def __init__(self, *args: str, manager=None):
        import uvicorn

        from playground.config import parse_args
        from playground.server import create_app, load_in_background

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        settings = parse_args(["--host", "127.0.0.1", "--port", str(self.port), *args])
        self.headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
        self.app = create_app(settings, manager)
        self.manager = self.app.state.manager
        self._owns_manager = manager is None
        if self._owns_manager:
            load_in_background(settings, self.manager)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                timeout_graceful_shutdown=1)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, name=f"served-app-{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the app did not start serving on port {self.port}")
            time.sleep(0.05)

    def check_alive(self) -> None:
        if not self._thread.is_alive():
            raise RuntimeError(f"the app on port {self.port} stopped serving")

    def stop(self) -> None:
        self.app.state.shutdown.set()  # open pages' event streams end now, as the command's server ends them
        self.server.should_exit = True
        self._thread.join(timeout=15)
        if self._owns_manager:
            self.manager.close()


class LaunchedServer(ServerChecks):
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

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()[-5000:]

    def stop(self) -> None:
        stop_process_group(self.process, grace_s=15)
        self._log.close()

    def interrupt(self, timeout: float = 30) -> int:
        """Ctrl+C, as a person stops it in a terminal: its exit code once it has stopped."""
        self.process.send_signal(signal.SIGINT)
        return self.process.wait(timeout=timeout)


def stop_process_group(process: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM a server started in its own session (and its children), SIGKILL after `grace_s` seconds."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def chat_call(text: str | None, system_prompt: str = "", **settings) -> dict:
    """Keyword arguments for the UI's `/chat` endpoint (`text=None`: `/chat_regenerate`, which takes no message):
    every field by its name, greedy and seeded unless given, so a field the UI adds later shifts nothing; the rest
    are the controls' defaults."""
    named = {"system_prompt": system_prompt, "temperature": 0.0, "seed": 1, **settings}
    return named if text is None else {"text": text, **named}


def shown_text(message: dict) -> str:
    """The text of one Chatbot message as the API returns it (a string, or a list of parts)."""
    content = message["content"]
    return "".join(part.get("text", "") for part in content) if isinstance(content, list) else (content or "")


def _is_stats_line(message: dict) -> bool:
    return bool((message.get("metadata") or {}).get("title"))


def chat_reply(chat: list[dict]) -> str:
    """The last reply's text in a Chatbot value the UI's API returns (its stats line is a titled message of its own
    after it, never part of the text)."""
    replies = [m for m in chat_turn_messages(chat) if m["role"] == "assistant"]
    return shown_text(replies[-1]) if replies else ""


def chat_turn_messages(chat: list[dict]) -> list[dict]:
    """A Chatbot value's turns, each reply's stats line left out."""
    return [m for m in chat if not _is_stats_line(m)]


def chat_turns(chat: list[dict]) -> list[str]:
    """The roles of a Chatbot value's turns."""
    return [m["role"] for m in chat_turn_messages(chat)]


def chat_reply_stats(chat: list[dict]) -> str:
    """The stats line shown under the last reply ("" when it has none)."""
    return chat[-1]["metadata"]["title"] if chat and _is_stats_line(chat[-1]) else ""


def wait_for(condition, timeout: float, what: str, every: float = 0.1):
    """Poll `condition()` until it returns something truthy (returned) or `timeout` seconds pass (AssertionError
    naming `what`): a test waits on state, never on a fixed sleep, and never for ever."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"after {timeout} s still waiting for {what}")
        time.sleep(every)
