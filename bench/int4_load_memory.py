"""Peak memory while loading an INT4 Yuan2 checkpoint, against the checkpoint's packed size.

    python bench/int4_load_memory.py [--gb 2.5] [--tokenizer-dir DIR] [--keep DIR]

Writes a synthetic INT4 checkpoint shaped like the release (hidden 2048, 16 heads x 256, 32 experts of 8192, the
padded 135040 vocabulary; as many layers as fit the size asked for) as byte-split parts in a temporary folder, loads
it with `load_yuan` on the CPU in a fresh Python process, and reports that process's peak RSS above its RSS just
before loading (imports done). Target: at most 1.3 x the packed weights. The folder is deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from playground.models.yuan.configuration_yuan import YuanConfig  # noqa: E402
from playground.models.yuan.gptq import GPTQSettings  # noqa: E402
from playground.models.yuan.loading import build_model_skeleton  # noqa: E402
from playground.models.yuan.make_tiny import (  # noqa: E402
    INT4_WEIGHTS_NAME,
    resolve_tokenizer_dir,
    tiny_config_dict,
    write_folder_files,
    write_safetensors,
)

RELEASE_LAYER = dict(
    vocab_size=135040,
    hidden_size=2048,
    num_attention_heads=16,
    attention_projection_size=4096,
    num_experts=32,
    top_k=2,
    ffn_hidden_size=8192,
    max_position_embeddings=4096,
)

CHILD = r"""
import json, resource, sys, time
import psutil
import torch
from playground.models.yuan import load_yuan

process = psutil.Process()
before = process.memory_info().rss
start = time.perf_counter()
model, tokenizer = load_yuan(sys.argv[1])
seconds = time.perf_counter() - start
after = process.memory_info().rss
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
held = sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in model.state_dict().values()}.values())
print(json.dumps({"before": before, "after": after, "peak": peak, "seconds": seconds, "held": held}))
"""


def _specs(config: YuanConfig, gptq: GPTQSettings) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    skeleton = build_model_skeleton(config, gptq)
    specs = []
    for name, tensor in skeleton.state_dict(keep_vars=True).items():
        dtype = tensor.dtype if tensor.dtype in (torch.int32, torch.float16) else torch.float16
        specs.append((name, dtype, tuple(tensor.shape)))
    return specs


def _produce(name: str, specs: dict) -> torch.Tensor:
    dtype, shape = specs[name]
    # The release stores lm_head equal to the tied embedding: same seed, same values.
    seed = 0 if name in ("lm_head.weight", "model.embed_tokens.weight") else zlib.crc32(name.encode())
    generator = torch.Generator().manual_seed(seed)
    if name.endswith(".qweight"):
        return torch.randint(-(2**31), 2**31 - 1, shape, dtype=torch.int32, generator=generator)
    if name.endswith(".qzeros"):
        return torch.full(shape, 0x77777777, dtype=torch.int32)  # symmetric: zero-point 8 stored as 7
    if name.endswith(".g_idx"):
        return (torch.arange(shape[0]) // 128).to(torch.int32)
    if name.endswith(".scales"):
        return (torch.rand(shape, generator=generator) * 1e-3 + 1e-3).to(torch.float16)
    return (torch.randn(shape, generator=generator) * 0.02).to(torch.float16)


def write_checkpoint(folder: Path, target_gb: float, tokenizer_dir: Path) -> tuple[Path, int, int]:
    gptq = GPTQSettings()
    one_layer = YuanConfig(**tiny_config_dict(int4=True, num_hidden_layers=1, **RELEASE_LAYER))
    two_layers = YuanConfig(**tiny_config_dict(int4=True, num_hidden_layers=2, **RELEASE_LAYER))
    size = lambda specs: sum(math.prod(s) * torch.empty(0, dtype=d).element_size() for _, d, s in specs)  # noqa: E731
    per_layer = size(_specs(two_layers, gptq)) - size(_specs(one_layer, gptq))
    fixed = size(_specs(one_layer, gptq)) - per_layer
    layers = max(1, round((target_gb * 1e9 - fixed) / per_layer))

    config_dict = tiny_config_dict(int4=True, num_hidden_layers=layers, **RELEASE_LAYER)
    write_folder_files(folder, config_dict, tokenizer_dir, gptq)
    specs = _specs(YuanConfig(**config_dict), gptq)
    by_name = {name: (dtype, shape) for name, dtype, shape in specs}
    parts = write_safetensors(specs, lambda name: _produce(name, by_name), folder, INT4_WEIGHTS_NAME, parts=3)
    return folder, layers, sum(p.stat().st_size for p in parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=2.5, help="approximate checkpoint size (default 2.5)")
    parser.add_argument("--tokenizer-dir", type=Path, default=None)
    parser.add_argument("--keep", type=Path, default=None, help="write the checkpoint here and keep it")
    args = parser.parse_args()

    folder = args.keep or Path(tempfile.mkdtemp(prefix="yuan-int4-bench-"))
    try:
        start = time.perf_counter()
        folder, layers, packed = write_checkpoint(folder, args.gb, resolve_tokenizer_dir(args.tokenizer_dir))
        print(f"checkpoint: {layers} release-sized layers, 3 byte-split parts, {packed / 1e9:.2f} GB packed "
              f"(written in {time.perf_counter() - start:.0f}s)")
        result = subprocess.run(
            [sys.executable, "-c", CHILD, str(folder)], cwd=REPO_ROOT, capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            print(result.stderr, file=sys.stderr)
            return result.returncode
        stats = json.loads(result.stdout.strip().splitlines()[-1])
        peak_increase = stats["peak"] - stats["before"]
        print(f"load_yuan on CPU took {stats['seconds']:.1f}s; model tensors held: {stats['held'] / 1e9:.2f} GB "
              f"(embedding and LFA in float32)")
        print(f"RSS before load {stats['before'] / 1e9:.2f} GB, after {stats['after'] / 1e9:.2f} GB, "
              f"peak {stats['peak'] / 1e9:.2f} GB")
        print(f"peak increase while loading: {peak_increase / 1e9:.2f} GB vs packed size {packed / 1e9:.2f} GB "
              f"-> ratio {peak_increase / packed:.2f} (target <= 1.30)")
        return 0 if peak_increase <= 1.3 * packed else 1
    finally:
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
