"""Batch-1 decode speed and GPU memory of Yuan2-M32 INT4 on one CUDA GPU, projected from release-sized layers.

    python bench/gpu_decode.py [--layers 4] [--steps 64] [--contexts 16 4096] [--device cuda] [--tiny]
                               [--reuse DIR | --keep DIR] [--tokenizer-dir DIR]

Writes a synthetic INT4 checkpoint with `--layers` release-sized layers (`synthetic_release.py`), loads it with the
playground's defaults on the GPU (bf16; GPTQ layers on gptqmodel's Marlin when installed, else PyTorch's int4pack
kernel, each checked once against the exact path) and measures:

- decode ms per step with all the layers and with half of them (whole steps, synchronised, median of `--steps`):
  their difference gives the per-layer cost, the rest the fixed cost (embedding, lm_head, sampling);
- the projection to the release's 24 layers -> tokens/s at each context (goal >= 92, ten times the release's 9.24
  tok/s on one 80 GB GPU);
- GPU memory: weights as loaded (24 layers like these + the rest) + the KV cache at 4096 positions + the peak
  working memory seen while decoding at the longest context (goal <= 22 GB, the release reports 23.27 GB).

The last line (`RESULT ...`) is what a GPU run is judged by. Without a CUDA device it says so and exits 2;
`--device cpu --tiny` runs the same code on toy-sized layers, to check the script, not to measure.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from synthetic_release import (
    REPO_ROOT,
    RELEASE_LAYERS,
    add_checkpoint_arguments,
    checkpoint_folder,
    kv_bytes_per_position,
    projected_memory,
    projection_by_truncation,
)

sys.path.insert(0, str(REPO_ROOT))
from playground.models.yuan import load_yuan  # noqa: E402
from playground.models.yuan.gptq import QuantLinear  # noqa: E402

GOAL_TOKENS_PER_S = 92.0
RELEASE_TOKENS_PER_S = 9.24
GOAL_MEMORY_GB = 22.0
KV_CONTEXT = 4096


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_checkpoint_arguments(parser, default_layers=4)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--contexts", type=int, nargs="+", default=[16, 4096])
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("RESULT no CUDA device here: nothing measured (run this on a GPU machine)")
        return 2
    if args.layers < 2:
        parser.error("--layers must be at least 2 (the per-layer cost is a difference of layer counts)")
    cuda = device.type == "cuda"
    synchronize = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)

    with checkpoint_folder(args, "yuan-int4-gpu-") as folder:
        start = time.perf_counter()
        model, _ = load_yuan(folder, device=str(device), with_tokenizer=False)
        synchronize()
        quantized = [m for m in model.modules() if isinstance(m, QuantLinear)]
        kernels = sorted({m.kernel.name if m.kernel else "exact" for m in quantized})
        name = torch.cuda.get_device_name(device) if cuda else "cpu"
        print(f"loaded in {time.perf_counter() - start:.1f}s on {name}: {model.compute_precision.describe()}; "
              f"GPTQ layers on {', '.join(kernels)}; torch {torch.__version__}")

        results = {}
        for context in args.contexts:
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            held = torch.cuda.memory_allocated(device) if cuda else 0
            results[context] = projection_by_truncation(model, context, args.steps, synchronize)
            results[context]["working_bytes"] = (torch.cuda.max_memory_allocated(device) - held) if cuda else 0
            result = results[context]
            print(f"context {context:5d}: {result['step_ms']:.2f} ms/step with {len(model.model.layers)} layers, "
                  f"{result['per_layer_ms']:.3f} ms/layer, fixed {result['fixed_ms']:.2f} ms -> projected "
                  f"{result['projected_ms']:.1f} ms = {result['projected_tokens_per_s']:.1f} tok/s for "
                  f"{RELEASE_LAYERS} layers")

        memory = projected_memory(model, KV_CONTEXT)
        longest = max(args.contexts)
        # The working set measured includes this run's own cache at `longest` positions for the loaded layers.
        cache_here = kv_bytes_per_position(model) * len(model.model.layers) * (longest + args.steps + 8)
        working = max(results[longest]["working_bytes"] - cache_here, 0)
        total = memory["weights_bytes"] + memory["kv_bytes"] + working
        print(f"GPU memory projected for {RELEASE_LAYERS} layers: weights {memory['weights_bytes'] / 1e9:.2f} GB "
              f"(one layer {memory['layer_bytes'] / 1e6:.0f} MB) + KV cache at {KV_CONTEXT} positions "
              f"{memory['kv_bytes'] / 1e9:.2f} GB + working memory {working / 1e9:.2f} GB = {total / 1e9:.2f} GB")

        first = results[args.contexts[0]]["projected_tokens_per_s"]
        ok = first >= GOAL_TOKENS_PER_S and total <= GOAL_MEMORY_GB * 1e9
        print(f"RESULT {name}: projected Yuan2-M32 INT4 batch-1 decode {first:.1f} tok/s at context "
              f"{args.contexts[0]} ({first / RELEASE_TOKENS_PER_S:.1f}x the release's {RELEASE_TOKENS_PER_S}; goal "
              f">= {GOAL_TOKENS_PER_S:.0f}), GPU memory {total / 1e9:.1f} GB with a {KV_CONTEXT}-token context "
              f"(goal <= {GOAL_MEMORY_GB:.0f}); {'PASS' if ok else 'FAIL'}"
              f"{' (toy layers: not a measurement)' if args.tiny else ''}")
        return 0 if ok or args.tiny else 1


if __name__ == "__main__":
    sys.exit(main())
