"""Manager streaming path vs raw `model.generate`, in one process, same prompt, settings and seed.

Prints tokens/s and time to first token for both and the ratio manager/raw (target >= 0.97).
Run: .venv/bin/python bench/stream_overhead.py [--model DIR] [--tokens 128] [--rounds 3]
"""

from __future__ import annotations

import statistics
import sys
import threading
import time
from pathlib import Path

import torch
from transformers.generation.streamers import BaseStreamer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rate_setup import load_for_rates  # noqa: E402
from playground.params import SamplingParams  # noqa: E402

PROMPT = [{"role": "user", "content": "Explain in detail how a steam engine works."}]


class FirstTokenClock(BaseStreamer):
    """Timestamps the first new token of a raw generate call (the same information the manager reports)."""

    def __init__(self):
        self.calls = 0
        self.first = None

    def put(self, value):
        self.calls += 1
        if self.calls == 2 and self.first is None:
            self.first = time.perf_counter()

    def end(self):
        pass


def run_raw(loaded, params: SamplingParams):
    text = loaded.chat_format.build_prompt(PROMPT)
    ids = loaded.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    clock = FirstTokenClock()
    started = time.perf_counter()
    with torch.inference_mode():
        torch.manual_seed(params.seed)
        out = loaded.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), streamer=clock,
            logits_processor=params.logits_warpers(), pad_token_id=loaded.tokenizer.pad_token_id,
            **params.generate_kwargs(),
        )
    finished = time.perf_counter()
    new = out.shape[1] - ids.shape[1]
    return new, clock.first - started, (new - 1) / (finished - clock.first), loaded.tokenizer.decode(out[0, ids.shape[1]:])


def run_manager(manager, params: SamplingParams):
    result = manager.generate(messages=PROMPT, params=params)
    s = result.stats
    return s.new_tokens, s.time_to_first_token_s, s.decode_tokens_per_s, result.text


def main():
    args, manager, status, params = load_for_rates(__doc__)
    loaded = manager.loaded
    # The raw rounds run on a thread of their own that ends before the manager's rounds. Two live threads that both
    # run PyTorch's parallel CPU kernels (this one and the manager's generation thread) each keep an OpenMP team,
    # and with more team threads than cores both slow down by a third: the bench would measure that, not the manager.
    raw_rows, manager_rows = [], []

    def raw_block():
        run_raw(loaded, params)  # warm-up
        for round_number in range(args.rounds):
            raw_rows.append(run_raw(loaded, params))
            print(f"raw     round {round_number + 1}: {raw_rows[-1][2]:.2f} tok/s")

    raw_thread = threading.Thread(target=raw_block)
    raw_thread.start()
    raw_thread.join()
    run_manager(manager, params)  # warm-up
    for round_number in range(args.rounds):
        manager_rows.append(run_manager(manager, params))
        print(f"manager round {round_number + 1}: {manager_rows[-1][2]:.2f} tok/s")
    assert raw_rows[0][0] == manager_rows[0][0] == args.tokens, "both paths must generate the same number of tokens"
    same_text = raw_rows[0][3].replace("<|im_end|>", "").strip() == manager_rows[0][3].strip()
    raw_rate = statistics.median(r[2] for r in raw_rows)
    manager_rate = statistics.median(r[2] for r in manager_rows)
    raw_ttft = statistics.median(r[1] for r in raw_rows)
    manager_ttft = statistics.median(r[1] for r in manager_rows)
    print(f"raw generate : {raw_rate:8.2f} tok/s   time to first token {raw_ttft * 1000:7.1f} ms")
    print(f"manager      : {manager_rate:8.2f} tok/s   time to first token {manager_ttft * 1000:7.1f} ms")
    print(f"same text from both paths (same seed): {same_text}")
    ratio = manager_rate / raw_rate
    print(f"ratio manager/raw: {ratio:.3f}  (target >= 0.97: {'met' if ratio >= 0.97 else 'MISSED'})")


if __name__ == "__main__":
    main()
