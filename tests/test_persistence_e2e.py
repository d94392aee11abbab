"""Nothing lost: chats and lab runs saved by a launched server are there after a restart, and after a SIGKILL
mid-reply every completed turn (and the question being answered) is there, but no half reply."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pandas as pd
import pytest
from gradio_client import Client, handle_file

from harness import (LaunchedServer, ServedApp, ServerChecks, chat_call, chat_reply_stats, chat_turn_messages,
                     chat_turns, shown_text)
from playground.storage_exchange import EXPORT_FORMAT
from playground.ui.lab_tab import SETTING_FIELDS

pytestmark = pytest.mark.slow

GREEDY = dict(temperature=0.0, top_p=0.9, top_k=50, min_p=0.0, typical_p=1.0, repetition_penalty=1.0,
              no_repeat_ngram_size=0, max_new_tokens=8, seed=1, stop="")


def chat_args(message, **overrides):
    return chat_call(message, **{**GREEDY, **overrides})


def frame(table) -> pd.DataFrame:
    return pd.DataFrame(table["data"], columns=table["headers"])


def texts(chat) -> list[str]:
    """The text of each turn (stats lines left out)."""
    return [shown_text(m) for m in chat_turn_messages(chat)]


def start(data_dir: Path, log_dir: Path, manager=None) -> tuple[ServerChecks, Client]:
    """The app on `data_dir`: launched as a process, or (given a loaded `manager`) served from this one; either way
    its store is opened anew from the folder."""
    server = (ServedApp("--data-dir", str(data_dir), manager=manager) if manager is not None
              else LaunchedServer("--data-dir", str(data_dir), log_dir=log_dir))
    try:
        server.wait_until(("ready",))
    except Exception:
        server.stop()
        raise
    return server, Client(server.url, verbose=False)


def test_chats_and_runs_survive_a_restart(tmp_path, embedded_manager):
    data = tmp_path / "data"
    server, client = start(data, tmp_path, embedded_manager)
    try:
        client.predict(**chat_args("My name is Ada. Say hi."), api_name="/chat")
        chat, _, _ = client.predict(**chat_args("What is my name?"), api_name="/chat")
        replies = [shown_text(m) for m in chat_turn_messages(chat) if m["role"] == "assistant"]
        table = {"headers": SETTING_FIELDS,
                 "data": [[0.0, 0.9, 50, 0, 1, 1, 0, 8, 1], [1.2, 0.95, 50, 0, 1, 1, 0, 8, 42]]}
        run = client.predict("Write a haiku about rain.", table, api_name="/lab_run")
        assert run[14] == "Done: 2 of 2 settings"
        outputs = [run[0]["value"], run[1]["value"]]
    finally:
        server.stop()
    assert (data / "playground.sqlite3").is_file()

    server, client = start(data, tmp_path, embedded_manager)
    try:
        chats = frame(client.predict(api_name="/history_chats"))
        assert list(chats["title"]) == ["My name is Ada. Say hi."] and list(chats["messages"]) == [4]
        runs = frame(client.predict(api_name="/history_runs"))
        # readable columns first, the id last; an untitled run shows its prompt
        assert list(chats.columns) == ["title", "found", "updated", "messages", "model", "id"]
        # an untitled run is named by its prompt and what its settings vary
        assert list(runs["title"]) == ["Write a haiku about rain. · temperature 0 / 1.2; top_p 0.9 / 0.95; seed 1 / 42"]
        assert list(runs["cells"]) == [2]

        # reopen the chat: the chatbot shows it (stats lines included) and the next turn continues it
        chat_id = chats["id"][0]
        note, shown, system_prompt, status = client.predict(chat_id, api_name="/history_open_chat")
        assert chat_turns(shown) == ["user", "assistant"] * 2 and "Opened" in note
        assert texts(shown)[0] == "My name is Ada. Say hi." and replies[0] == texts(shown)[1]
        assert "tokens" in chat_reply_stats(shown)  # the saved stats line is back under the reply
        chat, status, _ = client.predict(**chat_args("Say goodbye."), api_name="/chat")
        assert chat_turns(chat) == ["user", "assistant"] * 3 and status.startswith("Done:")
        chats = frame(client.predict(api_name="/history_chats"))
        assert list(chats["id"]) == [chat_id] and list(chats["messages"]) == [6]

        # the run reopens with its cells and results
        view, results = client.predict(runs["id"][0], api_name="/history_open_run")
        assert "Write a haiku about rain." in view and "Setting 2" in view
        assert list(frame(results)["output"]) == outputs and list(frame(results)["seed"]) == [1, 42]

        # exports: runs as CSV with the run id, chats as JSON in the documented format
        csv_path, note = client.predict("", api_name="/runs_export")
        exported_runs = pd.read_csv(csv_path)
        assert list(exported_runs["run_id"]) == [runs["id"][0]] * 2 and list(exported_runs["output"]) == outputs
        json_path, note = client.predict(chat_id, api_name="/chat_export")
        document = json.loads(Path(json_path).read_text(encoding="utf-8"))
        assert document["format"] == EXPORT_FORMAT and document["version"] == 1
        assert [m["role"] for m in document["chats"][0]["messages"]] == ["user", "assistant"] * 3

        # import: a good file adds a chat; a bad one says why and changes nothing
        note, listed = client.predict(handle_file(json_path), api_name="/chat_import")
        assert note.startswith("Imported 1 chat") and len(frame(listed)) == 2
        bad = tmp_path / "bad.json"
        bad.write_bytes(b"\xff\xfe not text")
        note, listed = client.predict(handle_file(str(bad)), api_name="/chat_import")
        assert "Import failed" in note and "UTF-8" in note and len(frame(listed)) == 2

        # the copy says it is one; rename, search and delete (the page asks for a second click; the API does not)
        titles = frame(listed).set_index("id")["title"]
        copy_id = next(row_id for row_id in titles.index if row_id != chat_id)
        assert titles[chat_id] == "My name is Ada. Say hi." and titles[copy_id] == "My name is Ada. Say hi. (imported)"
        note, listed = client.predict(chat_id, "Ada's chat", api_name="/history_rename_chat")
        assert note.startswith("Renamed") and frame(listed).set_index("id")["title"][chat_id] == "Ada's chat"
        note, listed = client.predict(chat_id, "", api_name="/history_rename_chat")
        assert note.startswith("⚠️") and "empty" in note
        run_id = runs["id"][0]
        note, _ = client.predict(run_id, "Zyxwv rain", api_name="/history_rename_run")
        note, found_chats, found_runs = client.predict("MY NAME IS ADA", api_name="/history_search")
        assert set(frame(found_chats)["id"]) == {chat_id, copy_id} and frame(found_runs).empty
        note, found_chats, found_runs = client.predict("zyxwv", api_name="/history_search")
        assert frame(found_chats).empty and list(frame(found_runs)["title"]) == ["Zyxwv rain"]
        note, listed = client.predict(copy_id, api_name="/history_delete_chat")
        assert note.startswith("Deleted") and list(frame(listed)["id"]) == [chat_id]

        # a run goes back into the lab: its prompt and its settings table as it was run
        note, prompt, settings = client.predict(run_id, api_name="/history_run_to_lab")
        assert prompt == "Write a haiku about rain." and frame(settings).values.tolist() == table["data"]
        note, listed = client.predict(run_id, api_name="/history_delete_run")
        assert note.startswith("Deleted") and frame(listed).empty
        note, listed = client.predict(run_id, api_name="/history_delete_run")
        assert note.startswith("⚠️") and "no saved lab run" in note
    finally:
        server.stop()


def test_kill_mid_reply_keeps_completed_turns(tmp_path):
    data = tmp_path / "data"
    server, client = start(data, tmp_path)
    try:
        client.predict(**chat_args("Hello!"), api_name="/chat")
        question = "Write a very long story about a dragon and a knight."
        job = client.submit(**chat_args(question, temperature=0.8, seed=3, max_new_tokens=1500), api_name="/chat")
        streamed = 0
        for update in job:
            if update[0] and update[0][-1]["role"] == "assistant":
                streamed += 1
                if streamed == 3:
                    break
        assert streamed == 3
        os.killpg(server.process.pid, signal.SIGKILL)  # no shutdown, no cleanup: a crash
        server.process.wait(timeout=15)
    finally:
        server.stop()

    server, client = start(data, tmp_path)
    try:
        chats = frame(client.predict(api_name="/history_chats"))
        assert len(chats) == 1 and list(chats["messages"]) == [3]
        note, shown, _, chat_status = client.predict(chats["id"][0], api_name="/history_open_chat")
        # the first turn, and the question that was being answered; the half reply is not there
        assert chat_turns(shown) == ["user", "assistant", "user"] and texts(shown)[2] == question
        assert "Regenerate" in chat_status and "Regenerate" not in note  # said on the Chat tab, where the user is
        chat, status = client.predict(**chat_call(None, **GREEDY), api_name="/chat_regenerate")
        assert chat_turns(chat) == ["user", "assistant", "user", "assistant"] and status.startswith("Done:")
        assert list(frame(client.predict(api_name="/history_chats"))["messages"]) == [4]
        # Ctrl+C while a reply streams into an open page: a clean stop, one line, exit code 0.
        job = client.submit(**chat_args(question, temperature=0.8, seed=4, max_new_tokens=1500), api_name="/chat")
        next(iter(job))
        assert server.interrupt() == 0
        log = server.log()
        assert "Stopped:" in log and "Traceback" not in log and "ERROR" not in log, log
    finally:
        server.stop()
