"""The embedded SmolLM2 on the CPU int4 kernel (`--dtype auto`) against its float32 model (`--dtype float32`).

    python bench/embedded_int4.py [--threads 2] [--tokens 100] [--logprobs 5] [--prompt-tokens 500]

For each precision, in one process: decode tokens/s through the manager (greedy, exactly --tokens new tokens with
--logprobs alternatives each, as the UI asks for 5; the prompt cache off so every round is cold), prompt tokens/s
for a --prompt-tokens prompt, and the resident memory of the model's tensors. Then, on the int4 model, whether a
Regenerate and a prompt sharing the beginning, resumed from the prompt cache, give the cold request's tokens and
logprobs bit for bit.

Target: int4 decode >= 1.3x float32's on 2 threads, resumed == cold. Exit status 0 when met.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from playground.manager import ModelManager  # noqa: E402

TARGET_SPEEDUP = 1.3
SYSTEM = {"role": "system", "content": "You are a patient teacher who answers in full sentences. You explain each idea "
          "with an everyday example, avoid jargon, and end with a one-line summary."}
ASK = [SYSTEM, {"role": "user", "content": "Why is the sky blue? Explain it to a child."}]
OTHER = [SYSTEM, {"role": "user", "content": "Name three animals that live in the sea."}]


def decode_rate(manager: ModelManager, tokens: int, rounds: int, logprobs: int | None) -> float:
    config = manager.loaded.model.generation_config
    config.min_new_tokens = tokens  # every round exactly `tokens` long
    try:
        rates = [manager.generate(messages=ASK, params={"temperature": 0, "max_new_tokens": tokens}, logprobs=logprobs
                                  ).stats.decode_tokens_per_s for _ in range(rounds)]
    finally:
        config.min_new_tokens = None
    return statistics.median(rates)


def prompt_rate(manager: ModelManager, prompt_tokens: int) -> float:
    words = " ".join(f"item{index}" for index in range(prompt_tokens))
    text = manager.loaded.tokenizer.decode(manager.loaded.tokenizer(words)["input_ids"][:prompt_tokens])
    started = time.perf_counter()
    stats = manager.generate(prompt=text, params={"temperature": 0, "max_new_tokens": 1}).stats
    return stats.prompt_tokens / (time.perf_counter() - started)


def resumed_equals_cold(manager: ModelManager) -> tuple[bool, list[int]]:
    """Each request on the cache-holding manager against the same request with the cache emptied first."""
    params = {"temperature": 0, "max_new_tokens": 24}
    same, cached = True, []
    manager.set_prompt_cache_budget(None)
    manager.generate(messages=ASK, params=params)
    for messages in (ASK, OTHER):
        resumed = manager.generate(messages=messages, params=params, logprobs=3)
        manager.set_prompt_cache_budget(0)
        cold = manager.generate(messages=messages, params=params, logprobs=3)
        manager.set_prompt_cache_budget(None)
        manager.generate(messages=ASK, params=params)  # the shared beginning back in the cache
        cached.append(resumed.stats.cached_tokens)
        same &= [(t.id, t.logprob, t.top) for t in resumed.tokens] == [(t.id, t.logprob, t.top) for t in cold.tokens]
    return same, cached


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--prompt-tokens", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--logprobs", type=int, default=5, help="alternatives per token (the UI asks for 5; -1: none)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    figures = {}
    for dtype in ("float32", "auto"):
        manager = ModelManager()
        # Loaded on a thread of its own, as the server loads: torch work on this main thread first would slow the
        # manager's generation thread (ModelManager.load_on_thread says why).
        status = manager.load_on_thread(dtype=dtype).result()
        manager.set_prompt_cache_budget(0)
        logprobs = None if args.logprobs < 0 else args.logprobs
        decode_rate(manager, 8, 1, logprobs)  # warm-up
        figures[dtype] = {"decode": decode_rate(manager, args.tokens, args.rounds, logprobs),
                          "prompt": prompt_rate(manager, args.prompt_tokens), "memory": status["memory_mib"]}
        if dtype == "auto":
            figures[dtype]["resumed"] = resumed_equals_cold(manager)
        print(f"{status['dtype']:>40}: decode {figures[dtype]['decode']:5.1f} tok/s (logprobs {args.logprobs}), "
              f"a {args.prompt_tokens}-token prompt {figures[dtype]['prompt']:5.0f} tok/s, "
              f"tensors {figures[dtype]['memory']:.0f} MiB", flush=True)
        manager.close()
    same, cached = figures["auto"]["resumed"]
    print(f"int4: Regenerate and a prompt sharing the beginning, resumed from {cached} cached tokens: "
          f"tokens and logprobs {'identical to' if same else 'DIFFERENT from'} the cold requests")
    speedup = figures["auto"]["decode"] / figures["float32"]["decode"]
    ok = speedup >= TARGET_SPEEDUP and same
    print(f"\nRESULT embedded int4 decode {figures['auto']['decode']:.1f} tok/s vs float32 "
          f"{figures['float32']['decode']:.1f} on {args.threads} threads: {speedup:.2f}x (target >= {TARGET_SPEEDUP}: "
          f"{'met' if speedup >= TARGET_SPEEDUP else 'NOT met'}); resumed == cold: {same}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
