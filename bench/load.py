"""Load test: 32 concurrent API clients and 4 UI chat sessions on the embedded model, for --seconds (default 60).

Starts its own server on a free loopback port (or uses --url), then:
  1. computes each client's expected reply beforehand: one greedy request per distinct prompt, alone;
  2. runs every client in a loop for --seconds, each request checked against its own prompt's expected reply
     (a lost reply, an error or another client's text counts against it);
  3. checks first come, first served: three times during the load it submits 8 requests one after another,
     each once the previous has joined the queue; they must start in that order;
  4. samples the server process's resident memory after the warm-up and at the end.
Prints the figures and exits non-zero when any check fails. Everything is bounded: per-request timeouts and an
overall deadline of --seconds plus 3 minutes.

    .venv/bin/python bench/load.py [--seconds 60] [--api-clients 32] [--ui-sessions 4]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
from gradio_client import Client

REPO = Path(__file__).resolve().parents[1]
MAX_TOKENS = 8
PROBE_BASE = 200  # prompt numbers of the order probe's requests
PROBE_SIZE = 8
REQUEST_TIMEOUT_S = 180
UI_CONTROLS = dict(temperature=0.0, top_p=0.9, top_k=50, min_p=0.0, typical_p=1.0, repetition_penalty=1.0,
                   no_repeat_ngram_size=0, max_new_tokens=MAX_TOKENS, seed=1, stop="")


def prompt_for(client: int) -> str:
    return f"Repeat the number {1000 + 37 * client} and nothing else."


@dataclass
class Tally:
    done: int = 0
    errors: list[str] = field(default_factory=list)
    mixed_up: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    # (submitted, first content chunk) per streamed API request, for the order check
    starts: list[tuple[float, float]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


# ------------------------------------------------------------------------------------------------ server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server() -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("PLAYGROUND_CACHE_DIR", str(REPO / ".cache"))
    env.setdefault("PLAYGROUND_DATA_DIR", f"/tmp/playground-load-{port}")  # not the user's saved chats
    process = subprocess.Popen([sys.executable, str(REPO / "launch.py"), "--host", "127.0.0.1", "--port", str(port)],
                               cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    return process, f"http://127.0.0.1:{port}"


def wait_ready(url: str, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status = httpx.get(f"{url}/healthz", timeout=5).json()
            if status.get("state") == "ready":
                return status
            if status.get("state") == "error":
                raise SystemExit(f"the model failed to load: {status['last_error']}")
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"server at {url} not ready after {timeout} s")


def server_pid(url: str, process: subprocess.Popen | None) -> int | None:
    if process is not None:
        return process.pid
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    for connection in psutil.net_connections(kind="inet"):
        if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port:
            return connection.pid
    return None


# ---------------------------------------------------------------------------------------------- API side


def api_body(prompt: str) -> dict:
    return {"messages": [{"role": "user", "content": prompt}], "max_tokens": MAX_TOKENS, "temperature": 0,
            "seed": 1, "stream": True}


async def streamed_reply(http: httpx.AsyncClient, url: str, prompt: str) -> tuple[str, float | None]:
    """The reply's text and when its first content arrived (perf_counter)."""
    text, first = [], None
    async with http.stream("POST", f"{url}/v1/chat/completions", json=api_body(prompt)) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            for choice in chunk["choices"]:
                content = choice["delta"].get("content")
                if content:
                    first = first or time.perf_counter()
                    text.append(content)
    return "".join(text), first


async def api_client(index: int, url: str, expected: str, stop_at: float, tally: Tally) -> None:
    prompt = prompt_for(index)
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S) as http:
        while time.perf_counter() < stop_at:
            submitted = time.perf_counter()
            try:
                reply, first = await streamed_reply(http, url, prompt)
            except Exception as exc:  # noqa: BLE001  (counted, not fatal)
                with tally.lock:
                    tally.errors.append(f"api {index}: {type(exc).__name__}: {exc}")
                continue
            with tally.lock:
                tally.done += 1
                tally.latencies.append(time.perf_counter() - submitted)
                if first is not None:
                    tally.starts.append((submitted, first))
                if reply != expected:
                    tally.mixed_up.append(f"api {index}: expected {expected!r}, got {reply!r}")


