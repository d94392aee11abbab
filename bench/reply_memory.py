"""Peak memory of one long reply, with the per-token figures the UI asks for (logprobs and top alternatives).

    python bench/reply_memory.py [--model DIR] [--tokens 1000] [--logprobs 5]

Loads the model (default: the embedded SmolLM2) in a manager, warms it up, then streams one reply of exactly
`--tokens` tokens (its end token held off) with `--logprobs` alternatives per token, keeping every event's token
details as an API response does, and samples the process's resident memory every few milliseconds. Prints the peak
growth over the resting process, per token, and the size of the reply's own KV cache (which the prompt cache then
keeps for the next request), with logprobs and without, each in a fresh process.

Target: a 1,000-token reply with logprobs grows the peak by <= 60 MB on the embedded model. Exit status 0 when met.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if TYPE_CHECKING:
    from playground.manager import ModelManager

TARGET_MB = 60
PROMPT = "1, 2, 3, 4, 5, 6, 7, 8,"


class PeakResident:
    """The process's resident set, sampled on a thread until stopped: the highest reading."""

    def __init__(self, every_s: float = 0.003):
        self.process = psutil.Process()
        self.every_s = every_s
        self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.every_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def reply(manager: ModelManager, tokens: int, logprobs: int | None) -> tuple[int, int, list]:
    """One streamed reply; returns (new tokens, cached tokens, the token details kept)."""
    kept, stats = [], None
    for event in manager.stream(prompt=PROMPT, params={"temperature": 0, "max_new_tokens": tokens},
                                logprobs=logprobs):
        kept.extend(event.tokens)
        if event.kind == "done":
            stats = event.stats
    if stats.finish_reason == "error":
        raise RuntimeError(stats.error)
    return stats.new_tokens, stats.cached_tokens, kept


def measure(manager: ModelManager, tokens: int, logprobs: int | None) -> dict:
    resting = psutil.Process().memory_info().rss
    with PeakResident() as peak:
        new_tokens, cached, kept = reply(manager, tokens, logprobs)
    after = psutil.Process().memory_info().rss
    return {"new_tokens": new_tokens, "growth": peak.peak - resting, "after": after - resting, "details": len(kept),
            "cache_bytes": manager.status()["prompt_cache"]["bytes"], "cached": cached}


def run_one(args) -> None:
    """One measurement in this (fresh) process: memory freed by an earlier reply would hide the next one's growth.
    Only this process loads torch and the model: the one that starts the measurements needs neither."""
    import torch

    from playground.manager import ModelManager

    torch.set_num_threads(args.threads)
    manager = ModelManager()
    status = manager.load(args.model)
    manager.loaded.model.generation_config.min_new_tokens = args.tokens  # every reply exactly --tokens long
    logprobs = None if args.logprobs < 0 else args.logprobs
    reply(manager, 32, logprobs)  # warm-up: first-call allocations are not the reply's
    manager.set_prompt_cache_budget(0)  # emptied, then sized again: the measured reply starts cold
    manager.set_prompt_cache_budget(None)
    result = measure(manager, args.tokens, logprobs)
    print(json.dumps({**result, "model": f"{status['name']} ({status['kind']}, {status['dtype']} on {status['device']})"}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2)")
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--logprobs", type=int, default=5, help="alternatives per token (-1: no logprobs)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        run_one(args)
        return 0
    results = {}
    for name, logprobs in ((f"logprobs {args.logprobs}", args.logprobs), ("no logprobs", -1)):
        command = [sys.executable, __file__, "--one", "--tokens", str(args.tokens), "--logprobs", str(logprobs),
                   "--threads", str(args.threads), *(["--model", args.model] if args.model else [])]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        results[name] = result = json.loads(output.strip().splitlines()[-1])
        print(f"{name:>12} ({result['model']}): peak RSS +{result['growth'] / 1e6:.1f} MB "
              f"({result['growth'] / result['new_tokens'] / 1e3:.1f} KB per token) over {result['new_tokens']} "
              f"tokens, +{result['after'] / 1e6:.1f} MB after; {result['details']} token details kept; the prompt "
              f"cache then holds {result['cache_bytes'] / 1e6:.1f} MB (the reply's KV cache, for the next request)")
    with_logprobs = results[f"logprobs {args.logprobs}"]
    growth_mb = with_logprobs["growth"] / 1e6
    ok = growth_mb <= TARGET_MB
    print(f"\nRESULT peak memory growth of a {with_logprobs['new_tokens']}-token reply with logprobs {args.logprobs}: "
          f"{growth_mb:.1f} MB (target <= {TARGET_MB}, ratio {growth_mb / TARGET_MB:.2f}); without logprobs "
          f"{results['no logprobs']['growth'] / 1e6:.1f} MB; {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
