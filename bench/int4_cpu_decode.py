"""Decode speed and memory of Yuan2-M32 INT4 on the CPU, projected from release-sized layers to the full model.

    python bench/int4_cpu_decode.py [--layers 2] [--threads 2] [--steps 24] [--contexts 16 1024]
                                    [--reuse DIR | --keep DIR] [--no-quality] [--tokenizer-dir DIR] [--tiny]

Writes a synthetic INT4 checkpoint with `--layers` release-sized layers (release layout, byte-split parts; see
`synthetic_release.py`), loads it with the playground's defaults through the model manager (`load_yuan`: int4
kernels, bf16 weights, fp32 activations on CPU) and measures, on `--threads` threads:

- decode ms per decoder layer and the fixed cost of a step (embedding, final norm, lm_head 135040 x 2048, argmax),
  each the median over `--steps` steps, at each prompt length in `--contexts`;
- the projection to the release's 24 layers: `fixed + 24 x per-layer` -> tokens/s (target >= 5 at the first context);
- the same decoding as the chat runs it, through the model manager with the top-5 logprobs and the expert routing
  recorded and the text decoded token by token (the UI's path), with logprobs and without: its cost per token beyond
  the model's step, and the projected tokens/s with it;
- what a step is made of (time per component, by module hooks, and the top PyTorch ops);
- resident memory of the full model: weights (24 layers like the loaded ones + the rest) + the KV cache at 4096
  positions + this process's baseline (target <= 25 GB);
- quality of the fast path against the exact fp32 path on the same weights (`--dtype float32`): relative L2 error
  of the logits (target <= 2%), routing decisions that differ, and whether greedy decoding picks the same tokens.

Exit status 0 when the speed and memory targets are met (always with `--tiny`, which checks the script).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import psutil
import torch

from synthetic_release import (
    REPO_ROOT,
    RELEASE_LAYERS,
    DecodeTimer,
    add_checkpoint_arguments,
    checkpoint_folder,
    component_profile,
    format_table,
    op_table,
    projected_memory,
    projection,
    relative_error,
)

sys.path.insert(0, str(REPO_ROOT))
from playground.insight import INSPECT_TOP  # noqa: E402
from playground.manager import ModelManager  # noqa: E402
from playground.models.yuan import load_yuan  # noqa: E402

TARGET_TOKENS_PER_S = 5.0
TARGET_RESIDENT_GB = 25.0
TARGET_LOGIT_ERROR = 0.02
KV_CONTEXT = 4096


def ui_path_step_seconds(manager: ModelManager, context: int, steps: int, logprobs: int | None) -> float:
    """Seconds per decoded token of a reply streamed through the manager after a `context`-token prompt, as the
    chat asks for it (`logprobs` alternatives, expert routing), from its stats (first to last token)."""
    generation_config = manager.loaded.model.generation_config
    generation_config.min_new_tokens = steps  # the end token held off: every reply decodes `steps` tokens
    words = min(context, manager.loaded.context_length - steps - 16)  # the reply must fit the context too
    try:
        result = manager.generate(prompt=" ".join(["word"] * words), params={"temperature": 0, "max_new_tokens": steps},
                                  logprobs=logprobs, capture_routing=True)
    finally:
        generation_config.min_new_tokens = None
    if result.stats.finish_reason == "error":
        raise RuntimeError(result.stats.error)
    return 1.0 / result.stats.decode_tokens_per_s


def measure_speed(model, contexts: list[int], steps: int) -> dict[int, dict]:
    results = {}
    for context in contexts:
        timer = DecodeTimer(model, context)
        timer.steps(3)  # warm-up: caches, allocator, first-call dispatch
        step_seconds = timer.steps(steps)
        timer.steps(steps, time_layers=True)
        results[context] = projection(model, step_seconds, timer.layer_seconds) | {"timer": timer}
    return results


def quality(fast, folder: Path, prompt_len: int = 12, new_tokens: int = 8) -> dict:
    """The fast model against the exact fp32 path on the same weights (the measures of the tests, at release size)."""
    exact, _ = load_yuan(folder, dtype=torch.float32, with_tokenizer=False)
    generator = torch.Generator().manual_seed(7)
    prompt = torch.randint(0, fast.config.vocab_size, (1, prompt_len), generator=generator)
    with torch.inference_mode():
        with fast.record_routing() as fast_routing:
            fast_logits = fast(prompt).logits
        with exact.record_routing() as exact_routing:
            exact_logits = exact(prompt).logits
        fast_tokens = fast.generate(prompt, max_new_tokens=new_tokens, do_sample=False)
        exact_tokens = exact.generate(prompt, max_new_tokens=new_tokens, do_sample=False)
        steps = slice(prompt_len - 1, -1)  # along the exact path's continuation: the logits choosing each token
        fast_next, exact_next = fast(exact_tokens).logits[0, steps], exact(exact_tokens).logits[0, steps]
    flipped = (fast_routing.stacked()[0].sort(-1).values != exact_routing.stacked()[0].sort(-1).values).any(-1)
    same_route = ~flipped.any(0)[0]  # positions routed identically in every layer
    best = exact_next.topk(2, dim=-1).values
    decided = best[:, 0] - best[:, 1] > 2 * (fast_next - exact_next).abs().amax(-1)
    del exact
    return {
        "error_all": relative_error(fast_logits, exact_logits),
        "error_same_route": relative_error(fast_logits[0, same_route], exact_logits[0, same_route]),
        "flipped": int(flipped.sum()), "decisions": flipped.numel(),
        "decided": int(decided.sum()), "steps": decided.numel(),
        "decided_agree": bool(torch.equal(fast_next.argmax(-1)[decided], exact_next.argmax(-1)[decided])),
        "fast_tokens": fast_tokens[0, prompt_len:].tolist(), "exact_tokens": exact_tokens[0, prompt_len:].tolist(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_checkpoint_arguments(parser, default_layers=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=24, help="decode steps timed per context")
    parser.add_argument("--contexts", type=int, nargs="+", default=[16, 1024], help="prompt lengths before decoding")
    parser.add_argument("--no-quality", action="store_true", help="skip the comparison with the exact path")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with checkpoint_folder(args, "yuan-int4-decode-") as folder:
        process = psutil.Process()
        baseline = process.memory_info().rss
        start = time.perf_counter()
        manager = ModelManager()
        manager.load(folder)
        model = manager.loaded.model
        loaded_rss = process.memory_info().rss
        print(f"loaded in {time.perf_counter() - start:.1f}s: {model.compute_precision.describe()}, "
              f"{torch.get_num_threads()} threads, torch {torch.__version__}")

        speed = measure_speed(model, args.contexts, args.steps)
        print("\ndecode step (median of %d):" % args.steps)
        rows = []
        for context, result in speed.items():
            rows.append((context, f"{result['step_ms']:.1f}", f"{result['per_layer_ms']:.2f}",
                         f"{result['fixed_ms']:.1f}",
                         f"{result['projected_ms']:.0f}", f"{result['projected_tokens_per_s']:.2f}"))
        print(format_table(rows, ("context", f"step ms ({len(model.model.layers)} layers)", "ms/layer", "fixed ms",
                            f"projected ms ({RELEASE_LAYERS} layers)", "projected tok/s")))

        first = args.contexts[0]
        print("\ndecoding as the chat does (through the manager, routing recorded, text decoded per token; "
              "median step of the model alone subtracted):")
        rows = []
        for context, result in speed.items():
            for label, logprobs in ((f"top-{INSPECT_TOP} logprobs", INSPECT_TOP), ("no logprobs", None)):
                ui_step = ui_path_step_seconds(manager, context, args.steps, logprobs)
                overhead_ms = ui_step * 1e3 - result["step_ms"]
                tokens_per_s = 1e3 / (result["projected_ms"] + max(overhead_ms, 0.0))
                result[f"ui_{label}"] = tokens_per_s
                rows.append((context, label, f"{ui_step * 1e3:.1f}", f"{overhead_ms:+.1f}", f"{tokens_per_s:.2f}"))
        print(format_table(rows, ("context", "request", f"ms/token ({len(model.model.layers)} layers)",
                                  "beyond the model ms", "projected tok/s")))

        print(f"\nwhat a step is made of (context {first}, module hooks, {len(model.model.layers)} layers):")
        profile = component_profile(model, speed[first]["timer"], steps=8)
        # The same step with 24 layers: per-layer components scale with the layer count, the head and embedding not.
        scale = RELEASE_LAYERS / len(model.model.layers)
        projected = {role: ms * (1 if role.startswith(("lm_head", "embedding")) else scale)
                     for role, ms, _ in profile if role != "step total"}
        total_projected = sum(projected.values())
        rows = [(role, f"{ms:.2f}", f"{share:.0%}",
                 f"{projected.get(role, total_projected) / total_projected:.0%}") for role, ms, share in profile]
        print(format_table(rows, ("component", "ms/step", "share", f"share at {RELEASE_LAYERS} layers")))
        print(f"\ntop PyTorch ops (context {first}):")
        print(op_table(DecodeTimer(model, first, seed=1)))

        memory = projected_memory(model, KV_CONTEXT)
        held_now = loaded_rss - baseline
        resident = memory["weights_bytes"] + memory["kv_bytes"] + baseline
        print(f"\nmemory: one decoder layer holds {memory['layer_bytes'] / 1e6:.0f} MB, the rest (embedding/lm_head "
              f"tied, final norm) {memory['fixed_bytes'] / 1e6:.0f} MB; RSS grew {held_now / 1e9:.2f} GB while "
              f"loading {memory['layers']} layers")
        print(f"projected resident memory of the full model: weights {memory['weights_bytes'] / 1e9:.2f} GB + KV cache "
              f"at {KV_CONTEXT} positions {memory['kv_bytes'] / 1e9:.2f} GB + process baseline {baseline / 1e9:.2f} GB "
              f"= {resident / 1e9:.2f} GB")

        if not args.no_quality:
            result = quality(model, folder)
            print(f"\nquality against the exact fp32 path (same weights, 12-token prompt, "
                  f"{len(model.model.layers)} layers):")
            print(f"  relative L2 error of the logits: {result['error_all']:.4f} over all positions, "
                  f"{result['error_same_route']:.4f} where every layer picked the same experts (target <= "
                  f"{TARGET_LOGIT_ERROR})")
            print(f"  routing decisions that differ: {result['flipped']} of {result['decisions']}")
            print(f"  along the exact path's greedy continuation: {result['decided']} of {result['steps']} steps "
                  f"decided "
                  f"(top-2 gap > 2x the fast path's logit error), fast picks the same token at "
                  f"{'all of them' if result['decided_agree'] else 'NOT all of them'}")
            print(f"  free-running greedy tokens: fast {result['fast_tokens']} exact {result['exact_tokens']} -> "
                  f"{'same' if result['fast_tokens'] == result['exact_tokens'] else 'DIFFERENT'}")

        tokens_per_s = speed[first]["projected_tokens_per_s"]
        ok = tokens_per_s >= TARGET_TOKENS_PER_S and resident <= TARGET_RESIDENT_GB * 1e9
        print(f"\nRESULT projected Yuan2-M32 INT4 CPU decode {tokens_per_s:.2f} tok/s at context {first} "
              f"(target >= {TARGET_TOKENS_PER_S}, ratio {tokens_per_s / TARGET_TOKENS_PER_S:.2f}); resident "
              f"{resident / 1e9:.1f} GB (target <= {TARGET_RESIDENT_GB:.0f}); "
              f"{'PASS' if ok else 'FAIL'}{' (toy layers: not a measurement)' if args.tiny else ''}")
        return 0 if ok or args.tiny else 1  # toy layers check the script, not the speed


if __name__ == "__main__":
    sys.exit(main())
