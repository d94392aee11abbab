"""The chat and lab store (playground/storage.py): schema, saving, undo/regenerate, rename, delete, search,
export/import, threads. Migrating older databases: test_storage_migration.py."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import sqlite3
import stat
import threading

import pytest

from playground import storage as storage_module
from playground.storage import DATABASE_NAME, Storage, default_data_dir
from playground.storage_exchange import (
    Chat,
    EXPORT_FORMAT,
    ImportFileError,
    LabCell,
    MAX_IMPORT_BYTES,
    MAX_TITLE_CHARS,
    Message,
    StorageError,
    export_json,
    parse_chat_export,
    read_chat_file,
)

LONE_SURROGATE = "hi \ud800"  # half of a UTF-16 pair: a Python str can hold it, UTF-8 (so SQLite) cannot
NOT_A_CHARACTER = r"contains '\\ud800', half of a UTF-16 surrogate pair, which is not a character"


@pytest.fixture()
def store(tmp_path):
    storage = Storage(tmp_path / "data")
    yield storage
    storage.close()


def roles_and_texts(store, chat_id):
    return [(m.role, m.content) for m in store.load_chat(chat_id).messages]


def test_schema_and_wal(store):
    db = sqlite3.connect(store.path)
    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"chats", "messages", "lab_runs", "lab_cells"} <= tables
    columns = {row[1] for row in db.execute("PRAGMA table_info(messages)")}
    assert columns == {"chat_id", "position", "role", "content", "stats", "created"}
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()


def test_default_data_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert default_data_dir() == tmp_path / "yuan-playground"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert default_data_dir().parts[-3:] == (".local", "share", "yuan-playground")


def test_unusable_data_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(StorageError, match="cannot open the data folder"):
        Storage(blocker / "data")


def test_chat_save_load_and_title(store, tmp_path):
    chat_id = store.create_chat(model="tiny", system_prompt="Be brief.")
    store.put_message(chat_id, 0, "user", "What is\nthe capital of France?")
    store.put_message(chat_id, 1, "assistant", "Paris.", stats={"new_tokens": 2, "summary": "2 tokens"})
    # a second Storage on the same folder (a restarted server) sees everything
    again = Storage(tmp_path / "data")
    chat = again.load_chat(chat_id)
    assert chat.title == "What is the capital of France?" and chat.model == "tiny"
    assert chat.system_prompt == "Be brief."
    assert [(m.role, m.content) for m in chat.messages] == [("user", "What is\nthe capital of France?"),
                                                            ("assistant", "Paris.")]
    assert chat.messages[1].stats == {"new_tokens": 2, "summary": "2 tokens"} and chat.messages[0].stats is None
    assert again.load_chat("missing") is None
    again.close()


def test_chats_listed_most_recent_first(store):
    first = store.create_chat()
    second = store.create_chat()
    store.put_message(first, 0, "user", "older chat, newer turn")
    listed = store.list_chats()
    assert [row["id"] for row in listed] == [first, second]
    assert listed[0]["messages"] == 1 and listed[1]["messages"] == 0


def test_undo_and_regenerate_semantics(store):
    chat_id = store.create_chat()
    for position, (role, text) in enumerate([("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d")]):
        store.put_message(chat_id, position, role, text)
    store.truncate_chat(chat_id, 2)  # undo: the last user turn and its reply go
    assert roles_and_texts(store, chat_id) == [("user", "a"), ("assistant", "b")]
    store.put_message(chat_id, 1, "assistant", "b2")  # regenerate: the reply is replaced
    assert roles_and_texts(store, chat_id) == [("user", "a"), ("assistant", "b2")]
    store.put_message(chat_id, 2, "user", "e")
    store.put_message(chat_id, 1, "assistant", "b3")  # writing at a position drops what came after it
    assert roles_and_texts(store, chat_id) == [("user", "a"), ("assistant", "b3")]


def test_bad_role_or_unknown_chat_is_refused(store):
    chat_id = store.create_chat()
    with pytest.raises(StorageError, match="role"):
        store.put_message(chat_id, 0, "system", "x")
    with pytest.raises(StorageError, match="no chat"):
        store.put_message("nope", 0, "user", "x")
    assert store.load_chat(chat_id).messages == []


def test_lab_run_with_cells_and_csv(store):
    cells = [LabCell(0, {"temperature": 0.0, "seed": 1}, "one", {"seed": 1, "new_tokens": 3, "finish_reason": "length",
                                                                 "total_s": 0.5}),
             LabCell(1, {"temperature": 1.2, "seed": 42}, "two, with \"quotes\"\nand a newline", None)]
    run_id = store.save_lab_run("Write a haiku.", cells, model="tiny")
    run = store.load_run(run_id)
    assert run.prompt == "Write a haiku." and run.model == "tiny" and len(run.settings) == 2
    assert [(c.setting_index, c.output) for c in run.cells] == [(0, "one"), (1, "two, with \"quotes\"\nand a newline")]
    assert store.list_runs()[0] | {"created": None} == {"id": run_id, "title": None, "created": None, "model": "tiny",
                                                          "prompt": "Write a haiku.", "cells": 2, "hit": None,
                                                          "settings": run.settings}
    rows = list(csv.DictReader(io.StringIO(store.export_runs_csv())))
    assert [r["run_id"] for r in rows] == [run_id, run_id]
    assert rows[0]["setting"] == "1" and rows[0]["new_tokens"] == "3" and rows[0]["temperature"] == "0.0"
    assert rows[1]["output"] == "two, with \"quotes\"\nand a newline" and rows[1]["prompt"] == "Write a haiku."
    with pytest.raises(StorageError, match="no lab run"):
        store.export_runs_csv(["missing"])


def test_export_import_round_trip(store, tmp_path):
    chat_id = store.create_chat(model="tiny", system_prompt="sys")
    store.put_message(chat_id, 0, "user", "héllo ✓")
    store.put_message(chat_id, 1, "assistant", "hi", stats={"summary": "1 tokens"})
    document = store.export_chats()
    assert document["format"] == EXPORT_FORMAT and document["version"] == 1
    text = json.dumps(document, ensure_ascii=False).encode("utf-8")

    other = Storage(tmp_path / "other")
    imported = other.import_chats(parse_chat_export(text))
    assert imported == [chat_id]  # a free id is kept
    chat = other.load_chat(chat_id)
    assert [(m.role, m.content, m.stats) for m in chat.messages] == [("user", "héllo ✓", None),
                                                                     ("assistant", "hi", {"summary": "1 tokens"})]
    assert chat.system_prompt == "sys" and chat.title == "héllo ✓"
    assert abs(chat.created - store.load_chat(chat_id).created) < 1
    # importing the same file again gives a copy under a new id, never overwrites
    again = other.import_chats(parse_chat_export(text))
    assert again != [chat_id] and len(other.list_chats()) == 2
    other.close()


def test_minimal_import_needs_only_roles_and_content():
    data = json.dumps({"format": EXPORT_FORMAT, "version": 1,
                       "chats": [{"messages": [{"role": "user", "content": "Hi"}]},
                                 {"id": "../../etc/passwd", "messages": []}]}).encode()
    first, second = parse_chat_export(data)
    assert first.title == "Hi" and first.messages[0].content == "Hi" and first.id == ""
    assert second.id == ""  # an id that is not plain letters/digits gets a new one on import


@pytest.mark.parametrize("data, message", [
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe\x00bad", "not UTF-8"),
    (json.dumps({"chats": []}).encode(), "not a chat export"),
    (json.dumps([1, 2]).encode(), "not a chat export"),
    (json.dumps({"format": EXPORT_FORMAT, "version": 2, "chats": []}).encode(), "version 2 is not supported"),
    (json.dumps({"format": EXPORT_FORMAT, "version": 1, "chats": {}}).encode(), "must be a list"),
    (json.dumps({"format": EXPORT_FORMAT, "version": 1, "chats": []}).encode(), "holds no chats"),
    (json.dumps({"format": EXPORT_FORMAT, "version": 1, "chats": [{"messages": [
        {"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}]}).encode(),
     "chat 1, message 2: \"role\" must be \"user\" or \"assistant\""),
    (json.dumps({"format": EXPORT_FORMAT, "version": 1, "chats": [{"messages": [
        {"role": "user", "content": 5}]}]}).encode(), "'content' must be text"),
    (json.dumps({"format": EXPORT_FORMAT, "version": 1, "chats": [{"created": "yesterday", "messages": []}]}).encode(),
     "ISO 8601"),
    (b"[" * 100_000, "not valid JSON"),
])
def test_invalid_import_files_give_clear_messages(data, message):
    with pytest.raises(ImportFileError, match=message.replace("(", r"\(")):
        parse_chat_export(data)


def test_oversize_file_refused_before_reading(tmp_path):
    big = tmp_path / "big.json"
    with open(big, "wb") as handle:
        handle.truncate(MAX_IMPORT_BYTES + 1)
    with pytest.raises(ImportFileError, match="up to 10.0 MB"):
        read_chat_file(big)
    with pytest.raises(ImportFileError, match="up to 10.0 MB"):
        parse_chat_export(b" " * (MAX_IMPORT_BYTES + 1))


def test_failed_import_stores_nothing(store):
    good = {"messages": [{"role": "user", "content": "fine"}]}
    bad = {"messages": [{"role": "robot", "content": "no"}]}
    with pytest.raises(ImportFileError):
        store.import_chats(parse_chat_export(json.dumps(
            {"format": EXPORT_FORMAT, "version": 1, "chats": [good, bad]}).encode()))
    assert store.list_chats() == []


def test_two_threads_writing_at_once(store):
    chats = [store.create_chat(), store.create_chat()]
    errors = []

    def write(chat_id, label):
        try:
            for position in range(60):
                store.put_message(chat_id, position, "user" if position % 2 == 0 else "assistant", f"{label}{position}")
                if position % 10 == 0:
                    store.save_lab_run(label, [LabCell(0, {"seed": position}, "out")])
        except Exception as exc:  # collected so the test names it instead of a thread dying quietly
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(chat_id, label)) for chat_id, label in zip(chats, "ab")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    for chat_id, label in zip(chats, "ab"):
        assert [m.content for m in store.load_chat(chat_id).messages] == [f"{label}{i}" for i in range(60)]
    assert len(store.list_runs()) == 12


def test_chat_tab_saves_turns_and_drops_emptied_chats(store):
    from playground.ui.chat_tab import forget_turns, save_turn

    chat_id = save_turn(store, None, [], "user", "first", system_prompt="sys")
    assert save_turn(store, chat_id, [{"role": "user", "content": "first"}], "assistant", "reply",
                     stats={"summary": "1 tokens", "model": "tiny"}) == chat_id
    chat = store.load_chat(chat_id)
    assert chat.model == "tiny" and chat.system_prompt == "sys" and len(chat.messages) == 2
    assert forget_turns(store, chat_id, 1) == chat_id and roles_and_texts(store, chat_id) == [("user", "first")]
    assert forget_turns(store, chat_id, 0) is None and store.list_chats() == []  # an emptied chat is not kept
    db = sqlite3.connect(store.path)
    assert db.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 0  # its messages went with it
    db.close()


# ----------------------------------------------------------------------------------- rename, delete, search


def a_run(store, prompt="Write a haiku.", output="out", title=None):
    run_id = store.save_lab_run(prompt, [LabCell(0, {"temperature": 0.0}, output)], model="tiny")
    if title:
        store.rename_run(run_id, title)
    return run_id


def test_rename_chat_and_run(store):
    chat_id = store.create_chat()
    store.put_message(chat_id, 0, "user", "first message names it")
    store.rename_chat(chat_id, "  My  chat\nabout things ")
    assert store.load_chat(chat_id).title == "My chat about things"  # one line, as typed
    store.put_message(chat_id, 2, "user", "a later message does not rename it")
    assert store.list_chats()[0]["title"] == "My chat about things"
    run_id = a_run(store)
    assert store.load_run(run_id).title is None and store.list_runs()[0]["title"] is None
    store.rename_run(run_id, "Haiku test")
    assert store.load_run(run_id).title == "Haiku test" and store.list_runs()[0]["title"] == "Haiku test"
    assert store.load_run(run_id).prompt == "Write a haiku."


@pytest.mark.parametrize("title, message", [
    ("", "the title is empty"),
    (" \n\t", "the title is empty"),
    ("x" * (MAX_TITLE_CHARS + 1), f"at most {MAX_TITLE_CHARS}"),
    (LONE_SURROGATE, "the title " + NOT_A_CHARACTER),
    (None, "must be text"),
])
def test_bad_titles_are_refused(store, title, message):
    chat_id, run_id = store.create_chat(title="kept"), a_run(store, title="kept too")
    with pytest.raises(StorageError, match=message):
        store.rename_chat(chat_id, title)
    with pytest.raises(StorageError, match=message):
        store.rename_run(run_id, title)
    assert store.load_chat(chat_id).title == "kept" and store.load_run(run_id).title == "kept too"


def test_renaming_what_is_not_there_says_so(store):
    with pytest.raises(StorageError, match="there is no chat 'nope'"):
        store.rename_chat("nope", "title")
    with pytest.raises(StorageError, match="there is no lab run 'nope'"):
        store.rename_run("nope", "title")


def test_delete_run_takes_its_cells(store):
    kept, gone = a_run(store, "kept"), a_run(store, "gone")
    assert store.delete_run(gone) is True
    assert store.load_run(gone) is None and [row["id"] for row in store.list_runs()] == [kept]
    assert store.delete_run(gone) is False  # deleted already: nothing to do, no error
    db = sqlite3.connect(store.path)
    assert db.execute("SELECT DISTINCT run_id FROM lab_cells").fetchall() == [(kept,)]
    db.close()
    chat_id = store.create_chat()
    assert store.delete_chat(chat_id) is True and store.delete_chat(chat_id) is False


def test_search_finds_titles_messages_prompts_and_outputs_in_any_case(store):
    zebra = store.create_chat()
    store.put_message(zebra, 0, "user", "Tell me about zebras.")
    store.put_message(zebra, 1, "assistant", "They have STRIPES.")
    other = store.create_chat()
    store.put_message(other, 0, "user", "Größe of the Straße?")
    store.rename_chat(other, "German words")
    prompt_run, output_run, title_run = a_run(store, "Zebra haiku"), a_run(store, output="stripes"), a_run(store)
    store.rename_run(title_run, "Hunt for zebras")

    def found(query):
        result = store.search(query)
        return {row["id"] for row in result["chats"]}, {row["id"] for row in result["runs"]}

    assert found("zebra") == ({zebra}, {prompt_run, title_run})
    assert found("stripes") == ({zebra}, {output_run})  # a reply, a cell's output
    assert found("GERMAN") == ({other}, set())
    assert found("STRASSE") == ({other}, set()) and found("größe") == ({other}, set())  # Unicode case folding
    assert found("nothing like this") == (set(), set())
    assert found("") == ({zebra, other}, {prompt_run, output_run, title_run})  # no query: everything
    assert store.list_chats("ZEBRA")[0]["messages"] == 2  # the count is of all its messages, not the matches


def test_search_takes_wildcards_literally(store):
    plain, percent = store.create_chat(title="fifty"), store.create_chat(title="50% off_now")
    assert [row["id"] for row in store.list_chats("%")] == [percent]
    assert [row["id"] for row in store.list_chats("_")] == [percent]
    assert plain not in {row["id"] for row in store.list_chats("f_f")}


def test_bad_searches_are_refused(store):
    with pytest.raises(StorageError, match="the search " + NOT_A_CHARACTER):
        store.search(LONE_SURROGATE)
    with pytest.raises(StorageError, match="at most 200"):
        store.search("x" * 201)


# ------------------------------------------------------------------------------------------------ imported


def test_imported_chats_are_marked(store):
    made = store.create_chat()
    store.put_message(made, 0, "user", "hello")
    text = export_json(store.export_chats()).encode()
    (copy,) = store.import_chats(parse_chat_export(text))
    listed = {row["id"]: row["imported"] for row in store.list_chats()}
    assert listed == {made: False, copy: True}
    assert store.load_chat(made).imported is None and store.load_chat(copy).imported > 0
    assert store.load_chat(copy).title == store.load_chat(made).title  # the title is the original's


def test_history_tab_shows_imported_and_reopens_runs_in_the_lab(new_manager, store):
    from playground.ui.history_views import IMPORTED, HistoryViews
    from playground.ui.lab_tab import SETTING_FIELDS

    made = store.create_chat()
    store.put_message(made, 0, "user", "hello")
    (copy,) = store.import_chats(parse_chat_export(export_json(store.export_chats()).encode()))
    views = HistoryViews(new_manager(), store)  # no model: nothing here generates
    table = views.chats_table().set_index("id")
    assert table.loc[made, "title"] == "hello" and table.loc[copy, "title"] == "hello" + IMPORTED
    assert list(views.chats_table()) == ["title", "found", "updated", "messages", "model", "id"]
    rows = [{name: index + 1 for index, name in enumerate(SETTING_FIELDS)}, {"temperature": 0.5, "extra": 1}]
    run_id = store.save_lab_run("The prompt", [LabCell(0, rows[0], "out")], settings=rows)
    note, prompt, settings, _ = views.run_to_lab(run_id)
    assert prompt == "The prompt" and list(settings.columns) == SETTING_FIELDS and len(settings) == 2
    assert settings.iloc[0].tolist() == list(range(1, len(SETTING_FIELDS) + 1))
    assert settings.iloc[1]["temperature"] == 0.5 and settings.iloc[1].isna().sum() == len(SETTING_FIELDS) - 1
    assert "The prompt" in note
    assert views.run_to_lab("missing")[0].startswith("⚠️") and views.rename_chat("", "x")[0].startswith("⚠️")


def test_history_lists_tell_runs_apart_and_show_where_a_search_matched(new_manager, store):
    from playground.ui.history_views import HistoryViews

    settings = [{"temperature": 0.0, "seed": 1}, {"temperature": 0.7, "seed": 1}]
    for index in range(2):
        store.save_lab_run("Name a fruit.", [LabCell(0, settings[0], f"A ripe mango, run {index}.")],
                           settings=settings if index else settings[:1] + [{"temperature": 1.2, "seed": 1}])
    chat_id = store.create_chat()
    store.put_message(chat_id, 0, "user", "Tell me about the quokka, a small marsupial from Western Australia.")
    views = HistoryViews(new_manager(), store)
    titles = list(views.runs_table()["title"])
    assert titles == ["Name a fruit. · temperature 0 / 0.7", "Name a fruit. · temperature 0 / 1.2"]
    runs = views.runs_table("MANGO")
    assert len(runs) == 2 and all(text.startswith("A ripe mango, run") for text in runs["found"])
    chats = views.chats_table("marsupial")
    found = chats["found"][0]  # a few words on each side of the match, marked where the text goes on
    assert found.startswith("…") and "quokka, a small marsupial from Western" in found
    assert len(found) <= 1 + 30 + len("marsupial") + 30 + 1
    assert list(views.chats_table()["found"]) == [""]  # no search, nothing to show


# ------------------------------------------------------------------------------------------ private files


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def file_modes(folder):
    return {path.name: mode(path) for path in folder.iterdir()}


def test_fresh_store_is_private_whatever_the_umask(tmp_path):
    old = os.umask(0o022)  # a usual umask: left to mkdir and SQLite, the folder would be 0755 and the files 0644
    try:
        storage = Storage(tmp_path / "parent" / "data")
        storage.create_chat()  # the WAL and its index exist once something is written
    finally:
        os.umask(old)
    assert mode(storage.data_dir) == 0o700
    names = {DATABASE_NAME, DATABASE_NAME + "-wal", DATABASE_NAME + "-shm"}
    assert file_modes(storage.data_dir) == dict.fromkeys(names, 0o600)
    assert mode(tmp_path / "parent") == 0o755  # a parent it had to make is not the store's own
    storage.close()


def test_reopened_store_tightens_loose_modes(tmp_path):
    first = Storage(tmp_path / "data")
    first.create_chat()
    os.chmod(first.data_dir, 0o755)
    for path in first.data_dir.iterdir():
        os.chmod(path, 0o644)
    second = Storage(tmp_path / "data")  # a restart, with the side files still there
    assert mode(second.data_dir) == 0o700 and set(file_modes(second.data_dir).values()) == {0o600}
    first.close()
    second.close()
    os.chmod(tmp_path / "data", 0o755)
    os.chmod(tmp_path / "data" / DATABASE_NAME, 0o644)
    third = Storage(tmp_path / "data")  # a restart after a clean stop: only the database file
    assert mode(third.data_dir) == 0o700 and set(file_modes(third.data_dir).values()) == {0o600}
    assert len(third.list_chats()) == 1
    third.close()


def test_shared_folder_keeps_its_mode_but_the_database_is_private(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o755)
    (shared / "notes.txt").write_text("someone else's")
    os.chmod(shared / "notes.txt", 0o644)
    storage = Storage(shared)
    assert mode(shared) == 0o755 and mode(shared / "notes.txt") == 0o644
    assert mode(storage.path) == 0o600
    storage.close()


def test_refused_chmod_is_not_fatal(tmp_path, monkeypatch):
    folder = tmp_path / "data"
    folder.mkdir()
    os.chmod(folder, 0o755)

    def refuse(path, mode):
        raise PermissionError(1, "Operation not permitted", str(path))

    monkeypatch.setattr(os, "chmod", refuse)  # as for a folder someone else owns
    storage = Storage(folder)
    chat_id = storage.create_chat()
    storage.put_message(chat_id, 0, "user", "still saved")
    assert mode(folder) == 0o755 and roles_and_texts(storage, chat_id) == [("user", "still saved")]
    storage.close()


def test_no_chmod_on_windows(tmp_path, monkeypatch):
    path = tmp_path / "file"
    path.write_text("")
    os.chmod(path, 0o644)
    monkeypatch.setattr(os, "chmod", lambda *args: pytest.fail("chmod on Windows"))
    monkeypatch.setattr(os, "name", "nt")
    storage_module._make_private(path, 0o600)
    monkeypatch.undo()
    assert mode(path) == 0o644


# ------------------------------------------------------------------------------------------- strict JSON


def strict_loads(text):
    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_non_strict_json_import_is_refused(store, tmp_path, constant):
    text = ('{"format": "%s", "version": 1, "chats": [{"messages": [{"role": "user", "content": "a"}, '
            '{"role": "assistant", "content": "b", "stats": {"total_s": %s}}]}]}') % (EXPORT_FORMAT, constant)
    path = tmp_path / "chats.json"
    path.write_text(text)
    with pytest.raises(ImportFileError, match=f"not strict JSON: {re.escape(constant)} is not a JSON value"):
        store.import_chats(read_chat_file(path))
    assert store.list_chats() == []


def test_exports_write_non_finite_numbers_as_null(store):
    chat_id = store.create_chat()
    store.put_message(chat_id, 0, "user", "hi")
    store.put_message(chat_id, 1, "assistant", "yo",
                      stats={"decode_tokens_per_s": float("nan"), "spans": [float("inf"), 1.5]})
    db = sqlite3.connect(store.path)
    # a row as the store wrote it before: Python's json writes NaN unless told not to
    db.execute("UPDATE messages SET stats = '{\"x\": -Infinity}' WHERE position = 0")
    db.commit()
    text = export_json(store.export_chats())
    document = strict_loads(text)
    assert [m["stats"] for m in document["chats"][0]["messages"]] == [
        {"x": None}, {"decode_tokens_per_s": None, "spans": [None, 1.5]}]
    assert parse_chat_export(text.encode())[0].messages[1].content == "yo"  # an export imports again

    run_id = store.save_lab_run("p", [LabCell(0, {"temperature": float("nan")}, "out", {"total_s": float("inf")})],
                                settings=[{"temperature": float("-inf")}])
    columns = db.execute("SELECT r.settings, c.params, c.stats FROM lab_runs r JOIN lab_cells c ON c.run_id = r.id "
                         "WHERE r.id = ?", (run_id,)).fetchone()
    assert [strict_loads(column) for column in columns] == [[{"temperature": None}], {"temperature": None},
                                                           {"total_s": None}]
    db.close()
    assert list(csv.DictReader(io.StringIO(store.export_runs_csv([run_id]))))[0]["output"] == "out"


# ------------------------------------------------------------------------------------ lone UTF-16 surrogates


def test_surrogate_in_a_message_is_refused_before_writing(store):
    chat_id = store.create_chat()
    store.put_message(chat_id, 0, "user", "fine")
    store.put_message(chat_id, 1, "assistant", "reply")
    attempts = [
        ({"content": LONE_SURROGATE}, "the message " + NOT_A_CHARACTER),
        ({"stats": {"finish": LONE_SURROGATE}}, "the message's stats " + NOT_A_CHARACTER),
        ({"stats": {LONE_SURROGATE: 1}}, "the message's stats " + NOT_A_CHARACTER),
        ({"system_prompt": LONE_SURROGATE}, "the system prompt " + NOT_A_CHARACTER),
        ({"model": LONE_SURROGATE}, "the model name " + NOT_A_CHARACTER),
    ]
    for change, message in attempts:
        arguments = {"content": "new", **change}
        with pytest.raises(StorageError, match=message):
            store.put_message(chat_id, 0, "user", **arguments)  # position 0: would drop both stored messages
    assert roles_and_texts(store, chat_id) == [("user", "fine"), ("assistant", "reply")]
    assert store.load_chat(chat_id).system_prompt == "" and store.list_chats()[0]["model"] is None


def test_surrogate_in_a_new_chat_is_refused(store):
    for field in ("model", "system_prompt", "title"):
        with pytest.raises(StorageError, match=NOT_A_CHARACTER):
            store.create_chat(**{field: LONE_SURROGATE})
    assert store.list_chats() == []
    # an id pasted with one is an error, not a crash
    for call in (store.load_chat, store.delete_chat, lambda chat_id: store.export_chats([chat_id])):
        with pytest.raises(StorageError, match=NOT_A_CHARACTER):
            call(LONE_SURROGATE)


def test_surrogate_in_a_lab_run_is_refused(store):
    with pytest.raises(StorageError, match="the lab prompt " + NOT_A_CHARACTER):
        store.save_lab_run(LONE_SURROGATE, [LabCell(0, {}, "out")])
    with pytest.raises(StorageError, match="the output of setting 2 " + NOT_A_CHARACTER):
        store.save_lab_run("p", [LabCell(0, {}, "out"), LabCell(1, {}, LONE_SURROGATE)])
    assert store.list_runs() == []


def test_import_with_a_surrogate_is_refused_as_a_whole(store):
    kept = store.create_chat(title="kept")
    before = store.list_chats()

    def export(*messages):
        return json.dumps({"format": EXPORT_FORMAT, "version": 1, "chats": [
            {"messages": [{"role": "user", "content": "fine"}]}, {"messages": list(messages)}]}).encode()

    # json.dumps writes the lone surrogate as the escape "\ud800", which json.loads turns back into one
    for data, where in [
        (export({"role": "user", "content": "ok"}, {"role": "assistant", "content": LONE_SURROGATE}),
         "chat 2, message 2: 'content' "),
        (export({"role": "user", "content": "ok", "stats": {LONE_SURROGATE: 1}}), "chat 2, message 1: \"stats\" "),
    ]:
        assert b"\\ud800" in data
        with pytest.raises(ImportFileError, match=where + NOT_A_CHARACTER):
            store.import_chats(parse_chat_export(data))
    bad_title = json.loads(export({"role": "user", "content": "ok"}))
    bad_title["chats"][1]["title"] = LONE_SURROGATE
    with pytest.raises(ImportFileError, match="chat 2: 'title' " + NOT_A_CHARACTER):
        parse_chat_export(json.dumps(bad_title).encode())
    # chats made some other way than parse_chat_export are checked by import_chats itself
    chats = [Chat("", "fine", 1.0, 1.0, None, "", [Message("user", "ok")]),
             Chat("", "fine", 1.0, 1.0, None, "", [Message("user", "ok"), Message("assistant", LONE_SURROGATE)])]
    with pytest.raises(StorageError, match="chat 2, message 2: 'content' " + NOT_A_CHARACTER):
        store.import_chats(chats)
    assert store.list_chats() == before and store.load_chat(kept).title == "kept"


def test_a_whole_surrogate_pair_in_a_file_is_one_character(store):
    data = json.dumps({"format": EXPORT_FORMAT, "version": 1,
                       "chats": [{"messages": [{"role": "user", "content": "smile \U0001F600"}]}]}).encode()
    assert b"\\ud83d\\ude00" in data  # written as a UTF-16 pair of escapes
    (chat_id,) = store.import_chats(parse_chat_export(data))
    assert roles_and_texts(store, chat_id) == [("user", "smile \U0001F600")]


def test_a_saved_reply_keeps_every_setting_and_reopening_gives_them_back(store):
    from playground.generation.events import GenerationStats
    from playground.params import SamplingParams
    from playground.ui.chat_tab import SCHEMA_INPUT, reply_stats, saved_settings

    params = SamplingParams(temperature=0.3, top_k=7, seed=5, stop=["\n\n"], max_new_tokens=9)
    chat_id = store.create_chat()
    store.put_message(chat_id, 0, "user", "hi")
    store.put_message(chat_id, 1, "assistant", "hello",
                      stats=reply_stats(GenerationStats(new_tokens=1), "tiny", params, '{"type": "object"}'))
    store.put_message(chat_id, 2, "user", "again")  # a last message without a reply: the reply's settings count
    (copy,) = store.import_chats(parse_chat_export(export_json(store.export_chats([chat_id])).encode()))
    for saved in (store.load_chat(chat_id), store.load_chat(copy)):  # kept in an export and its import too
        values = saved_settings(saved)
        assert values["temperature"] == 0.3 and values["top_k"] == 7 and values["max_new_tokens"] == 9
        assert values["seed"] == "5" and values["stop"] == "\\n\\n" and values[SCHEMA_INPUT] == '{"type": "object"}'
    bare = store.create_chat()
    store.put_message(bare, 0, "user", "hi")
    store.put_message(bare, 1, "assistant", "old reply", stats={"summary": "1 token"})  # saved before settings were
    assert saved_settings(store.load_chat(bare)) is None
