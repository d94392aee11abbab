"""The insight views' data: explorer distributions and cuts, the token inspector, expert routing on a tiny Yuan."""

from __future__ import annotations

import math

import pytest
import torch

from playground.insight import (
    alternatives_frame,
    distributions,
    expert_load_frame,
    explore_distribution,
    for_people,
    mean_logprob,
    readable,
    routing_heatmap_html,
    routing_to_state,
    tokens_html,
    tokens_to_state,
)
from playground.manager import ModelManager
from playground.models.yuan.make_tiny import make_tiny_checkpoint
from playground.params import SamplingParams
from tests.conftest import YUAN_TOKENIZER_DIR


class FakeTokenizer:
    def decode(self, ids):
        return "".join(f"<t{i}>" for i in ids)


@pytest.fixture()
def logits():
    torch.manual_seed(0)
    return torch.randn(1000) * 3  # no ties


def kept_ids(frame):
    return set(frame.loc[~frame["cut"], "id"])


@pytest.mark.parametrize("params", [
    SamplingParams(), SamplingParams(temperature=1.3, top_k=0, top_p=1.0), SamplingParams(temperature=0),
    SamplingParams(temperature=0.5, top_k=7, top_p=0.5, min_p=0.1, repetition_penalty=1.5),
])
def test_explorer_distributions_sum_to_one(logits, params):
    model_probs, sampled = distributions(logits, [3, 5, 8], params)
    assert model_probs.sum().item() == pytest.approx(1, abs=1e-5)
    assert sampled.sum().item() == pytest.approx(1, abs=1e-5)
    assert torch.allclose(model_probs, logits.softmax(-1))


def test_top_k_leaves_exactly_k_uncut(logits):
    frame = explore_distribution(logits, [1], SamplingParams(temperature=1.0, top_k=3, top_p=1.0), FakeTokenizer(), 20)
    assert len(frame) == 20 and (~frame["cut"]).sum() == 3
    assert kept_ids(frame) == set(logits.topk(3).indices.tolist())
    assert frame.loc[~frame["cut"], "sampled p"].sum() == pytest.approx(1, abs=1e-5)
    assert list(frame["model p"]) == sorted(frame["model p"], reverse=True)


def test_top_p_cut_set_matches_a_direct_computation(logits):
    top_p, temperature = 0.8, 0.9
    frame = explore_distribution(logits, [1], SamplingParams(temperature=temperature, top_k=0, top_p=top_p),
                                 FakeTokenizer(), 50)
    probs = (logits / temperature).softmax(-1)
    order = probs.argsort(descending=True)
    # a token is kept when the tokens more likely than it hold less than top_p of the mass
    mass_before = torch.cumsum(probs[order], 0) - probs[order]
    expected = {int(i) for i, before in zip(order.tolist(), mass_before.tolist()) if before < top_p}
    shown = set(frame["id"])
    assert kept_ids(frame) == expected & shown and len(expected) < 50


def test_min_p_greedy_and_repetition_penalty(logits):
    frame = explore_distribution(logits, [1], SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.2),
                                 FakeTokenizer(), 30)
    probs = logits.softmax(-1)
    assert kept_ids(frame) == {int(i) for i in torch.nonzero(probs >= 0.2 * probs.max()).flatten()}
    greedy = explore_distribution(logits, [1], SamplingParams(temperature=0), FakeTokenizer(), 10)
    assert (~greedy["cut"]).sum() == 1 and greedy.iloc[0]["sampled p"] == 1.0
    top = int(logits.argmax())
    # a strong penalty on the top token (the prompt contains it) hands greedy to the runner-up
    penalised = explore_distribution(logits, [top], SamplingParams(temperature=0, repetition_penalty=10.0),
                                     FakeTokenizer(), 10)
    runner_up = logits.topk(2).indices[1].item()
    assert penalised.loc[~penalised["cut"], "id"].tolist() == [runner_up]
    assert penalised.iloc[0]["id"] == top and penalised.iloc[0]["cut"]  # ranked by the model's own probability


def test_explorer_labels_sort_in_rank_order(logits):
    # The chart sorts its bars by label (its sort never changes, see ui/explorer.py): ranks are zero-padded.
    frame = explore_distribution(logits, [1], SamplingParams(), FakeTokenizer(), 12)
    assert list(frame["label"]) == sorted(frame["label"]) and frame["label"].iloc[9].startswith("10. ")


def test_numbers_are_shown_to_three_significant_digits(logits):
    shown = {0.3636457920074463: "0.364", 11.03: "11", 1234.5: "1230", 9.996: "10", -1.23456: "-1.23",
             0.000012345: "1.23e-05", 64.0: "64", 1234: "1234", 0.0: "0", float("nan"): "", None: ""}
    assert {value: for_people(value) for value in shown} == shown
    frame = explore_distribution(logits, [1], SamplingParams(), FakeTokenizer(), 5)
    styled = readable(frame[["rank", "token", "model p"]])
    assert styled.data["model p"].tolist() == frame["model p"].tolist()  # the data keep their precision
    html = styled.to_html()
    assert f">{for_people(frame['model p'][0])}<" in html and f"{frame['model p'][0]!r}" not in html


