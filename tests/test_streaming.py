"""What the generation thread hands the consumer: text decoded a few tokens at a time, per-step figures that are
not kept once their token is known."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoTokenizer

from playground.embedded import ensure_converted
from playground.generation.streaming import IncrementalText, StepDistribution, TokenStreamer, token_info
from playground.models.yuan.tokenization_yuan import load_yuan_tokenizer
from tests.conftest import YUAN_TOKENIZER_DIR

TEXT = ("Grüße aus Köln! 你好，世界。Emoji: 🤖🎨 — «quotes» and code:\n    def f(x):\n        return x ** 2\n"
        "Línea con acentos: árbol, pingüino. 東京タワーは高い。 Done.")


@pytest.fixture(scope="module", params=["smollm2", "yuan"])
def tokenizer_and_special(request):
    if request.param == "smollm2":
        return AutoTokenizer.from_pretrained(ensure_converted()), True
    return load_yuan_tokenizer(YUAN_TOKENIZER_DIR), False  # Yuan's chat format reads its special tokens


def test_incremental_text_is_the_whole_decode_at_every_step(tokenizer_and_special):
    tokenizer, skip_special = tokenizer_and_special
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    text = IncrementalText(tokenizer, skip_special)
    for count, token_id in enumerate(ids, 1):
        text.add(token_id)
        whole = tokenizer.decode(ids[:count], skip_special_tokens=skip_special)
        # Always a prefix of the whole decode; behind it only while a character is incomplete.
        assert whole.startswith(text.text)
        assert text.text == whole or whole.endswith("\ufffd") or "\ufffd" in whole[len(text.text):]
    assert text.text == tokenizer.decode(ids, skip_special_tokens=skip_special)


def test_incremental_text_of_random_tokens_ends_as_the_whole_decode(tokenizer_and_special):
    """Tokens in no sensible order (what a sampled reply at high temperature can be): the end result still agrees."""
    tokenizer, skip_special = tokenizer_and_special
    rng = random.Random(0)
    ids = [rng.randrange(len(tokenizer)) for _ in range(300)]
    text = IncrementalText(tokenizer, skip_special)
    for token_id in ids:
        text.add(token_id)
    whole = tokenizer.decode(ids, skip_special_tokens=skip_special)
    assert whole.startswith(text.text) and len(whole) - len(text.text) <= 4


def test_a_step_distribution_is_dropped_once_summarised():
    logits = torch.tensor([2.0, 0.5, -1.0, float("-inf"), 1.0])
    step = StepDistribution(top_n=3)
    step.record(logits)
    row = step.summary(token_id=4)
    assert step.pending is None  # nothing of the vocabulary-sized vector stays
    expected = logits.log_softmax(-1)
    assert row[0].item() == pytest.approx(expected[4].item())
    assert row[1:4].tolist() == pytest.approx(expected.topk(3).values.tolist())
    assert row[4:].tolist() == [0.0, 4.0, 1.0]
    nothing = StepDistribution(top_n=2).summary(token_id=0)
    assert nothing.isnan().all()  # the hook never fired: no figures, not stale ones


def test_the_streamer_sends_each_token_with_both_summaries():
    class Named:
        def decode(self, ids):
            return f"<{ids[0]}>"

    raw, processed = StepDistribution(2), StepDistribution(2)
    streamer = TokenStreamer([raw, processed])
    streamer.put(torch.tensor([[7, 8, 9]]))  # the prompt: ignored
    raw.record(torch.tensor([0.0, 3.0, 1.0]))
    processed.record(torch.tensor([float("-inf"), 3.0, float("-inf")]))
    streamer.put(torch.tensor([1]))
    streamer.end()
    stamp, token_id, figures = streamer.queue.get()
    assert streamer.queue.get() is None and token_id == 1
    info = token_info(Named(), token_id, figures, top_n=2)
    assert info.text == "<1>" and info.sampled_logprob == 0.0
    assert [i for i, _, _ in info.top] == [1, 2] and info.logprob < 0
    assert info.sampled_top == [(1, "<1>", 0.0)]  # a token the settings ruled out is not an alternative


def test_a_greedy_token_reads_as_chosen_with_certainty(tokenizer_and_special):
    """Under greedy decoding the sampling distribution is all on the chosen token, whatever its score's softmax."""
    tokenizer, _ = tokenizer_and_special
    raw = StepDistribution(top_n=3)
    processed = StepDistribution(top_n=3)
    logits = torch.tensor([0.0, 1.0, 0.5, 0.9])
    raw.record(logits)
    processed.record(logits)
    figures = torch.cat([raw.summary(1), processed.summary(1)]).tolist()
    sampled = token_info(tokenizer, 1, figures, 3)
    greedy = token_info(tokenizer, 1, figures, 3, greedy=True)
    assert sampled.sampled_logprob < -0.5 and greedy.logprob == sampled.logprob  # the model's own figures stay
    assert greedy.sampled_logprob == 0.0 and [i for i, _, _ in greedy.sampled_top] == [1]


def test_the_stats_line_counts_in_words_and_says_how_long_the_queue_took():
    from playground.generation.events import GenerationStats

    one = GenerationStats(prompt_tokens=1, new_tokens=1, queue_wait_s=0.1).summary()
    assert one.startswith("1 token ·") and "prompt 1 token ·" in one and "queue" not in one
    waited = GenerationStats(prompt_tokens=5, new_tokens=2, queue_wait_s=20.04, time_to_first_token_s=1.07).summary()
    assert "2 tokens" in waited and "waited 20.0 s in the queue · first token after 1.07 s" in waited
