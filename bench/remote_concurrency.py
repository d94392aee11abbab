"""Does the front let the remote engine batch? Many callers at once through a front vs straight to the engine.

    .venv/bin/python bench/remote_concurrency.py [--clients 16] [--tokens 32] [--token-ms 20]

The engine is the tests' vLLM-shaped fake (tests/fake_engine.py) on loopback: every request streams `--tokens`
tokens `--token-ms` apart, however many run at once, as a batching engine would (up to its capacity). `--clients`
streamed /v1/chat/completions requests start together, straight to the engine, then through fronts launched with
`--backend openai --remote-concurrency 1` and `--remote-concurrency <clients>`. Printed: wall time, aggregate
tokens/s and the most requests the engine saw at once. One run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fake_engine import FakeEngine  # noqa: E402  (the tests' fake engine, not a copy)
from remote_overhead import launch  # noqa: E402


def burst(url: str, clients: int, tokens: int) -> tuple[float, int]:
    """`clients` streamed chat requests at once; (wall seconds, tokens received)."""
    received = [0] * clients
    start = threading.Barrier(clients + 1)

    def one(index: int) -> None:
        body = {"model": "fake-model", "messages": [{"role": "user", "content": f"caller {index}"}],
                "max_tokens": tokens, "stream": True}
        start.wait()
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if line.startswith("data:") and line != "data: [DONE]":
                    for choice in json.loads(line[5:]).get("choices") or []:
                        received[index] += bool((choice.get("delta") or {}).get("content"))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    return time.perf_counter() - began, sum(received)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--token-ms", type=float, default=20.0)
    args = parser.parse_args()
    with FakeEngine() as engine:
        engine.tokens = [f" w{i}" for i in range(args.tokens)]
        engine.token_delay_s = args.token_ms / 1000
        rows = []
        engine.max_active = 0
        rows.append(("straight to the engine", *burst(engine.root, args.clients, args.tokens), engine.max_active))
        for concurrency in (1, args.clients):
            process, url = launch("--backend", "openai", "--base-url", engine.base_url,
                                  "--remote-concurrency", str(concurrency))
            try:
                burst(url, 2, 4)  # warm-up
                engine.max_active = 0
                rows.append((f"front, --remote-concurrency {concurrency}", *burst(url, args.clients, args.tokens),
                             engine.max_active))
            finally:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(timeout=20)
    print(f"{args.clients} clients x {args.tokens} tokens, {args.token_ms:g} ms per token on the engine")
    for name, wall, tokens, most in rows:
        print(f"{name:34s} {wall:6.2f} s  {tokens / wall:7.1f} tok/s  tokens {tokens}  at once on the engine {most}")
    direct, serial, batched = rows
    print(f"front (concurrency {args.clients}) / direct, aggregate tok/s: {batched[2] / batched[1] / (direct[2] / direct[1]):.3f}")
    print(f"front concurrency {args.clients} vs 1, aggregate tok/s:        {batched[2] / batched[1] / (serial[2] / serial[1]):.2f}x")


if __name__ == "__main__":
    main()
