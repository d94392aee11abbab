"""Per-token decode cost of the native Yuan2 model at growing context lengths (CPU, small random config).

    python bench/yuan_decode.py [--contexts 128 1024 2048] [--steps 8] [--rounds 6] [--threads N]

For each context it prefills that many tokens into a YuanCache, then times single-token decoding steps (the
contexts take turns; the best of several rounds is reported, the median too). A flat
per-token cost means nothing in a step grows with the history except attention itself (no L x L mask rebuilt,
keys/values appended in place). Prints ms/token and tokens/s per context, the 2K/128 ratio, and the same ratio
once the attention over the cache (timed on its own) is taken out.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from playground.models.yuan.configuration_yuan import YuanConfig  # noqa: E402
from playground.models.yuan.make_tiny import random_float_model  # noqa: E402
from playground.models.yuan.cache_yuan import YuanCache  # noqa: E402

# Small but shaped like the release: head_dim 256 (rotary on 128), attention router, top-2 of 8 SwiGLU experts.
BENCH_CONFIG = dict(
    vocab_size=32000,
    hidden_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    attention_projection_size=1024,
    max_position_embeddings=4096,
    moe_config={"moe_num_experts": 8, "moe_top_k": 2, "ffn_hidden_size": 1024},
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


class DecodeRun:
    """A cache prefilled to one context length, decoding one token at a time."""

    def __init__(self, model, config: YuanConfig, context: int, generator: torch.Generator):
        self.model = model
        self.cache = YuanCache(config)
        prompt = torch.randint(0, config.vocab_size, (1, context), generator=generator)
        self.token = self._next(model(prompt, cache=self.cache, use_cache=True))

    @staticmethod
    def _next(output) -> torch.Tensor:
        return output.logits[:, -1].argmax(-1, keepdim=True)

    def step_seconds(self, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            self.token = self._next(self.model(self.token, cache=self.cache, use_cache=True))
        return (time.perf_counter() - start) / steps


def attention_seconds(config: YuanConfig, context: int, repeats: int = 30) -> float:
    """One decoding step's scaled-dot-product attention over `context` cached positions, all layers.

    Inside a step the other layers' weights evict the cached keys/values from the CPU caches, so each call here
    starts from memory too: a 64 MB scratch buffer is written between calls (outside the timing).
    """
    query = torch.randn(1, config.num_attention_heads, 1, config.head_dim)
    keys = torch.randn(1, config.num_attention_heads, context, config.head_dim)
    values = torch.randn_like(keys)
    scratch = torch.empty(16 * 1024 * 1024)
    times = []
    for _ in range(repeats):
        scratch.add_(1.0)
        start = time.perf_counter()
        F.scaled_dot_product_attention(query, keys, values)
        times.append(time.perf_counter() - start)
    return min(times) * config.num_hidden_layers


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 1024, 2048])
    parser.add_argument("--steps", type=int, default=8, help="decoding steps per timing")
    parser.add_argument("--rounds", type=int, default=6, help="timings per context, taken in turns")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steadier on a shared machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    config = YuanConfig(**BENCH_CONFIG)
    model = random_float_model(config, seed=0)
    params = sum(p.numel() for p in model.parameters())
    print(f"config: hidden {config.hidden_size}, layers {config.num_hidden_layers}, heads {config.num_attention_heads} "
          f"x {config.head_dim}, experts {config.num_experts} (top {config.num_experts_per_tok}), "
          f"{params / 1e6:.1f}M params, float32, {torch.get_num_threads()} threads")
    generator = torch.Generator().manual_seed(0)
    results: dict[int, list[float]] = {context: [] for context in args.contexts}
    with torch.inference_mode():
        runs = {context: DecodeRun(model, config, context, generator) for context in args.contexts}
        for run in runs.values():
            run.step_seconds(2)  # warm-up
        # Contexts take turns, so a busy machine slows them alike; the minimum over rounds is the least disturbed.
        for _ in range(args.rounds):
            for context, run in runs.items():
                results[context].append(run.step_seconds(args.steps))
    best = {context: min(times) for context, times in results.items()}
    for context in args.contexts:
        times = sorted(results[context])
        print(f"context {context:5d}: {best[context] * 1e3:7.2f} ms/token (median {times[len(times) // 2] * 1e3:.2f}), "
              f"{1 / best[context]:6.1f} tok/s")
    if 128 in best and 2048 in best:
        print(f"ratio 2K/128 per-token cost: {best[2048] / best[128]:.2f}")
        # What a step cannot avoid paying for context: attention reading every cached key and value.
        attention = {c: attention_seconds(config, c) for c in (128, 2048)}
        rest = {c: best[c] - attention[c] for c in (128, 2048)}
        print(f"attention over the cache alone: {attention[128] * 1e3:.2f} ms at 128, {attention[2048] * 1e3:.2f} ms at "
              f"2048; the rest of a step: {rest[128] * 1e3:.2f} -> {rest[2048] * 1e3:.2f} ms "
              f"(ratio {rest[2048] / rest[128]:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
