"""The real app, launched as users launch it, driven through gradio_client with the real embedded model."""

from __future__ import annotations

import time

import pandas as pd
import pytest
from gradio_client import Client

from harness import chat_call, chat_reply, chat_reply_stats, chat_turns, wait_for

from playground.ui.lab_tab import SETTING_FIELDS

pytestmark = pytest.mark.slow

GREEDY = dict(temperature=0.0, top_p=0.9, top_k=50, min_p=0.0, typical_p=1.0, repetition_penalty=1.0,
              no_repeat_ngram_size=0, max_new_tokens=24, seed=1, stop="")


def chat_args(message, system="", **overrides):
    """The `/chat` endpoint's arguments, by name (`message` None: `/chat_regenerate`'s)."""
    return chat_call(message, system, **{**GREEDY, **overrides})


@pytest.fixture()
def client(launched_server):
    return Client(launched_server.url, verbose=False)


def test_status_and_health(launched_server, client):
    status = launched_server.status()
    assert status["state"] == "ready" and status["name"] == "SmolLM2-135M-Instruct"
    assert "SmolLM2-135M-Instruct" in client.predict(api_name="/status")
    assert launched_server.args[:2] == ["--host", "127.0.0.1"]


def test_chat_streams_a_reply_with_stats(client):
    job = client.submit(**chat_args("What is the capital of France?"), api_name="/chat")
    updates = list(job)
    chat, status, box = job.outputs()[-1]
    assert len(updates) >= 3  # streamed: several partial replies before the last
    partial_lengths = [len(chat_reply(u[0])) for u in updates if u[0] and u[0][-1]["role"] == "assistant"]
    assert partial_lengths == sorted(partial_lengths) and partial_lengths[0] < partial_lengths[-1]
    assert [m["role"] for m in chat] == ["user", "assistant", "assistant"]  # the reply, then its stats line
    assert chat_turns(chat) == ["user", "assistant"]
    assert "Paris" in chat_reply(chat)
    stats = chat_reply_stats(chat)  # the stats line under the reply, not part of its text
    assert "tokens" in stats and "tokens/s" in stats and stats not in chat_reply(chat)
    assert status.startswith("Done:") and box == ""


def test_chat_keeps_turns_undo_and_clear(client):
    client.predict(**chat_args("My name is Ada. Say hi.", max_new_tokens=12), api_name="/chat")
    chat, _, _ = client.predict(**chat_args("Say goodbye.", max_new_tokens=12), api_name="/chat")
    assert chat_turns(chat) == ["user", "assistant", "user", "assistant"]
    chat, status, box = client.predict(api_name="/chat_undo")
    assert chat_turns(chat) == ["user", "assistant"]
    assert box == "Say goodbye."  # the undone message is back in the box, to edit and send again
    chat, status = client.predict(**chat_args(None, max_new_tokens=12), api_name="/chat_regenerate")
    assert chat_turns(chat) == ["user", "assistant"]
    chat, status = client.predict(api_name="/chat_clear")
    assert chat == []


def test_bad_chat_input_shows_a_message_and_keeps_history(client):
    client.predict(**chat_args("Hello!", max_new_tokens=8), api_name="/chat")
    chat, status, box = client.predict(**chat_args("   "), api_name="/chat")
    assert "empty" in status and chat_turns(chat) == ["user", "assistant"]
    chat, status, box = client.predict(**chat_args("Hi again", seed=-1), api_name="/chat")
    assert "seed" in status and "between 0 and" in status
    assert chat_turns(chat) == ["user", "assistant"] and box == "Hi again"  # history kept, message given back to edit
    # refused with the message the lab and the APIs give, not clamped to a slider's end
    chat, status, box = client.predict(**chat_args("Hi again", temperature=9.0), api_name="/chat")
    assert "temperature: must be between 0 and 5 (0 means greedy), got 9" in status
    assert chat_turns(chat) == ["user", "assistant"] and box == "Hi again"
    chat, status, _ = client.predict(**chat_args("Still there?", max_new_tokens=6), api_name="/chat")
    assert chat_turns(chat) == ["user", "assistant"] * 2


def test_stop_button_really_stops(client, launched_server):
    long = chat_args("Write a very long story about a dragon and a knight.", temperature=0.8, seed=3,
                     max_new_tokens=1500)
    job = client.submit(**long, api_name="/chat")
    seen = 0
    for update in job:
        if update[0] and update[0][-1]["role"] == "assistant":
            seen += 1
            if seen == 3:
                break
    pressed = time.perf_counter()
    client.predict(api_name="/chat_stop")  # answered once the reply has ended (its own line says so)
    assert launched_server.status()["running"] == 0
    while not job.done():
        time.sleep(0.05)
        assert time.perf_counter() - pressed < 10
    chat, status, _ = job.outputs()[-1]
    assert "stopped by you" in status
    tokens = int(status.split("Done: ")[1].split(" tokens")[0])
    assert tokens < 1500
    assert launched_server.status()["running"] == 0


