"""What a JSON schema costs per token: decode tokens/s through the manager with and without a response format.

    .venv/bin/python bench/structured_output.py [--model DIR] [--tokens 128] [--rounds 3]

One process, the same prompt, sampling settings and seed, free and constrained rounds in turn (medians). The free
rounds generate exactly --tokens tokens (the end token is held off); the constrained rounds decode under a JSON
schema whose story must be longer than the reply can be, so they also run to --tokens with the grammar live at
every step. Also prints the time to compile
the schema (first time and from xgrammar's cache) and the time spent in the constraint per token (mask fill,
mask apply, stopping check). The last line (`RESULT ...`) gives the ratio constrained/free.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rate_setup import load_for_rates  # noqa: E402
from playground.params import SamplingParams  # noqa: E402
from playground.structured import GrammarConstraint, ResponseFormat  # noqa: E402

PROMPT = [{"role": "user", "content": "Write a long story about a lighthouse keeper, as JSON."}]


def story_format(tokens: int) -> ResponseFormat:
    """One string field that cannot close within `tokens` tokens (a token is at most a few dozen characters)."""
    return ResponseFormat.for_schema({
        "type": "object", "required": ["title", "story"],
        "properties": {"title": {"type": "string", "maxLength": 40},
                       "story": {"type": "string", "minLength": 40 * tokens}},
    }, name="story")


class ConstraintClock:
    """Seconds spent inside GrammarConstraint's processor and stopping check, wrapped around the class."""

    def __init__(self):
        self.seconds = 0.0
        self.calls = 0

    def wrap(self, name: str) -> None:
        original = getattr(GrammarConstraint, name)

        def timed(constraint, *args, **kwargs):
            started = time.perf_counter()
            try:
                return original(constraint, *args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started
                self.calls += name == "__call__"

        setattr(GrammarConstraint, name, timed)


def rate(manager, params: SamplingParams, response_format) -> float:
    result = manager.generate(messages=PROMPT, params=params, response_format=response_format)
    assert result.stats.new_tokens == params.max_new_tokens, result.stats
    return result.stats.decode_tokens_per_s


def paired_rounds(manager, params: SamplingParams, response_format, count: int) -> tuple[list[float], list[float]]:
    """Free and constrained rounds taken in turn, so a machine that gets busier slows both alike."""
    rate(manager, params, None), rate(manager, params, response_format)  # warm-up
    free, constrained = [], []
    for number in range(count):
        free.append(rate(manager, params, None))
        constrained.append(rate(manager, params, response_format))
        print(f"round {number + 1}: free {free[-1]:.2f} tok/s, json schema {constrained[-1]:.2f} tok/s", flush=True)
    return free, constrained


def main():
    args, manager, status, params = load_for_rates(__doc__)  # the free rounds run to the full count too
    response_format = story_format(args.tokens)

    structured = manager._backend.structured()
    started = time.perf_counter()
    structured.compile(response_format)
    first_compile = time.perf_counter() - started
    started = time.perf_counter()
    structured.compile(response_format)
    cached_compile = time.perf_counter() - started
    print(f"compile: first {first_compile * 1000:.1f} ms (includes the model's vocabulary, once per model), "
          f"cached {cached_compile * 1e6:.0f} us")

    clock = ConstraintClock()
    clock.wrap("__call__")
    clock.wrap("done")
    free, constrained = paired_rounds(manager, params, response_format, args.rounds)
    free_rate, constrained_rate = statistics.median(free), statistics.median(constrained)
    per_token_ms = clock.seconds / max(1, clock.calls) * 1000
    print(f"free        : {free_rate:8.2f} tok/s")
    print(f"json schema : {constrained_rate:8.2f} tok/s   constraint {per_token_ms:.3f} ms per token "
          f"({clock.calls} steps measured)")
    ratio = constrained_rate / free_rate
    print(f"RESULT structured output on {status['name']}: {constrained_rate:.2f} tok/s under a JSON schema vs "
          f"{free_rate:.2f} tok/s free, ratio {ratio:.3f} (time per token {(1 / ratio - 1) * 100:+.1f} %; "
          f"the constraint itself {per_token_ms:.3f} ms/token)")


if __name__ == "__main__":
    main()
