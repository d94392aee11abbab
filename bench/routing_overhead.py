"""Cost of capturing expert routing during generation, on a tiny random Yuan2-M32 model, in one process.

Alternates generations with and without `capture_routing=True` (same prompt, greedy, same length) and prints the
median decode tokens/s of each and the ratio with/without (target >= 0.95, i.e. at most 5% slower), plus the
same for the whole call (which includes stacking the trace at the end).
Run: .venv/bin/python bench/routing_overhead.py [--tokens 96] [--rounds 5] [--int4]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from playground.manager import ModelManager  # noqa: E402
from playground.models.yuan.make_tiny import make_tiny_checkpoint  # noqa: E402

PROMPT = [{"role": "user", "content": "Explain in detail how a steam engine works, step by step."}]


def run(manager: ModelManager, tokens: int, capture: bool) -> tuple[float, float, int]:
    done = [e for e in manager.stream(messages=PROMPT, params={"temperature": 0, "max_new_tokens": tokens},
                                      capture_routing=capture) if e.kind == "done"][0]
    assert (done.routing is not None) == capture, "routing was not captured as asked"
    return done.stats.decode_tokens_per_s, done.stats.total_s, done.stats.new_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--int4", action="store_true", help="INT4 GPTQ layers instead of float")
    parser.add_argument("--tokenizer-dir", default=str(REPO.parent / "shared" / "yuan2-tokenizer"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_tiny_checkpoint(Path(tmp) / "tiny-yuan", int4=args.int4, tokenizer_dir=args.tokenizer_dir,
                                      hidden_size=128, attention_projection_size=256, num_attention_heads=2)
        manager = ModelManager()
        status = manager.load(folder)
        print(f"model: {status['name']} ({status['kind']}, {status['parameters'] / 1e6:.1f}M parameters, "
              f"{status['device']}), {args.tokens} new tokens, {args.rounds} rounds each")
        run(manager, 8, False)  # warm-up: first calls pay one-off costs
        run(manager, 8, True)
        results: dict[bool, list[tuple[float, float, int]]] = {False: [], True: []}
        for _ in range(args.rounds):
            for capture in (False, True):  # interleaved, so drift in machine load hits both alike
                results[capture].append(run(manager, args.tokens, capture))
    decode = {c: statistics.median(r[0] for r in rs) for c, rs in results.items()}
    total = {c: statistics.median(r[1] for r in rs) for c, rs in results.items()}
    new_tokens = {c: results[c][0][2] for c in results}
    print(f"without capture: {decode[False]:8.1f} tok/s decode, {total[False]:.3f} s per call ({new_tokens[False]} tokens)")
    print(f"with capture:    {decode[True]:8.1f} tok/s decode, {total[True]:.3f} s per call ({new_tokens[True]} tokens)")
    ratio = decode[True] / decode[False]
    print(f"decode ratio with/without: {ratio:.3f} (slowdown {(1 - ratio) * 100:+.1f}%; target <= 5%)")
    print(f"whole-call ratio without/with: {total[False] / total[True]:.3f}")


if __name__ == "__main__":
    main()