def settings_table(*rows):
    return {"headers": SETTING_FIELDS, "data": [list(r) for r in rows]}


def test_lab_two_settings_seeded_and_reproducible(client):
    table = settings_table([0.0, 0.9, 50, 0, 1, 1, 0, 20, 1], [1.2, 0.95, 50, 0, 1, 1, 0, 20, 42])
    first = client.predict("Write a haiku about rain.", table, api_name="/lab_run")
    second = client.predict("Write a haiku about rain.", table, api_name="/lab_run")
    texts, notes = first[:6], first[6:12]
    results, csv_path, status = first[12], first[13], first[14]
    assert status == "Done: 2 of 2 settings"
    assert [t["visible"] for t in texts] == [True, True, False, False, False, False]
    assert texts[0]["value"] and texts[1]["value"] and texts[0]["value"] != texts[1]["value"]
    assert [t["value"] for t in second[:2]] == [t["value"] for t in texts[:2]]  # same seeds, same text
    assert "tokens/s" in notes[0]["value"] and "seed 42" in notes[1]["value"]
    # each output is headed by what its setting changes; what they share is said once
    assert texts[0]["label"] == "Setting 1 · temperature 0, top_p 0.9, seed 1"
    assert first[15].startswith("**Same in every setting:**") and "top_k 50" in first[15]
    # the table on screen: the settings that differ, then the metrics under short headers
    frame = pd.DataFrame(results["data"], columns=results["headers"])
    assert list(frame["settings"]) == ["temperature 0, top_p 0.9, seed 1", "temperature 1.2, top_p 0.95, seed 42"]
    assert {"tokens", "tok/s", "first token s", "mean logprob", "finish", "output"} <= set(frame.columns)
    assert all(frame["mean logprob"] < 0)
    exported = pd.read_csv(csv_path)  # the CSV has every column
    assert {"top_k", "new_tokens", "time_to_first_token_s", "decode_tokens_per_s", "finish_reason"} <= set(exported)
    assert list(exported["output"]) == [texts[0]["value"], texts[1]["value"]]


def test_lab_sweep_and_invalid_settings(client):
    table, status = client.predict(settings_table([0.7, 0.9, 50, 0, 1, 1, 0, 16, 5]), "temperature",
                                   "0.1, 0.5, 0.9", api_name="/lab_sweep")
    frame = pd.DataFrame(table["data"], columns=table["headers"])
    assert list(frame["temperature"]) == [0.1, 0.5, 0.9] and set(frame["seed"]) == {5}
    _, status = client.predict(settings_table([0.7, 0.9, 50, 0, 1, 1, 0, 16, 5]), "temperature", "7, 8",
                               api_name="/lab_sweep")
    assert "temperature" in status and "between 0 and 5" in status
    # a run of the swept table plots its metrics against the swept value
    swept = client.predict("Hi", {**table, "data": [row[:7] + [4] + row[8:] for row in table["data"]]},
                           api_name="/lab_run")
    assert swept[14] == "Done: 3 of 3 settings" and swept[16].startswith("**Sweep of temperature** over 0.1, 0.5, 0.9")
    for plot in swept[17:20]:
        assert plot["x_title"] == "Temperature"  # the x axis names the swept parameter
        points = pd.DataFrame(plot["value"]["data"], columns=plot["value"]["columns"])
        assert list(points["swept value"]) == [0.1, 0.5, 0.9] and list(points["new tokens"]) == [4, 4, 4]
        assert (points["tokens/s"] > 0).all() and (points["mean logprob"] < 0).all()
    # a refused run changes only its status line: the results above stay on screen
    out = client.predict("Hi", settings_table([0.7, 2.0, 50, 0, 1, 1, 0, 16, 5]), api_name="/lab_run")
    assert "setting 1: top_p" in out[14]
    assert all(value == {"__type__": "update"} for index, value in enumerate(out) if index != 14)


def test_memory_panel_gains_points(client):
    frame1, report, *remote_plots = client.predict(api_name="/memory_tick")
    assert "No GPU readings" in report and "Process RSS" in report
    # A local model: the remote engine's plots stay hidden and empty.
    assert len(remote_plots) == 3 and not any(plot["visible"] or plot["value"]["data"] for plot in remote_plots)
    first_read = time.time()  # every sample of the first reading was taken before this

    def later_tick():
        # "seconds" is how long before the server's reply a sample was taken (negative, to 0.1 s); the server's clock
        # is this machine's, and it replied after `asked`: a sample with `asked + seconds` after the first reading
        # (by more than the rounding) is new.
        asked = time.time()
        frame, *_ = client.predict(api_name="/memory_tick")
        ages = [row[frame["columns"].index("seconds")] for row in frame["data"]]
        return frame if sum(asked + age - 0.05 > first_read for age in ages) >= 2 else None  # both series again

    frame2 = wait_for(later_tick, 45, "a memory sample after the first reading", every=0.5)
    assert len(frame1["data"]) >= 2
    series = {row[frame2["columns"].index("series")] for row in frame2["data"]}
    assert series == {"process RSS", "system used"}
