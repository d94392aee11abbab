"""Chats and sampling-lab runs, saved as they happen to SQLite in the data folder.

Every write is its own committed transaction (WAL journal, full sync), so a crash or a kill loses nothing that
was written before it: the user's turn is written when sent, the reply when it has finished. The records, the
chat export format (JSON) and the runs' CSV are in playground/storage_exchange.py; their names are importable from
here too.

The schema's version is SQLite's `PRAGMA user_version`. A database made by an older playground is brought up to
date when it is opened (see MIGRATIONS); one made by a newer playground is opened as it is.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import threading
import time
from pathlib import Path
from typing import Any, Callable

from playground.errors import not_unicode
from playground.storage_exchange import (
    ROLES,
    Chat,
    LabCell,
    LabRun,
    Message,
    StorageError,
    chat_title,
    chats_document,
    check_text,
    checked_stats,
    checked_title,
    dumps,
    loads,
    new_id,
    runs_csv,
)

__all__ = ["DATABASE_NAME", "MAX_SEARCH_CHARS", "SCHEMA_VERSION", "Storage", "default_data_dir"]

DATABASE_NAME = "playground.sqlite3"
DATABASE_COMPANIONS = ("-wal", "-shm", "-journal")  # SQLite's side files next to the database
PRIVATE_FOLDER_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
MAX_SEARCH_CHARS = 200

# A fresh database gets these tables as they are now; an older one gets what it lacks from MIGRATIONS.
SCHEMA = """
CREATE TABLE IF NOT EXISTS chats (
    id TEXT PRIMARY KEY,
    title TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    model TEXT,
    system_prompt TEXT NOT NULL DEFAULT '',
    imported REAL
);
CREATE TABLE IF NOT EXISTS messages (
    chat_id TEXT NOT NULL REFERENCES chats(id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
    content TEXT NOT NULL,
    stats TEXT,
    created REAL NOT NULL,
    PRIMARY KEY (chat_id, position)
);
CREATE TABLE IF NOT EXISTS lab_runs (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    model TEXT,
    prompt TEXT NOT NULL,
    settings TEXT NOT NULL,
    title TEXT
);
CREATE TABLE IF NOT EXISTS lab_cells (
    run_id TEXT NOT NULL REFERENCES lab_runs(id) ON DELETE CASCADE,
    setting_index INTEGER NOT NULL,
    params TEXT NOT NULL,
    output TEXT NOT NULL,
    stats TEXT,
    PRIMARY KEY (run_id, setting_index)
);
CREATE INDEX IF NOT EXISTS chats_by_updated ON chats(updated);
CREATE INDEX IF NOT EXISTS runs_by_created ON lab_runs(created);
"""
SCHEMA_VERSION = 2
# What each schema version added to the one before, as (table, column, declaration). Version 2: a run's title
# (None shows its prompt) and when a chat was imported (None: made here).
MIGRATIONS: dict[int, list[tuple[str, str, str]]] = {
    2: [("lab_runs", "title", "TEXT"), ("chats", "imported", "REAL")],
}


def default_data_dir() -> Path:
    """Where chats and runs live unless --data-dir says otherwise: $XDG_DATA_HOME or ~/.local/share."""
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "yuan-playground"


def _make_private(path: Path, mode: int) -> None:
    """Give `path` exactly `mode`, whatever the umask; where chmod is refused (not our file) it stays as it is."""
    try:
        if os.name != "nt" and stat.S_IMODE(path.stat().st_mode) != mode:  # Windows: ACLs decide, not modes
            os.chmod(path, mode)
    except OSError:
        pass  # missing (a side file SQLite removed) or not ours to change: the store works all the same


def _contains(text: str | None, needle: str) -> bool:
    """Case-insensitive substring test for search: casefold, unlike SQL LIKE, folds non-ASCII letters too."""
    return text is not None and needle.casefold() in text.casefold()


def migrate(db: sqlite3.Connection) -> None:
    """Bring the database up to SCHEMA_VERSION in one transaction; a newer database is left as it is."""
    db.execute("BEGIN IMMEDIATE")
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        for step in range(version + 1, SCHEMA_VERSION + 1):
            for table, column, declaration in MIGRATIONS.get(step, []):
                present = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
                if column not in present:  # a database SCHEMA has just made already has it
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
        if version < SCHEMA_VERSION:
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


class Storage:
    """The SQLite store. One connection shared by every thread, behind a lock; each write commits at once."""

    def __init__(self, data_dir: str | os.PathLike):
        self.data_dir = Path(data_dir).expanduser()
        self.path = self.data_dir / DATABASE_NAME
        try:
            self._open_private_files()
            # isolation_level=None: no implicit transactions; each write below opens and commits its own.
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10)
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit is on disk before the call returns (NORMAL could lose the last ones on power loss).
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(SCHEMA)
            migrate(self._db)
            self._db.create_function("contains_text", 2, _contains, deterministic=True)
        except (OSError, sqlite3.Error) as exc:
            raise StorageError(f"cannot open the data folder {self.data_dir}: {exc}") from exc
        self._lock = threading.RLock()

    def _open_private_files(self) -> None:
        """Create the folder and database private, or tighten them where looser: chats are nobody else's to read."""
        made = not self.data_dir.is_dir()
        self.data_dir.mkdir(parents=True, exist_ok=True)  # only the data folder itself is made private, not parents
        ours = {self.data_dir / (DATABASE_NAME + suffix) for suffix in ("", *DATABASE_COMPANIONS)}
        # a folder the store did not make and shares with other things (a home folder, /tmp) keeps its mode
        if made or set(self.data_dir.iterdir()) <= ours:
            _make_private(self.data_dir, PRIVATE_FOLDER_MODE)
        # created here with 0600 rather than by SQLite (0644 less the umask): never readable by others, not even briefly
        os.close(os.open(self.path, os.O_RDONLY | os.O_CREAT, PRIVATE_FILE_MODE))
        for path in ours:  # SQLite gives the side files it makes the database's mode; older ones may be looser
            _make_private(path, PRIVATE_FILE_MODE)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------------------------- plumbing

    def _read(self, sql: str, args: tuple | dict = ()) -> list[sqlite3.Row]:
        with self._lock:
            try:
                cursor = self._db.execute(sql, args)
                return cursor.fetchall()
            except sqlite3.Error as exc:
                raise StorageError(f"reading the history failed: {exc}") from exc
            except UnicodeEncodeError as exc:  # e.g. an id pasted with a lone surrogate
                raise StorageError(not_unicode(exc.object, "the id")) from None

    def _write(self, steps: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run `steps(db)` in one transaction: all of it is committed, or none of it. Returns what `steps` returns."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    result = steps(self._db)
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
                return result
            except sqlite3.Error as exc:
                raise StorageError(f"saving to {self.path} failed: {exc}") from exc
            except UnicodeEncodeError as exc:  # text the callers did not check_text; rolled back above
                raise StorageError(not_unicode(exc.object, "the text to save")) from None

    def _set_title(self, table: str, what: str, row_id: str, title: Any) -> None:
        title = checked_title(title)
        changed = self._write(lambda db: db.execute(f"UPDATE {table} SET title = ? WHERE id = ?",
                                                    (title, row_id)).rowcount)
        if not changed:
            raise StorageError(f"there is no {what} {row_id!r}")

    def _delete(self, table: str, row_id: str) -> bool:
        """Delete one row (its messages or cells go with it); False when there was none."""
        return self._write(lambda db: db.execute(f"DELETE FROM {table} WHERE id = ?", (row_id,)).rowcount) > 0

    @staticmethod
    def _search_term(query: str | None) -> str:
        query = (query or "").strip()
        check_text(query, "the search")
        if len(query) > MAX_SEARCH_CHARS:
            raise StorageError(f"the search is {len(query)} characters; at most {MAX_SEARCH_CHARS} are searched")
        return query
    # ----------------------------------------------------------------------------------------- chats

    def create_chat(self, model: str | None = None, system_prompt: str = "", title: str = "") -> str:
        for value, what in ((model, "the model name"), (system_prompt, "the system prompt"), (title, "the title")):
            check_text(value, what)
        chat_id, now = new_id(), time.time()
        self._write(lambda db: db.execute(
            "INSERT INTO chats (id, title, created, updated, model, system_prompt) VALUES (?, ?, ?, ?, ?, ?)",
            (chat_id, title, now, now, model, system_prompt or "")))
        return chat_id

    def put_message(self, chat_id: str, position: int, role: str, content: str, stats: dict | None = None,
                    model: str | None = None, system_prompt: str | None = None) -> None:
        """Write the message at `position`, dropping whatever was stored from there on.

        The chat UI's history is the truth: a new turn after an undo, or a regenerated reply, replaces the stored
        messages from its position on. The first user message names the chat.
        """
        if role not in ROLES:
            raise StorageError(f"a message's role must be 'user' or 'assistant', got {role!r}")
        for value, what in ((content, "the message"), (model, "the model name"), (system_prompt, "the system prompt")):
            check_text(value, what)
        stats_json = dumps(stats, "the message's stats")
        now = time.time()

        def steps(db: sqlite3.Connection) -> None:
            if db.execute("SELECT 1 FROM chats WHERE id = ?", (chat_id,)).fetchone() is None:
                raise StorageError(f"there is no chat {chat_id!r}")
            db.execute("DELETE FROM messages WHERE chat_id = ? AND position >= ?", (chat_id, position))
            db.execute(
                "INSERT INTO messages (chat_id, position, role, content, stats, created) VALUES (?, ?, ?, ?, ?, ?)",
                (chat_id, position, role, content, stats_json, now))
            db.execute("UPDATE chats SET updated = ?, model = COALESCE(?, model), "
                       "system_prompt = COALESCE(?, system_prompt) WHERE id = ?",
                       (now, model, system_prompt, chat_id))
            if role == "user":
                db.execute("UPDATE chats SET title = ? WHERE id = ? AND title = ''", (chat_title(content), chat_id))

        self._write(steps)

    def truncate_chat(self, chat_id: str, keep: int) -> None:
        """Keep the first `keep` messages (undo, a failed reply)."""

        def steps(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM messages WHERE chat_id = ? AND position >= ?", (chat_id, keep))
            db.execute("UPDATE chats SET updated = ? WHERE id = ?", (time.time(), chat_id))

        self._write(steps)

    def delete_chat(self, chat_id: str) -> bool:
        """Delete a chat and its messages; False when there was no such chat."""
        return self._delete("chats", chat_id)

    def rename_chat(self, chat_id: str, title: str) -> None:
        """Give a chat the title the user typed (one line, up to MAX_TITLE_CHARS)."""
        self._set_title("chats", "chat", chat_id, title)

    def list_chats(self, query: str = "") -> list[dict[str, Any]]:
        """Every chat (with `query`: those whose title or a message holds it, in any case), the most recently
        updated first, with its message count, whether it was imported and (with a query) the first message that
        holds it ("hit"; None when only the title does)."""
        rows = self._read(
            "SELECT c.id, c.title, c.created, c.updated, c.model, c.imported IS NOT NULL, COUNT(m.position), "
            "(SELECT h.content FROM messages h WHERE :q != '' AND h.chat_id = c.id AND contains_text(h.content, :q) "
            "ORDER BY h.position LIMIT 1) "
            "FROM chats c LEFT JOIN messages m ON m.chat_id = c.id "
            "WHERE :q = '' OR contains_text(c.title, :q) "
            "OR EXISTS (SELECT 1 FROM messages s WHERE s.chat_id = c.id AND contains_text(s.content, :q)) "
            "GROUP BY c.id ORDER BY c.updated DESC, c.rowid DESC", {"q": self._search_term(query)})
        columns = ("id", "title", "created", "updated", "model", "imported", "messages", "hit")
        return [{**dict(zip(columns, row)), "imported": bool(row[5])} for row in rows]

    def load_chat(self, chat_id: str) -> Chat | None:
        rows = self._read("SELECT id, title, created, updated, model, system_prompt, imported FROM chats WHERE id = ?",
                          (chat_id,))
        if not rows:
            return None
        *fields, imported = rows[0]
        chat = Chat(*fields, imported=imported)
        chat.messages = [
            Message(role, content, loads(stats), created)
            for role, content, stats, created in self._read(
                "SELECT role, content, stats, created FROM messages WHERE chat_id = ? ORDER BY position", (chat_id,))
        ]
        return chat

    # ------------------------------------------------------------------------------------------- lab

    def save_lab_run(self, prompt: str, cells: list[LabCell], model: str | None = None,
                     settings: list[dict[str, Any]] | None = None) -> str:
        """Store a finished run and its cells in one transaction; returns the run's id."""
        run_id, now = new_id(), time.time()
        settings = settings if settings is not None else [cell.params for cell in cells]
        check_text(prompt, "the lab prompt")
        check_text(model, "the model name")
        settings_json = dumps(settings, "the lab settings")
        rows = []
        for c in cells:  # every cell is checked before anything is written
            where = f"setting {c.setting_index + 1}"
            check_text(c.output, f"the output of {where}")
            rows.append((run_id, c.setting_index, dumps(c.params, f"the parameters of {where}"), c.output,
                         dumps(c.stats, f"the stats of {where}")))

        def steps(db: sqlite3.Connection) -> None:
            db.execute("INSERT INTO lab_runs (id, created, model, prompt, settings) VALUES (?, ?, ?, ?, ?)",
                       (run_id, now, model, prompt, settings_json))
            db.executemany(
                "INSERT INTO lab_cells (run_id, setting_index, params, output, stats) VALUES (?, ?, ?, ?, ?)", rows)

        self._write(steps)
        return run_id

    def delete_run(self, run_id: str) -> bool:
        """Delete a run and its cells; False when there was no such run."""
        return self._delete("lab_runs", run_id)

    def rename_run(self, run_id: str, title: str) -> None:
        """Give a run a title (one line, up to MAX_TITLE_CHARS), shown instead of its prompt."""
        self._set_title("lab_runs", "lab run", run_id, title)

    def list_runs(self, query: str = "") -> list[dict[str, Any]]:
        """Every run (with `query`: those whose title, prompt or an output holds it, in any case), newest first, with
        its settings and (with a query) the first output that holds it ("hit")."""
        rows = self._read(
            "SELECT r.id, r.title, r.created, r.model, r.prompt, COUNT(c.setting_index) AS cells, r.settings, "
            "(SELECT h.output FROM lab_cells h WHERE :q != '' AND h.run_id = r.id AND contains_text(h.output, :q) "
            "ORDER BY h.setting_index LIMIT 1) "
            "FROM lab_runs r LEFT JOIN lab_cells c ON c.run_id = r.id "
            "WHERE :q = '' OR contains_text(r.title, :q) OR contains_text(r.prompt, :q) "
            "OR EXISTS (SELECT 1 FROM lab_cells o WHERE o.run_id = r.id AND contains_text(o.output, :q)) "
            "GROUP BY r.id ORDER BY r.created DESC, r.rowid DESC", {"q": self._search_term(query)})
        columns = ("id", "title", "created", "model", "prompt", "cells", "settings", "hit")
        return [{**dict(zip(columns, row)), "settings": loads(row[6]) if row[6] else []} for row in rows]

    def search(self, query: str) -> dict[str, list[dict[str, Any]]]:
        """The chats and runs holding `query` (case-insensitive), as list_chats and list_runs give them."""
        return {"chats": self.list_chats(query), "runs": self.list_runs(query)}

    def load_run(self, run_id: str) -> LabRun | None:
        rows = self._read("SELECT id, created, model, prompt, settings, title FROM lab_runs WHERE id = ?", (run_id,))
        if not rows:
            return None
        run_id, created, model, prompt, settings, title = rows[0]
        run = LabRun(run_id, created, model, prompt, json.loads(settings), title=title)
        run.cells = [
            LabCell(index, json.loads(params), output, loads(stats))
            for index, params, output, stats in self._read(
                "SELECT setting_index, params, output, stats FROM lab_cells WHERE run_id = ? ORDER BY setting_index",
                (run_id,))
        ]
        return run


    # ------------------------------------------------------------------------------------ export/import

    def export_chats(self, chat_ids: list[str] | None = None) -> dict[str, Any]:
        """The chats (all when `chat_ids` is None) in the documented export format."""
        ids = chat_ids if chat_ids is not None else [row["id"] for row in self.list_chats()]
        chats = []
        for chat_id in ids:
            chat = self.load_chat(chat_id)
            if chat is None:
                raise StorageError(f"there is no chat {chat_id!r}")
            chats.append(chat)
        return chats_document(chats)

    def import_chats(self, chats: list[Chat]) -> list[str]:
        """Store parsed chats (see parse_chat_export) in one transaction, marked imported; returns their ids.

        A chat keeps its id unless this store already has one by that id (importing a file twice gives copies).
        """
        stats = [checked_stats(chat, f"chat {number}") for number, chat in enumerate(chats, start=1)]
        taken = {row[0] for row in self._read("SELECT id FROM chats")}
        ids = []
        for chat in chats:
            chat_id = chat.id if chat.id and chat.id not in taken else new_id()
            taken.add(chat_id)
            ids.append(chat_id)
        now = time.time()

        def steps(db: sqlite3.Connection) -> None:
            for chat_id, chat, chat_stats in zip(ids, chats, stats):
                db.execute(
                    "INSERT INTO chats (id, title, created, updated, model, system_prompt, imported) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (chat_id, chat.title, chat.created, chat.updated, chat.model, chat.system_prompt, now))
                db.executemany(
                    "INSERT INTO messages (chat_id, position, role, content, stats, created) VALUES (?, ?, ?, ?, ?, ?)",
                    [(chat_id, position, m.role, m.content, m_stats, m.created)
                     for position, (m, m_stats) in enumerate(zip(chat.messages, chat_stats))])

        self._write(steps)
        return ids

    def export_runs_csv(self, run_ids: list[str] | None = None) -> str:
        """Runs as CSV: the lab's results columns, one row per cell, with the run's id and time in front."""
        ids = run_ids if run_ids is not None else [row["id"] for row in self.list_runs()]
        runs = []
        for run_id in ids:
            run = self.load_run(run_id)
            if run is None:
                raise StorageError(f"there is no lab run {run_id!r}")
            runs.append(run)
        return runs_csv(runs)
