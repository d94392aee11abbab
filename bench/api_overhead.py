"""What the HTTP API costs: tokens/s through /v1/chat/completions (SSE) vs the in-process manager stream.

    .venv/bin/python bench/api_overhead.py [--tokens 128] [--rounds 3] [--model DIR]

Launches the server (`python launch.py`) on a free loopback port and loads the same model in this process.
Both sides get the same prompt, greedy decoding and seed. Each figure is completion tokens / wall time from
sending the request to the last token. Rounds alternate between the sides, and the ratio is taken per round
(the two runs of a round are seconds apart), so load from other processes on a shared machine hits both
sides alike; the summary gives the median of those ratios, and the medians and bests of each side.
Target: API >= 0.93x in-process.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("PLAYGROUND_CACHE_DIR", str(REPO / ".cache"))

from playground.manager import ModelManager  # noqa: E402  (after the cache folder is set)

PROMPT = [{"role": "user", "content": "Write a long story about a dragon who learns to bake bread."}]
START_TIMEOUT_S = 240
REQUEST_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model: str | None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    args = [sys.executable, str(REPO / "launch.py"), "--host", "127.0.0.1", "--port", str(port)]
    if model:
        args += ["--model", model]
    process = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode}")
        try:
            state = httpx.get(f"{url}/healthz", timeout=5).json()["state"]
            if state == "ready":
                return process, url
            if state == "error":
                raise SystemExit("the server could not load the model")
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(process)
    raise SystemExit(f"the server was not ready after {START_TIMEOUT_S} s")


def stop_server(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def in_process(manager: ModelManager, tokens: int, seed: int) -> tuple[int, float, str]:
    """(new tokens, seconds, text) for one manager stream."""
    started = time.perf_counter()
    for event in manager.stream(messages=PROMPT, params={"temperature": 0, "max_new_tokens": tokens, "seed": seed}):
        if event.kind == "done":
            return event.stats.new_tokens, time.perf_counter() - started, event.text
    raise RuntimeError("no done event")


def through_api(client: httpx.Client, url: str, tokens: int, seed: int) -> tuple[int, float, str]:
    """(completion tokens, seconds, text) for one streamed chat completion."""
    body = {"messages": PROMPT, "temperature": 0, "max_tokens": tokens, "seed": seed, "stream": True,
            "stream_options": {"include_usage": True}}
    text, usage = [], None
    started = time.perf_counter()
    with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            text += [choice["delta"].get("content") or "" for choice in chunk["choices"]]
    return usage["completion_tokens"], time.perf_counter() - started, "".join(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per reply")
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds per side (after one warm-up)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=None, help="model folder; default the embedded SmolLM2")
    args = parser.parse_args()

    process, url = start_server(args.model)
    try:
        manager = ModelManager()
        manager.load(args.model)
        rates: dict[str, list[float]] = {"api": [], "in-process": []}
        with httpx.Client(timeout=REQUEST_TIMEOUT_S) as client:
            runs = {"in-process": lambda: in_process(manager, args.tokens, args.seed),
                    "api": lambda: through_api(client, url, args.tokens, args.seed)}
            texts = {side: run()[2] for side, run in runs.items()}  # warm-up, and the replies to compare
            for round_index in range(args.rounds):
                for side, run in runs.items():
                    count, seconds, _ = run()
                    rates[side].append(count / seconds)
                    print(f"round {round_index + 1}  {side:<10} {count} tokens in {seconds:.2f} s = "
                          f"{count / seconds:.1f} tok/s  (load average {os.getloadavg()[0]:.2f})", flush=True)
    finally:
        stop_server(process)

    local, api = rates["in-process"], rates["api"]
    ratios = [a / b for a, b in zip(api, local)]
    print(f"\nmodel {manager.status()['name']}, {args.tokens} new tokens, greedy, seed {args.seed}, "
          f"{args.rounds} rounds, load average {os.getloadavg()[0]:.2f}")
    print(f"same reply both ways: {texts['api'] == texts['in-process']}")
    print(f"in-process manager stream: median {statistics.median(local):.1f} tok/s, best {max(local):.1f}")
    print(f"SSE API (/v1/chat/completions): median {statistics.median(api):.1f} tok/s, best {max(api):.1f}")
    print(f"ratio API / in-process per round: {', '.join(f'{r:.3f}' for r in ratios)}")
    print(f"ratio API / in-process: median {statistics.median(ratios):.3f}, of bests {max(api) / max(local):.3f}"
          f"  (target >= 0.93)")


if __name__ == "__main__":
    main()
