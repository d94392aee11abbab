"""The store's schema migration (playground/storage.py, PRAGMA user_version): a database an older playground made
gets the columns it lacks and keeps its data; a fresh one is made at the current version; a newer one is left as
it is."""

from __future__ import annotations

import sqlite3

from playground.storage import DATABASE_NAME, SCHEMA_VERSION, Storage


VERSION_1_SCHEMA = """
CREATE TABLE chats (id TEXT PRIMARY KEY, title TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL,
                    model TEXT, system_prompt TEXT NOT NULL DEFAULT '');
CREATE TABLE messages (chat_id TEXT NOT NULL REFERENCES chats(id) ON DELETE CASCADE, position INTEGER NOT NULL,
                       role TEXT NOT NULL CHECK (role IN ('user', 'assistant')), content TEXT NOT NULL, stats TEXT,
                       created REAL NOT NULL, PRIMARY KEY (chat_id, position));
CREATE TABLE lab_runs (id TEXT PRIMARY KEY, created REAL NOT NULL, model TEXT, prompt TEXT NOT NULL,
                       settings TEXT NOT NULL);
CREATE TABLE lab_cells (run_id TEXT NOT NULL REFERENCES lab_runs(id) ON DELETE CASCADE,
                        setting_index INTEGER NOT NULL, params TEXT NOT NULL, output TEXT NOT NULL, stats TEXT,
                        PRIMARY KEY (run_id, setting_index));
INSERT INTO chats VALUES ('oldchat', 'Old chat', 1.0, 2.0, 'tiny', '');
INSERT INTO messages VALUES ('oldchat', 0, 'user', 'hello from before', NULL, 1.0);
INSERT INTO lab_runs VALUES ('oldrun', 3.0, 'tiny', 'old prompt', '[{"temperature": 0.0}]');
INSERT INTO lab_cells VALUES ('oldrun', 0, '{"temperature": 0.0}', 'old output', NULL);
PRAGMA user_version = 1;
"""


def columns_of(path, table):
    db = sqlite3.connect(path)
    try:
        return [row[1] for row in db.execute(f"PRAGMA table_info({table})")]
    finally:
        db.close()


def test_a_version_1_database_is_migrated_and_keeps_its_data(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    db = sqlite3.connect(folder / DATABASE_NAME)
    db.executescript(VERSION_1_SCHEMA)
    db.close()
    store = Storage(folder)
    assert "title" in columns_of(store.path, "lab_runs") and "imported" in columns_of(store.path, "chats")
    assert store._read("PRAGMA user_version")[0][0] == SCHEMA_VERSION == 2
    assert [(m.role, m.content) for m in store.load_chat("oldchat").messages] == [("user", "hello from before")]
    assert store.list_chats()[0]["imported"] is False and store.load_run("oldrun").title is None
    store.rename_run("oldrun", "Named at last")
    assert [row["id"] for row in store.search("named")["runs"]] == ["oldrun"]
    store.close()
    again = Storage(folder)  # opening a migrated database again changes nothing
    assert columns_of(again.path, "lab_runs").count("title") == 1 and again.load_run("oldrun").title == "Named at last"
    again.close()


def test_a_fresh_database_is_made_at_the_current_version(tmp_path):
    store = Storage(tmp_path / "data")
    assert store._read("PRAGMA user_version")[0][0] == SCHEMA_VERSION
    assert columns_of(store.path, "lab_runs")[-1] == "title" and columns_of(store.path, "chats")[-1] == "imported"
    store.close()


def test_a_newer_database_is_not_downgraded(tmp_path):
    first = Storage(tmp_path / "data")
    first._write(lambda db: db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}"))
    first.close()
    second = Storage(tmp_path / "data")
    assert second._read("PRAGMA user_version")[0][0] == SCHEMA_VERSION + 1 and second.list_chats() == []
    second.close()