def test_mean_logprob_skips_tokens_without_one():
    assert mean_logprob([{"logprob": -1.0}, {"logprob": None}, {"logprob": -2.0}]) == -1.5
    assert mean_logprob([{"logprob": None}]) is None and mean_logprob([]) is None


def test_token_html_escapes_and_colours():
    tokens = [{"id": 1, "text": "<script>alert('x')</script>&", "logprob": -0.1, "sampled_logprob": -0.05,
               "top": [], "sampled_top": []}, {"id": 2, "text": "\n", "logprob": None, "sampled_logprob": None}]
    page = tokens_html(tokens)
    assert "<script>" not in page and "&lt;script&gt;" in page and "&amp;" in page
    assert page.count('class="insight-token"') == 2 and "↵" in page


# ------------------------------------------------------------------------------------ a tiny Yuan model


@pytest.fixture(scope="module")
def yuan(tmp_path_factory):
    folder = make_tiny_checkpoint(tmp_path_factory.mktemp("yuan-insight") / "tiny", int4=False,
                                  tokenizer_dir=YUAN_TOKENIZER_DIR, hidden_size=128, attention_projection_size=256,
                                  num_attention_heads=2)
    manager = ModelManager()
    manager.load(folder)
    yield manager
    manager.close()


MESSAGES = [{"role": "user", "content": "Tell me about <b>bold</b> experts & routers"}]


def test_inspector_tokens_match_the_full_distributions(yuan):
    params = SamplingParams(temperature=0.9, top_k=3, top_p=1.0, max_new_tokens=6, seed=7)
    result = yuan.generate(messages=MESSAGES, params=params, logprobs=5)
    tokens = tokens_to_state(result.tokens)
    assert len(tokens) == result.stats.new_tokens > 0
    prompt_ids, logits = yuan.next_token_logits(messages=MESSAGES)
    model_probs, sampled_probs = distributions(logits, prompt_ids, params)
    first = tokens[0]
    # the first token's recorded top lists are the top of the full distributions of the same prompt
    raw_top = model_probs.topk(5)
    assert [i for i, _, _ in first["top"]] == raw_top.indices.tolist()
    assert [math.exp(lp) for _, _, lp in first["top"]] == pytest.approx(raw_top.values.tolist(), rel=1e-3)
    sampled_top = sampled_probs.topk(3)
    assert [i for i, _, _ in first["sampled_top"]] == sampled_top.indices.tolist()
    for token in tokens:
        raw = [math.exp(lp) for _, _, lp in token["top"]]
        sampled = [math.exp(lp) for _, _, lp in token["sampled_top"]]
        assert raw == sorted(raw, reverse=True) and sum(raw) <= 1 + 1e-5
        assert len(sampled) == 3 and sum(sampled) == pytest.approx(1, abs=1e-4)  # top_k=3: all the mass
        assert token["id"] in [i for i, _, _ in token["sampled_top"]]
        frame = alternatives_frame(token)
        assert frame["sampled chosen"].sum() == 1 and list(frame["rank"]) == list(range(1, len(frame) + 1))


def test_routing_matches_the_model_router_outputs(yuan):
    events = list(yuan.stream(messages=MESSAGES, params={"temperature": 0, "max_new_tokens": 8}, capture_routing=True))
    routing = events[-1].routing
    loaded = yuan.loaded
    layers, top_k = loaded.model.config.num_hidden_layers, loaded.model.config.num_experts_per_tok
    assert routing.experts.shape == (layers, len(routing.token_ids), top_k)
    with torch.inference_mode():
        out = loaded.model(input_ids=torch.tensor([routing.token_ids]), output_router_logits=True)
    for layer, router_logits in enumerate(out.router_logits):
        weights, experts = router_logits[0].float().softmax(-1).topk(top_k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        assert torch.equal(routing.experts[layer], experts)
        assert torch.allclose(routing.weights[layer].float(), weights, atol=1e-4)
    state = routing_to_state(routing, loaded.tokenizer)
    reply_tokens = len(routing.token_ids) - routing.prompt_tokens
    assert len(state["tokens"]) == reply_tokens and len(state["experts"][0]) == reply_tokens
    load = expert_load_frame(state)
    assert len(load) == layers * state["num_experts"]
    assert (load.groupby("layer")["tokens"].sum() == reply_tokens * top_k).all()
    assert load.groupby("layer")["share"].sum().tolist() == pytest.approx([1.0] * layers)
    page = routing_heatmap_html(state)
    assert page.count("<tr>") == reply_tokens + 1 and "E0" in page
