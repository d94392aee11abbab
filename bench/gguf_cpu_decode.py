"""The vendor's INT4 GGUF next to the GPTQ release on the CPU: decode speed projected to 24 layers, and memory.

    python bench/gguf_cpu_decode.py [--layers 2] [--threads 2] [--steps 16] [--contexts 16 1024] [--tiny]

Writes two synthetic checkpoints with `--layers` release-sized layers: the GPTQ INT4 release's layout (byte-split
safetensors, group 128; `synthetic_release.write_release_checkpoint`) and the vendor's INT4 GGUF
(`Yuan2-M32-GGUF-INT4`: Q4_0 blocks of 32, a Q6_K output; `write_release_gguf`). Each is loaded in turn through the
model manager with the playground's defaults (both run on the int4 kernels: Q4_0 is repacked, not requantised, as
group-32 int4) and measured in the same run: load time, RSS growth while loading, decode ms per step, ms per layer
and the fixed cost, the projection to the release's 24 layers (tokens/s) and the projected resident memory of the
full model (weights + KV cache at 4096 positions + process baseline).
"""

from __future__ import annotations

import argparse
import gc
import shutil
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

from int4_cpu_decode import KV_CONTEXT, measure_speed
from synthetic_release import (
    REPO_ROOT,
    RELEASE_LAYER,
    RELEASE_LAYERS,
    TINY_LAYER,
    format_table,
    projected_memory,
    write_release_checkpoint,
    write_release_gguf,
)

sys.path.insert(0, str(REPO_ROOT))
from playground.manager import ModelManager  # noqa: E402
from playground.models.yuan.make_tiny import resolve_tokenizer_dir  # noqa: E402


def measure(label: str, target: Path, contexts: list[int], steps: int, baseline: int) -> dict:
    """Load `target` through the manager and measure; `baseline` is the process's RSS before any model was loaded."""
    process = psutil.Process()
    gc.collect()
    before = process.memory_info().rss
    start = time.perf_counter()
    manager = ModelManager()
    manager.load(str(target))
    load_s = time.perf_counter() - start
    grown = process.memory_info().rss - before
    model = manager.loaded.model
    speed = measure_speed(model, contexts, steps)
    memory = projected_memory(model, KV_CONTEXT)
    resident = memory["weights_bytes"] + memory["kv_bytes"] + baseline
    result = {"label": label, "load_s": load_s, "rss_growth": grown, "speed": speed, "resident": resident,
              "layer_bytes": memory["layer_bytes"], "precision": model.compute_precision.describe()}
    del manager, model
    gc.collect()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--contexts", type=int, nargs="+", default=[16, 1024])
    parser.add_argument("--tokenizer-dir", type=Path)
    parser.add_argument("--tiny", action="store_true", help="toy-sized layers: checks the script, measures nothing")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dims = TINY_LAYER if args.tiny else RELEASE_LAYER
    tokenizer_dir = resolve_tokenizer_dir(args.tokenizer_dir)

    root = Path(tempfile.mkdtemp(prefix="yuan-gguf-bench-"))
    try:
        start = time.perf_counter()
        gptq_folder = root / "gptq"
        gptq_bytes = write_release_checkpoint(gptq_folder, args.layers, tokenizer_dir, dims)
        gguf_file = root / "Yuan2-moe_int4.gguf"
        gguf_bytes = write_release_gguf(gguf_file, args.layers, tokenizer_dir, dims)
        print(f"checkpoints: {args.layers} {'toy' if args.tiny else 'release'}-sized layers; GPTQ "
              f"{gptq_bytes / 1e9:.2f} GB, GGUF {gguf_bytes / 1e9:.2f} GB (written in {time.perf_counter() - start:.0f}s)"
              f"; {torch.get_num_threads()} threads")
        baseline = psutil.Process().memory_info().rss
        results = [measure("GPTQ INT4 (group 128)", gptq_folder, args.contexts, args.steps, baseline),
                   measure("GGUF Q4_0 (group 32)", gguf_file, args.contexts, args.steps, baseline)]
    finally:
        shutil.rmtree(root, ignore_errors=True)

    rows = []
    for result in results:
        for context, figures in result["speed"].items():
            rows.append((result["label"], context, f"{figures['step_ms']:.1f}", f"{figures['per_layer_ms']:.2f}",
                         f"{figures['fixed_ms']:.1f}", f"{figures['projected_tokens_per_s']:.2f}"))
    print()
    print(format_table(rows, ("checkpoint", "context", f"step ms ({args.layers} layers)", "ms/layer", "fixed ms",
                              f"projected tok/s ({RELEASE_LAYERS} layers)")))
    rows = [(r["label"], f"{r['load_s']:.1f}", f"{r['rss_growth'] / 1e9:.2f}", f"{r['layer_bytes'] / 1e6:.0f}",
             f"{r['resident'] / 1e9:.2f}", r["precision"]) for r in results]
    print()
    print(format_table(rows, ("checkpoint", "load s", "RSS growth GB", "MB per layer",
                              f"projected resident GB ({RELEASE_LAYERS} layers)", "precision")))
    first = args.contexts[0]
    gptq_rate = results[0]["speed"][first]["projected_tokens_per_s"]
    gguf_rate = results[1]["speed"][first]["projected_tokens_per_s"]
    print(f"\nGGUF / GPTQ projected tokens/s at context {first}: {gguf_rate / gptq_rate:.2f}x; resident memory "
          f"{results[1]['resident'] / results[0]['resident']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
