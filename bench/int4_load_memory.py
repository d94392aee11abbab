"""Peak memory while loading an INT4 Yuan2 checkpoint, against the checkpoint's packed size.

    python bench/int4_load_memory.py [--gb 2.5] [--tokenizer-dir DIR] [--keep DIR]

Writes a synthetic INT4 checkpoint shaped like the release (`synthetic_release.py`: hidden 2048, 16 heads x 256,
32 experts of 8192, the padded 135040 vocabulary; as many layers as fit the size asked for) as byte-split parts in a
temporary folder, loads it with `load_yuan` on the CPU with the defaults (each GPTQ layer converted to the int4
kernel's layout as it is read) in a fresh Python process, and reports that process's peak RSS above its RSS just
before loading (imports done). Target: at most 1.3 x the packed weights. The folder is deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from synthetic_release import REPO_ROOT, layer_count_for, write_release_checkpoint

sys.path.insert(0, str(REPO_ROOT))
from playground.models.yuan.make_tiny import resolve_tokenizer_dir  # noqa: E402

CHILD = r"""
import json, resource, sys, time
import psutil
sys.path.insert(0, sys.argv[2])
from synthetic_release import tensor_bytes
from playground.models.yuan import load_yuan

process = psutil.Process()
before = process.memory_info().rss
start = time.perf_counter()
model, tokenizer = load_yuan(sys.argv[1])
seconds = time.perf_counter() - start
after = process.memory_info().rss
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
print(json.dumps({"before": before, "after": after, "peak": peak, "seconds": seconds, "held": tensor_bytes(model),
                  "precision": model.compute_precision.describe()}))
"""


def write_checkpoint(folder: Path, target_gb: float, tokenizer_dir: Path) -> tuple[Path, int, int]:
    layers = layer_count_for(target_gb)
    return folder, layers, write_release_checkpoint(folder, layers, tokenizer_dir)


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
            [sys.executable, "-c", CHILD, str(folder), str(Path(__file__).parent)], cwd=REPO_ROOT,
            capture_output=True, text=True, check=False,
        )
        if result.returncode != 0:
            print(result.stderr, file=sys.stderr)
            return result.returncode
        stats = json.loads(result.stdout.strip().splitlines()[-1])
        peak_increase = stats["peak"] - stats["before"]
        print(f"load_yuan on CPU took {stats['seconds']:.1f}s ({stats['precision']}); model tensors held: "
              f"{stats['held'] / 1e9:.2f} GB")
        print(f"RSS before load {stats['before'] / 1e9:.2f} GB, after {stats['after'] / 1e9:.2f} GB, "
              f"peak {stats['peak'] / 1e9:.2f} GB; kept after loading {(stats['after'] - stats['before']) / 1e9:.2f} GB "
              f"for {stats['held'] / 1e9:.2f} GB of tensors")
        print(f"peak increase while loading: {peak_increase / 1e9:.2f} GB vs packed size {packed / 1e9:.2f} GB "
              f"-> ratio {peak_increase / packed:.2f} (target <= 1.30)")
        return 0 if peak_increase <= 1.3 * packed else 1
    finally:
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