async def order_probe(url: str, expected: list[str], start_after: float, tally: Tally, report: list) -> None:
    """Submit len(expected) requests one after another, each only once the previous one has joined the queue
    (its response has begun), while the load keeps the queue full; they must start in that order."""
    await asyncio.sleep(start_after)
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S) as http, contextlib.AsyncExitStack() as stack:
        streams = []
        for k in range(len(expected)):
            response = await stack.enter_async_context(
                http.stream("POST", f"{url}/v1/chat/completions", json=api_body(prompt_for(PROBE_BASE + k))))
            lines = response.aiter_lines()
            while not (await anext(lines)).strip():  # the first line: the request is in the manager's queue
                pass
            streams.append(lines)

        async def read(k: int, lines) -> tuple[float, str]:
            text, first = [], None
            async for line in lines:
                if line.startswith("data: ") and line != "data: [DONE]":
                    for choice in json.loads(line.removeprefix("data: ")).get("choices", []):
                        if choice.get("delta", {}).get("content"):
                            first = first or time.perf_counter()
                            text.append(choice["delta"]["content"])
            return first or float("inf"), "".join(text)

        results = await asyncio.gather(*(read(k, lines) for k, lines in enumerate(streams)))
    started_order = sorted(range(len(results)), key=lambda k: results[k][0])
    report.append(started_order)
    with tally.lock:
        for k, (_, text) in enumerate(results):
            tally.done += 1
            if text != expected[k]:
                tally.mixed_up.append(f"probe {k}: expected {expected[k]!r}, got {text!r}")


# ----------------------------------------------------------------------------------------------- UI side


def ui_reply(client: Client, prompt: str) -> str:
    client.predict(api_name="/chat_clear")  # each request a fresh chat, so its expected reply stays fixed
    chat, status, _ = client.predict(prompt, "", *UI_CONTROLS.values(), api_name="/chat")
    if not status.startswith("Done:"):
        raise RuntimeError(f"chat status {status!r}")
    content = chat[-1]["content"]
    text = "".join(part.get("text", "") for part in content) if isinstance(content, list) else content
    return text.split("\n\n<sub>")[0]  # the reply without its stats line


def ui_session(index: int, client: Client, expected: str, stop_at: float, tally: Tally) -> None:
    prompt = prompt_for(100 + index)
    while time.perf_counter() < stop_at:
        submitted = time.perf_counter()
        try:
            reply = ui_reply(client, prompt)
        except Exception as exc:  # noqa: BLE001
            with tally.lock:
                tally.errors.append(f"ui {index}: {type(exc).__name__}: {exc}")
            continue
        with tally.lock:
            tally.done += 1
            tally.latencies.append(time.perf_counter() - submitted)
            if reply != expected:
                tally.mixed_up.append(f"ui {index}: expected {expected!r}, got {reply!r}")


# ------------------------------------------------------------------------------------------------- checks


def order_inversions(starts: list[tuple[float, float]], gap_s: float) -> tuple[int, int]:
    """(pairs checked, pairs served out of order) among requests submitted at least gap_s apart."""
    ordered = sorted(starts)
    checked = inverted = 0
    for i, (submitted_a, started_a) in enumerate(ordered):
        for submitted_b, started_b in ordered[i + 1:]:
            if submitted_b - submitted_a < gap_s:
                continue
            checked += 1
            inverted += started_b < started_a
    return checked, inverted


