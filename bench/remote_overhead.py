"""What the remote backend costs: tokens/s through a front playground vs straight from the remote's API.

    .venv/bin/python bench/remote_overhead.py [--tokens 128]

Launches two playgrounds on free loopback ports: a remote serving the embedded model, and a front with
`--backend openai --base-url <remote>/v1`. Each side gets one streamed /v1/chat/completions request with the same
prompt, greedy decoding and seed (after one short warm-up each); the figure is completion tokens / wall time from
sending the request to the last token. One run, so a busy machine moves it. Target: front >= 0.95x direct.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
PROMPT = [{"role": "user", "content": "Write a long story about a dragon who learns to bake bread."}]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(*args: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PLAYGROUND_CACHE_DIR": os.environ.get("PLAYGROUND_CACHE_DIR", str(REPO / ".cache"))}
    process = subprocess.Popen([sys.executable, str(REPO / "launch.py"), "--host", "127.0.0.1", "--port", str(port),
                                "--data-dir", "", *args], cwd=REPO, env=env, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/healthz", timeout=2).json().get("state") == "ready":
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    os.killpg(process.pid, signal.SIGTERM)
    raise SystemExit(f"{args or 'remote'}: not ready after 240 s")


def tokens_per_s(url: str, tokens: int) -> tuple[float, int]:
    body = {"messages": PROMPT, "max_tokens": tokens, "temperature": 0, "seed": 1, "stream": True,
            "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    completion = 0
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=300) as response:
        for line in response.iter_lines():
            if line.startswith("data:") and line != "data: [DONE]":
                usage = json.loads(line[5:]).get("usage")
                if usage:
                    completion = usage["completion_tokens"]
    return completion / (time.perf_counter() - started), completion


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    remote, remote_url = launch()
    front = None
    try:
        front, front_url = launch("--backend", "openai", "--base-url", remote_url + "/v1")
        for url in (remote_url, front_url):
            tokens_per_s(url, 8)  # warm-up
        direct, direct_n = tokens_per_s(remote_url, args.tokens)
        through, through_n = tokens_per_s(front_url, args.tokens)
        print(f"direct from the remote: {direct:.1f} tok/s ({direct_n} tokens)")
        print(f"through the front:      {through:.1f} tok/s ({through_n} tokens)")
        print(f"ratio front/direct:     {through / direct:.3f} (target >= 0.95)")
    finally:
        for process in (front, remote):
            if process is not None and process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(timeout=20)


if __name__ == "__main__":
    main()
