"""What the generation thread hands the consumer, step by step, in memory that does not grow with the reply:

- `StepDistribution`: one step's next-token distribution, held on the device only until that step's token is known,
  then reduced to what is shown (the token's log-probability and the top-n);
- `TokenStreamer`: transformers' streamer that sends each token with those figures (one device transfer per token);
- `IncrementalText`: the reply's text, decoding only the newest tokens at each step.
"""

from __future__ import annotations

import math
import queue
import time

import torch
from transformers import LogitsProcessor
from transformers.generation.streamers import BaseStreamer

from playground.generation.events import TokenInfo


class StepDistribution:
    """The last step's log-probabilities (on the device), kept until `summary` takes them for the chosen token."""

    def __init__(self, top_n: int):
        self.top_n = top_n
        self.pending: torch.Tensor | None = None

    def record(self, logits: torch.Tensor) -> None:
        # float32 at least (a float64 model keeps its precision: the tests compare to 1e-9)
        self.pending = logits.detach().to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)

    def summary(self, token_id: int) -> torch.Tensor:
        """[the token's logprob, top_n logprobs, their ids] as one float64 row; NaN where nothing was recorded."""
        logprobs, self.pending = self.pending, None
        if logprobs is None:
            return torch.full((1 + 2 * self.top_n,), math.nan, dtype=torch.float64)
        values, ids = logprobs.topk(self.top_n)
        return torch.cat((logprobs[token_id].view(1), values, ids.to(values.dtype))).double()


class ProcessedDistribution(StepDistribution, LogitsProcessor):
    """Last in generate's processor list: sees the scores after temperature/top-k/top-p/min-p etc."""

    def __call__(self, input_ids, scores):
        self.record(scores[0])
        return scores


class RawDistribution(StepDistribution):
    """A forward hook on the output head: the model's raw next-token logits (the last position's)."""

    def __call__(self, module, inputs, output):
        self.record(output.reshape(-1, output.shape[-1])[-1])  # the head may be called on flattened rows


class TokenStreamer(BaseStreamer):
    """Hands each new token id, its arrival time and its recorded distributions' summaries to the consumer."""

    def __init__(self, distributions: list[StepDistribution] = ()):
        self.queue: queue.Queue = queue.Queue()
        self.distributions = list(distributions)
        self._prompt_seen = False

    def put(self, value):
        if not self._prompt_seen:  # generate's first put is the prompt
            self._prompt_seen = True
            return
        for token_id in value.reshape(-1).tolist():
            rows = [distribution.summary(token_id) for distribution in self.distributions]
            figures = torch.cat(rows).tolist() if rows else []  # one transfer for all of them
            self.queue.put((time.perf_counter(), int(token_id), figures))

    def end(self):
        self.queue.put(None)


def token_info(tokenizer, token_id: int, figures: list[float], top_n: int | None, greedy: bool = False) -> TokenInfo:
    """A token's details from the figures `TokenStreamer` sent: the raw distribution's, then the processed one's.

    `greedy`: the token was the processed distribution's argmax, chosen with certainty: its sampling distribution
    is all on it (p 1), whatever probability the scores gave it.
    """
    info = TokenInfo(id=token_id, text=tokenizer.decode([token_id]))
    if top_n is None:
        return info
    width = 1 + 2 * top_n
    for offset, value_attr, top_attr in ((0, "logprob", "top"), (width, "sampled_logprob", "sampled_top")):
        row = figures[offset:offset + width]
        if len(row) < width or math.isnan(row[0]):
            continue
        values, ids = row[1:1 + top_n], row[1 + top_n:]
        setattr(info, value_attr, row[0])
        setattr(info, top_attr, [(int(i), tokenizer.decode([int(i)]), v) for i, v in zip(ids, values)
                                 if v > float("-inf")])
    if greedy and info.sampled_logprob is not None:
        info.sampled_logprob, info.sampled_top = 0.0, [(token_id, info.text, 0.0)]
    return info


class IncrementalText:
    """The text of a growing list of tokens, decoding a few tokens per step instead of the whole list.

    The tokens already turned into text are decoded again only from the previous step's start, as context: that keeps
    leading spaces and characters split across tokens right (the offsets method of TGI's and vLLM's detokenizers).
    A step whose text ends inside a character adds nothing until the character completes.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool):
        self._decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        self.ids: list[int] = []
        self.text = ""
        self._prefix = 0  # where the context starts
        self._read = 0  # tokens before this are in `text`

    def add(self, token_id: int) -> None:
        self.ids.append(token_id)
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if after.endswith("\ufffd"):
            return
        if after.startswith(before):
            self.text += after[len(before):]
        else:  # a tokenizer whose pieces do not extend each other: decode it all (rare)
            self.text = self._decode(self.ids)
        self._prefix, self._read = self._read, len(self.ids)


__all__ = ["IncrementalText", "ProcessedDistribution", "RawDistribution", "StepDistribution", "TokenStreamer",
           "token_info"]
