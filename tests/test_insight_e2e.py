"""The insight views through the launched app (real embedded SmolLM2) with gradio_client."""

from __future__ import annotations

import pandas as pd
import pytest
from gradio_client import Client

from harness import chat_call

pytestmark = pytest.mark.slow

GREEDY = dict(temperature=0.0, max_new_tokens=12, seed=1)
# explorer settings: temperature, top_k, top_p, min_p, repetition_penalty, tokens shown
EXPLORE = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0, top_n=20)


def frame(table) -> pd.DataFrame:
    return pd.DataFrame(table["data"], columns=table["headers"])


@pytest.fixture()
def client(launched_server):
    return Client(launched_server.url, verbose=False)


def test_inspect_a_chat_reply_token_by_token(client):
    heading, *_ = client.predict("Chat reply", 0, api_name="/insight_inspect")
    assert "No chat replies to inspect yet" in heading
    client.predict(**chat_call("What is the capital of France?", **GREEDY), api_name="/chat")
    heading, view, tokens, alternatives, heatmap, load, routing_note = client.predict(
        "Chat reply", 0, api_name="/insight_inspect")
    tokens = frame(tokens)
    assert heading.startswith(f"**Chat reply 1**: {len(tokens)} tokens") and 3 <= len(tokens) <= 12
    assert view.count('class="insight-token"') == len(tokens) and "Paris" in "".join(tokens["token"])
    greedy = frame(alternatives)
    # greedy: the chosen token is the model's most likely one, and it was chosen with certainty (sampled p 1), whatever
    # its model probability; the sampling side lists only it, the rest of its column blank (not NaN)
    assert greedy.iloc[0]["model chosen"] and greedy.iloc[0]["sampled chosen"]
    assert list(tokens["sampled p"]) == [1.0] * len(tokens) and (tokens["model p"] < 1).any()
    assert list(greedy["sampled token"][1:]) == [""] * (len(greedy) - 1)
    table, line = client.predict(3, api_name="/insight_token")
    assert line.startswith("Token 3:") and len(frame(table)) == 5
    assert "⚠️" in client.predict(99, api_name="/insight_token")[1]
    assert "There is no chat reply 4" in client.predict("Chat reply", 4, api_name="/insight_inspect")[0]
    # the routing panel says why it is off for a dense model
    assert "Expert routing is off" in routing_note and "SmolLM2" in routing_note and heatmap == ""


def test_explorer_draws_redraws_and_appends(client):
    text = client.predict("Write a short poem about the sea.", api_name="/explore_chat_prompt")
    assert "<|im_start|>assistant" in text
    chart, table, choice, summary = client.predict(text, **EXPLORE, api_name="/explore")
    first = frame(table)
    assert len(first) == 20 and set(first["status"]) == {"kept"}  # no cuts at temperature 1, all off
    assert list(first["model p"]) == sorted(first["model p"], reverse=True) and first["model p"].sum() <= 1
    # a setting change redraws from the same forward pass: top_k=3 leaves exactly three
    _, table, _, summary = client.predict(**{**EXPLORE, "top_k": 3}, api_name="/explore_redraw")
    redrawn = frame(table)
    assert (redrawn["status"] == "kept").sum() == 3 and list(redrawn["id"]) == list(first["id"])
    assert redrawn.loc[redrawn["status"] == "kept", "sampled p"].sum() == pytest.approx(1, abs=1e-4)
    assert "3 of the top 20 tokens are kept" in summary
    _, table, _, _ = client.predict(**{**EXPLORE, "temperature": 0.0}, api_name="/explore_redraw")
    assert (frame(table)["status"] == "kept").sum() == 1  # greedy
    appended = client.predict(int(first.iloc[0]["id"]), api_name="/explore_append")
    assert appended.startswith(text) and len(appended) > len(text)
    _, table, _, _ = client.predict(appended, **EXPLORE, api_name="/explore")
    assert list(frame(table)["id"]) != list(first["id"])
    _, _, _, summary = client.predict("   ", **EXPLORE, api_name="/explore")
    assert "empty" in summary


def test_presets_fill_the_chat_controls(client):
    values = client.predict("Yuan2-M32 release", api_name="/chat_preset")
    *controls, note = values
    assert controls[0] == 0 and controls[7] == 256 and "Yuan2-M32 release" in note


def test_inspect_a_lab_cell(client):
    from playground.ui.lab_tab import SETTING_FIELDS

    table = {"headers": SETTING_FIELDS, "data": [[0.9, 1.0, 3, 0, 1, 1, 0, 8, 5]]}
    assert client.predict("Name a colour.", table, api_name="/lab_run")[14] == "Done: 1 of 1 settings"
    heading, view, tokens, alternatives, *_ = client.predict("Lab cell", 1, api_name="/insight_inspect")
    assert heading.startswith("**Lab cell 1**") and len(frame(tokens)) >= 1
    # top_k=3: after the settings only three alternatives keep any probability, and they hold all of it
    alternatives = frame(alternatives)
    assert alternatives["sampled p"].head(3).sum() == pytest.approx(1, abs=1e-4)
    assert alternatives["sampled chosen"].sum() == 1
