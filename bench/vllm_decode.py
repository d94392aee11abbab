"""Yuan2-M32 INT4 decode on vLLM with the plugin: batch 1 and batch 16, release-sized layers, projected to 24 layers.

Prepared for a lent GPU (vLLM's CUDA build and `pip install ./vllm_yuan` there); it also runs on vLLM's CPU build.

    # 1. a synthetic checkpoint in the release layout, with the playground's venv (byte-split GPTQ parts):
    .venv/bin/python bench/int4_cpu_decode.py --layers 4 --keep /data/yuan4 --steps 2
    # 2. the measurement, with vLLM's interpreter:
    python bench/vllm_decode.py --model /data/yuan4 [--batches 1 16] [--new-tokens 64] [--prompt-tokens 128]

Each layer count is measured in a fresh process (`--hf-overrides num_hidden_layers=K` loads the first K layers):
1 and the folder's count. A decode step is (time for 1 + T new tokens - time for 1) / T with `ignore_eos`, so
prefill is left out; 24-layer figures extrapolate the per-layer cost. Printed: per batch and layer count, the
step time and tokens/s, then the projection to the release's 24 layers. One run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

RELEASE_LAYERS = 24


def measure(args: argparse.Namespace, layers: int) -> dict[int, float]:
    """Decode step seconds per batch size with the folder's first `layers` layers (run in this process)."""
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    on_gpu = torch.cuda.is_available()
    llm = LLM(model=str(args.model), tokenizer_mode="yuan", quantization="gptq", load_format="yuan", dtype=args.dtype,
              hf_overrides={"num_hidden_layers": layers}, max_model_len=args.prompt_tokens + args.new_tokens + 16,
              max_num_seqs=max(args.batches), enforce_eager=not on_gpu, seed=0)
    rng = random.Random(0)
    steps = {}
    for batch in args.batches:
        prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(100, 130000) for _ in range(args.prompt_tokens)])
                   for _ in range(batch)]

        def timed(new_tokens: int) -> float:
            params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
            start = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            return time.perf_counter() - start

        timed(2)  # warm-up
        prefill = min(timed(1) for _ in range(2))
        steps[batch] = (timed(1 + args.new_tokens) - prefill) / args.new_tokens
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path, help="a release-layout INT4 folder")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--dtype", default="float16", help="the release's INT4 path computes in fp16")
    parser.add_argument("--measure", type=int, help=argparse.SUPPRESS)  # internal: one layer count, JSON out
    args = parser.parse_args()

    if args.measure is not None:
        print("RESULT " + json.dumps(measure(args, args.measure)), flush=True)
        return

    folder_layers = json.loads((args.model / "config.json").read_text())["num_hidden_layers"]
    counts = sorted({1, folder_layers})
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    results: dict[int, dict[int, float]] = {}
    for count in counts:
        run = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--measure", str(count)], env=env,
                             capture_output=True, text=True)
        lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
        if run.returncode or not lines:
            sys.exit(f"{count} layers: vLLM failed ({run.returncode}):\n{run.stderr[-4000:]}")
        results[count] = {int(batch): step for batch, step in json.loads(lines[-1][7:]).items()}

    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"Yuan2-M32 INT4 layers on vLLM ({device}), prompt {args.prompt_tokens} tokens, {args.new_tokens} decode "
          f"steps, dtype {args.dtype}")
    print(f"{'layers':>6} {'batch':>5} {'step ms':>9} {'tok/s':>9}")
    for count in counts:
        for batch, step in results[count].items():
            print(f"{count:>6} {batch:>5} {step * 1e3:>9.2f} {batch / step:>9.1f}")
    if len(counts) == 2:
        low, high = counts
        for batch in args.batches:
            per_layer = (results[high][batch] - results[low][batch]) / (high - low)
            step = results[low][batch] + per_layer * (RELEASE_LAYERS - low)
            print(f"projected to {RELEASE_LAYERS} layers, batch {batch}: {step * 1e3:.1f} ms per step, "
                  f"{batch / step:.1f} tok/s ({per_layer * 1e3:.2f} ms per layer)")


if __name__ == "__main__":
    main()