def rss_mib(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


async def run_load(url: str, pid: int, args) -> bool:
    began = time.perf_counter()
    print(f"server {url} (pid {pid}); {args.api_clients} API clients + {args.ui_sessions} UI sessions, "
          f"{args.seconds:.0f} s, {MAX_TOKENS} greedy tokens per reply", flush=True)

    # 1. expected replies, each computed alone
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S) as http:
        api_expected = [(await streamed_reply(http, url, prompt_for(i)))[0] for i in range(args.api_clients)]
        probe_expected = [(await streamed_reply(http, url, prompt_for(PROBE_BASE + k)))[0] for k in range(PROBE_SIZE)]
    ui_clients = [Client(url, verbose=False) for _ in range(args.ui_sessions)]
    ui_expected = [ui_reply(client, prompt_for(100 + i)) for i, client in enumerate(ui_clients)]
    distinct = len(set(api_expected + ui_expected))
    print(f"baseline: {len(api_expected) + len(ui_expected)} expected replies computed alone "
          f"({distinct} distinct), e.g. {api_expected[0]!r}; took {time.perf_counter() - began:.1f} s", flush=True)

    # 2. the load
    print(f"load: running for {args.seconds:.0f} s ...", flush=True)
    tally = Tally()
    start = time.perf_counter()
    stop_at = start + args.seconds
    rss: dict[str, float] = {}

    def sample_after_warm_up():
        time.sleep(min(args.warm_up, args.seconds / 2))
        rss["warm"] = rss_mib(pid)

    sampler = threading.Thread(target=sample_after_warm_up, daemon=True)
    sampler.start()
    ui_threads = [threading.Thread(target=ui_session, args=(i, client, ui_expected[i], stop_at, tally), daemon=True)
                  for i, client in enumerate(ui_clients)]
    for thread in ui_threads:
        thread.start()
    probes: list[list[int]] = []
    probe_times = [args.seconds * f for f in (0.3, 0.55, 0.8)]
    await asyncio.gather(*(api_client(i, url, api_expected[i], stop_at, tally) for i in range(args.api_clients)),
                         *(order_probe(url, probe_expected, when, tally, probes) for when in probe_times))
    for thread in ui_threads:
        thread.join(REQUEST_TIMEOUT_S)
    elapsed = time.perf_counter() - start
    sampler.join(1)
    rss["end"] = rss_mib(pid)
    status = httpx.get(f"{url}/healthz", timeout=10).json()

    # 3. figures
    checked, inverted = order_inversions(tally.starts, args.order_gap_ms / 1000)
    growth = (rss["end"] - rss["warm"]) / rss["warm"] * 100
    latencies = sorted(tally.latencies) or [0.0]
    print(f"load: {tally.done} replies in {elapsed:.1f} s ({tally.done / elapsed:.2f} replies/s); latency median "
          f"{statistics.median(latencies):.2f} s, p95 {latencies[int(0.95 * (len(latencies) - 1))]:.2f} s, "
          f"max {latencies[-1]:.2f} s")
    print(f"errors: {len(tally.errors)}")
    print(f"lost or mixed-up replies: {len(tally.mixed_up)}")
    in_order = sum(order == sorted(order) for order in probes)
    print(f"order (first come, first served): {in_order} of {len(probes)} probes of {PROBE_SIZE} requests, each "
          f"submitted once the previous had joined the queue, started in submission order {probes}")
    print(f"  (client-side timing, for information: of {checked} pairs of load requests sent >= "
          f"{args.order_gap_ms:.0f} ms apart, {inverted} began streaming in the other order; the send time seen "
          f"here is not when the server queued them)")
    print(f"server RSS: {rss['warm']:.1f} MiB after warm-up, {rss['end']:.1f} MiB at the end ({growth:+.2f}%)")
    print(f"server after the load: state {status['state']}, running {status['running']}, queued {status['queued']}")
    for line in (tally.errors + tally.mixed_up)[:10]:
        print("  ", line)
    ok = (not tally.errors and not tally.mixed_up and probes and in_order == len(probes) and growth < 5
          and status["state"] == "ready")
    print("PASS" if ok else "FAIL")
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--api-clients", type=int, default=32)
    parser.add_argument("--ui-sessions", type=int, default=4)
    parser.add_argument("--warm-up", type=float, default=10, help="seconds of load before the first RSS sample")
    parser.add_argument("--order-gap-ms", type=float, default=100,
                        help="only requests submitted at least this far apart are checked for order")
    parser.add_argument("--url", help="use a running server instead of starting one")
    args = parser.parse_args()
    process = None
    url = args.url
    if url is None:
        process, url = start_server()
    # Bounded however it goes: the whole run may take --seconds plus three minutes, then everything stops
    # (SIGTERM becomes SystemExit, so the server below is still stopped).
    def give_up(*_):
        raise SystemExit(f"load.py: over its time limit ({args.seconds + 180:.0f} s); stopped")

    signal.signal(signal.SIGTERM, give_up)
    watchdog = threading.Timer(args.seconds + 180, lambda: os.kill(os.getpid(), signal.SIGTERM))
    watchdog.daemon = True
    watchdog.start()
    try:
        wait_ready(url)
        pid = server_pid(url, process)
        ok = asyncio.run(run_load(url, pid, args))
    finally:
        watchdog.cancel()
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
