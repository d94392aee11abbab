"""Prefill speed of Yuan2-M32 INT4 on the CPU, projected from release-sized layers to the full model.

    python bench/int4_cpu_prefill.py [--layers 2] [--threads 2] [--repeats 3] [--lengths 512 2048]
                                     [--chunk N] [--reuse DIR | --keep DIR] [--tokenizer-dir DIR] [--tiny]

Loads a synthetic INT4 checkpoint with release-sized layers (see `synthetic_release.py`) with the playground's
defaults (`load_yuan`) and measures, on `--threads` threads, COLD prefills: a fresh cache, a random prompt of each
length in `--lengths`, computed `--chunk` tokens per forward pass (default: the playground's `PREFILL_CHUNK_TOKENS`,
what generation passes as `prefill_chunk_size`), the logits of the last position only. It prints:

- per prefill, the median over `--repeats`: ms per decoder layer (hooks) and the fixed cost (embedding, final norm,
  the head for one row), projected to the release's 24 layers as `fixed + 24 x per-layer` -> prompt tokens/s;
- what a prefill of the first length is made of (time per component, by module hooks, and the top PyTorch ops);
- how the router spread the first length's tokens over the experts (the int4 kernel's cost per row is flat, the
  dequantising path's is not: see `quant_kernels.Int4PackKernel`);
- the peak growth of resident memory during a prefill of each length (bounded by the chunking).

Exit status 0 when the projected prefill speed at the first length meets the target (>= 25 tok/s at 512), and
always with `--tiny`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from synthetic_release import (
    REPO_ROOT,
    RELEASE_LAYERS,
    PrefillTimer,
    _projected,
    add_checkpoint_arguments,
    checkpoint_folder,
    component_profile,
    format_table,
    op_table,
    peak_rss_growth,
)

sys.path.insert(0, str(REPO_ROOT))
from playground.models.yuan import load_yuan  # noqa: E402
from playground.models.yuan.precision import PREFILL_CHUNK_TOKENS  # noqa: E402

TARGET_TOKENS_PER_S = 25.0


def measure(model, length: int, chunk: int, repeats: int) -> dict:
    timer = PrefillTimer(model, length, chunk)
    timer.steps(1)  # warm-up: allocator, first-call dispatch
    with peak_rss_growth() as growth:
        seconds = timer.steps(repeats, time_layers=True)
    layers = len(model.model.layers)
    per_prefill = [sum(timer.layer_seconds[i : i + layers * timer.chunks]) / layers
                   for i in range(0, len(timer.layer_seconds), layers * timer.chunks)]
    result = _projected(statistics.median(seconds), statistics.median(per_prefill), layers)
    result["projected_tokens_per_s"] *= length  # prefills per second -> prompt tokens per second
    return result | {"rss_growth": growth["bytes"], "timer": timer}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_checkpoint_arguments(parser, default_layers=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="prefills timed per length")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048], help="prompt lengths")
    parser.add_argument("--chunk", type=int, default=PREFILL_CHUNK_TOKENS,
                        help=f"prompt tokens per forward pass (default {PREFILL_CHUNK_TOKENS})")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with checkpoint_folder(args, "yuan-int4-prefill-") as folder:
        start = time.perf_counter()
        model, _ = load_yuan(folder, with_tokenizer=False)
        layers = len(model.model.layers)
        print(f"loaded in {time.perf_counter() - start:.1f}s: {model.compute_precision.describe()}, "
              f"{torch.get_num_threads()} threads, torch {torch.__version__}; chunks of {args.chunk} tokens")

        results = {length: measure(model, length, args.chunk, args.repeats) for length in args.lengths}
        print(f"\ncold prefill (median of {args.repeats}):")
        rows = [(length, f"{r['step_ms']:.0f}", f"{r['per_layer_ms']:.1f}", f"{r['fixed_ms']:.1f}",
                 f"{r['projected_ms'] / 1e3:.2f}", f"{r['projected_tokens_per_s']:.1f}",
                 f"{r['rss_growth'] / 1e6:.0f}") for length, r in results.items()]
        print(format_table(rows, ("prompt tokens", f"ms ({layers} layers)", "ms/layer", "fixed ms",
                                  f"projected s ({RELEASE_LAYERS} layers)", "projected tok/s", "peak RSS growth MB")))

        first = args.lengths[0]
        timer = results[first]["timer"]
        print(f"\nwhat a prefill is made of ({first} tokens, module hooks, {layers} layers):")
        profile = component_profile(model, timer, steps=1)
        scale = RELEASE_LAYERS / layers
        projected = {role: ms * (1 if role.startswith(("lm_head", "embedding")) else scale)
                     for role, ms, _ in profile if role != "step total"}
        total_projected = sum(projected.values())
        rows = [(role, f"{ms:.1f}", f"{share:.0%}", f"{projected.get(role, total_projected) / total_projected:.0%}")
                for role, ms, share in profile]
        print(format_table(rows, ("component", "ms/prefill", "share", f"share at {RELEASE_LAYERS} layers")))
        print(f"\ntop PyTorch ops ({first} tokens):")
        print(op_table(timer, steps=1))

        with model.record_routing() as trace:
            timer.prefill()
        experts, _ = trace.stacked()  # [layers, batch, tokens, top_k]
        rows = []
        for layer, chosen in enumerate(experts):  # per chunk: each forward pass calls each used expert once
            counts = torch.stack([torch.bincount(chosen[:, i : i + args.chunk].flatten(),
                                                 minlength=model.config.num_experts)
                                  for i in range(0, chosen.shape[1], args.chunk)]).float()
            rows.append((layer, f"{(counts > 0).sum(-1).float().mean():.1f}", int(counts.max()),
                         f"{counts.sum() / (counts > 0).sum():.0f}"))
        print(f"\nrows per expert and chunk over a {first}-token prefill (the synthetic router is not a trained one; "
              f"a trained one spreads the tokens more evenly):")
        print(format_table(rows, ("layer", "experts used", "most rows", "mean rows per used expert")))

        tokens_per_s = results[first]["projected_tokens_per_s"]
        ok = tokens_per_s >= TARGET_TOKENS_PER_S
        print(f"\nRESULT projected prefill {tokens_per_s:.1f} tok/s at {first} (target >= {TARGET_TOKENS_PER_S:.0f}, "
              f"ratio {tokens_per_s / TARGET_TOKENS_PER_S:.2f}); chunks of {args.chunk}, {args.threads} threads; "
              f"{'PASS' if ok else 'FAIL'}{' (toy layers: not a measurement)' if args.tiny else ''}")
        return 0 if ok or args.tiny else 1  # toy layers check the script, not the speed


if __name__ == "__main__":
    sys.exit(main())
