"""N chat requests at once through the playground: on its native local backend, and in front of vLLM (Yuan plugin).

    .venv/bin/python bench/vllm_concurrency.py [--clients 1 4 16] [--tokens 32] [--dtype float32]

Both sides serve the same tiny random Yuan2 checkpoint in the release layout (make_tiny), on this machine's CPU:
`launch.py --model FOLDER` (one generation at a time, the local backend's FIFO), and `launch.py --backend openai`
in front of vLLM's OpenAI server from `.cache/vllm-venv` (`make vllm-venv`), which batches what arrives together.
For each N, N streamed /v1/chat/completions requests with different prompts start together; printed per backend:
wall time, total completion tokens/s, and the time to first token (mean and worst). One run, same machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from harness import LaunchedServer  # noqa: E402  (the tests' launcher: the app as users start it)
from vllm_engine import VllmServer  # noqa: E402
from playground.models.yuan.make_tiny import make_tiny_checkpoint  # noqa: E402

QUESTIONS = ["Tell me about rivers.", "你好，请介绍一下你自己。", "Write a short poem.", "What is 2 + 2?",
             "Name three colours.", "Explain tides.", "Give me a recipe.", "Why is the sky blue?"]


def burst(url: str, clients: int, tokens: int) -> dict:
    """`clients` streamed chat requests at once: wall seconds, completion tokens, first-token delays."""
    first_token = [float("nan")] * clients
    completion = [0] * clients
    failures: list[BaseException] = []
    gate = threading.Barrier(clients + 1)
    began = 0.0
    model = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]

    def one(index: int) -> None:
        try:
            ask(index)
        except BaseException as exc:  # reported after the burst
            failures.append(exc)

    def ask(index: int) -> None:
        question = f"{QUESTIONS[index % len(QUESTIONS)]} ({index})"
        body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": tokens,
                "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        gate.wait()
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as response:
            if response.status_code != 200:
                raise RuntimeError(f"{url}: {response.status_code} {response.read()[:300]!r}")
            for line in response.iter_lines():
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                if chunk.get("usage"):
                    completion[index] = chunk["usage"]["completion_tokens"]
                if first_token[index] != first_token[index] and any(
                        (choice.get("delta") or {}).get("content") for choice in chunk.get("choices") or []):
                    first_token[index] = time.perf_counter() - began

    threads = [threading.Thread(target=one, args=(index,)) for index in range(clients)]
    for thread in threads:
        thread.start()
    began = time.perf_counter()
    gate.wait()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    if failures:
        raise failures[0]
    return {"wall": wall, "tokens": sum(completion), "ttft": first_token}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--tokens", type=int, default=32, help="max_tokens of each request")
    parser.add_argument("--dtype", default="float32", help="vLLM's --dtype (the local backend runs a float "
                                                           "checkpoint in float32 on CPU)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="vllm-bench-") as root:
        root = Path(root)
        folder = make_tiny_checkpoint(root / "tiny-yuan")
        engine = VllmServer(folder, "--dtype", args.dtype, "--max-model-len", "1024", log_dir=root)
        local = LaunchedServer("--model", str(folder), "--data-dir", "", log_dir=root)
        front = None
        try:
            engine.wait_ready()
            local.wait_until(("ready",), timeout=300)
            front = LaunchedServer("--backend", "openai", "--base-url", engine.base_url,
                                   "--remote-concurrency", str(max(args.clients)), "--data-dir", "", log_dir=root)
            front.wait_until(("ready",), timeout=120)
            rows = []
            for name, server in (("native local backend", local), ("in front of vLLM", front)):
                burst(server.url, 1, 4)  # warm-up
                for clients in args.clients:
                    result = burst(server.url, clients, args.tokens)
                    ttft = [t for t in result["ttft"] if t == t]
                    rows.append((name, clients, result["wall"], result["tokens"] / result["wall"],
                                 statistics.mean(ttft) if ttft else float("nan"), max(ttft, default=float("nan"))))
        finally:
            for server in (front, local):
                if server is not None:
                    server.stop()
            engine.stop()

    print(f"tiny Yuan2 ({folder.name}), {args.tokens} tokens per request, CPU, one run")
    print(f"{'backend':<22} {'N':>3} {'wall s':>8} {'tok/s':>8} {'TTFT mean s':>12} {'TTFT max s':>11}")
    for name, clients, wall, rate, mean_ttft, max_ttft in rows:
        print(f"{name:<22} {clients:>3} {wall:>8.2f} {rate:>8.1f} {mean_ttft:>12.2f} {max_ttft:>11.2f}")
    by_key = {(name, clients): rate for name, clients, _, rate, _, _ in rows}
    for clients in args.clients:
        ratio = by_key[("in front of vLLM", clients)] / by_key[("native local backend", clients)]
        print(f"N={clients}: vLLM / native total tokens/s = {ratio:.2f}x")


if __name__ == "__main__":
    main()
