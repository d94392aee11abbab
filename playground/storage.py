"""Chats and sampling-lab runs, saved as they happen to SQLite in the data folder, with JSON/CSV export and import.

Every write is its own committed transaction (WAL journal, full sync), so a crash or a kill loses nothing that
was written before it: the user's turn is written when sent, the reply when it has finished.

Chat export format (JSON, UTF-8)::

    {"format": "yuan-playground-chat", "version": 1, "exported": "2026-01-02T03:04:05+00:00",
     "chats": [{"id": "…", "title": "…", "created": "<ISO 8601>", "updated": "<ISO 8601>", "model": "…" | null,
                "system_prompt": "…",
                "messages": [{"role": "user" | "assistant", "content": "…", "stats": {…} | null,
                              "created": "<ISO 8601>"}]}]}

On import only "format", "version", "chats" and each message's "role" and "content" are required. Files must be
strict JSON (no NaN/Infinity; exports write null); text UTF-8 cannot hold (a lone surrogate, "\\ud800") is refused.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import sqlite3
import stat
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from playground.errors import PlaygroundError, not_unicode

EXPORT_FORMAT = "yuan-playground-chat"
EXPORT_VERSION = 1
MAX_IMPORT_BYTES = 10 * 1024 * 1024
DATABASE_NAME = "playground.sqlite3"
DATABASE_COMPANIONS = ("-wal", "-shm", "-journal")  # SQLite's side files next to the database
PRIVATE_FOLDER_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
SCHEMA_VERSION = 1
TITLE_CHARS = 60
ROLES = ("user", "assistant")
SAFE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
LATEST_TIMESTAMP = 253402300800  # 10000-01-01: later times cannot be written back as ISO 8601

SCHEMA = """
CREATE TABLE IF NOT EXISTS chats (
    id TEXT PRIMARY KEY,
    title TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    model TEXT,
    system_prompt TEXT NOT NULL DEFAULT ''
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
    settings TEXT NOT NULL
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


class StorageError(PlaygroundError):
    """The data folder or its database cannot be read or written."""


class ImportFileError(StorageError):
    """An imported file is not a valid chat export; the message says what is wrong and where."""


def default_data_dir() -> Path:
    """Where chats and runs live unless --data-dir says otherwise: $XDG_DATA_HOME or ~/.local/share."""
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "yuan-playground"


@dataclass
class Message:
    role: str
    content: str
    stats: dict[str, Any] | None = None
    created: float = field(default_factory=time.time)


@dataclass
class Chat:
    id: str
    title: str
    created: float
    updated: float
    model: str | None
    system_prompt: str
    messages: list[Message] = field(default_factory=list)


@dataclass
class LabCell:
    setting_index: int
    params: dict[str, Any]
    output: str
    stats: dict[str, Any] | None = None


@dataclass
class LabRun:
    id: str
    created: float
    model: str | None
    prompt: str
    settings: list[dict[str, Any]]
    cells: list[LabCell] = field(default_factory=list)


def new_id() -> str:
    return uuid.uuid4().hex[:16]


def chat_title(text: str) -> str:
    """A chat's title: its first user message on one line, shortened."""
    line = " ".join(text.split())
    return line if len(line) <= TITLE_CHARS else line[: TITLE_CHARS - 1] + "…"


def iso_time(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="seconds")


def check_text(value: str | None, what: str, error: type[StorageError] = StorageError) -> None:
    """Refuse text UTF-8 (so SQLite) cannot hold: a lone UTF-16 surrogate, e.g. decoded from a JSON "\\ud800"."""
    problem = None if value is None else not_unicode(value, what)
    if problem:
        raise error(problem)


def finite(value: Any) -> Any:
    """`value` with every NaN/Infinity float replaced by None, in nested dicts and lists too."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    return value


def _dumps(value: Any, what: str, error: type[StorageError] = StorageError) -> str | None:
    """Strict JSON for a column (None stays NULL): NaN/Infinity become null (jq, browsers refuse them), text UTF-8."""
    if value is None:
        return None
    try:
        text = json.dumps(finite(value), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:  # a value JSON has no form for (an object, a NaN dict key)
        raise error(f"{what} cannot be saved as JSON: {exc}") from None
    check_text(text, what, error)
    return text


def export_json(document: dict[str, Any]) -> str:
    """An export (see Storage.export_chats) as the text of its .json file: strict JSON, non-finite numbers null."""
    return json.dumps(finite(document), ensure_ascii=False, indent=2, allow_nan=False)


def _make_private(path: Path, mode: int) -> None:
    """Give `path` exactly `mode`, whatever the umask; where chmod is refused (not our file) it stays as it is."""
    try:
        if os.name != "nt" and stat.S_IMODE(path.stat().st_mode) != mode:  # Windows: ACLs decide, not modes
            os.chmod(path, mode)
    except OSError:
        pass  # missing (a side file SQLite removed) or not ours to change: the store works all the same


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


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
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
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

    def _read(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            try:
                cursor = self._db.execute(sql, args)
                return cursor.fetchall()
            except sqlite3.Error as exc:
                raise StorageError(f"reading the history failed: {exc}") from exc
            except UnicodeEncodeError as exc:  # e.g. an id pasted with a lone surrogate
                raise StorageError(not_unicode(exc.object, "the id")) from None

    def _write(self, steps) -> None:
        """Run `steps(db)` in one transaction: all of it is committed, or none of it."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    steps(self._db)
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise StorageError(f"saving to {self.path} failed: {exc}") from exc
            except UnicodeEncodeError as exc:  # text the callers did not check_text; rolled back above
                raise StorageError(not_unicode(exc.object, "the text to save")) from None

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
        stats_json = _dumps(stats, "the message's stats")
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

    def delete_chat(self, chat_id: str) -> None:
        self._write(lambda db: db.execute("DELETE FROM chats WHERE id = ?", (chat_id,)))

    def list_chats(self) -> list[dict[str, Any]]:
        """Every chat, the most recently updated first, with its message count."""
        rows = self._read(
            "SELECT c.id, c.title, c.created, c.updated, c.model, COUNT(m.position) AS messages "
            "FROM chats c LEFT JOIN messages m ON m.chat_id = c.id "
            "GROUP BY c.id ORDER BY c.updated DESC, c.rowid DESC")
        return [dict(zip(("id", "title", "created", "updated", "model", "messages"), row)) for row in rows]

    def load_chat(self, chat_id: str) -> Chat | None:
        rows = self._read("SELECT id, title, created, updated, model, system_prompt FROM chats WHERE id = ?",
                          (chat_id,))
        if not rows:
            return None
        chat = Chat(*rows[0])
        chat.messages = [
            Message(role, content, _loads(stats), created)
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
        settings_json = _dumps(settings, "the lab settings")
        rows = []
        for c in cells:  # every cell is checked before anything is written
            where = f"setting {c.setting_index + 1}"
            check_text(c.output, f"the output of {where}")
            rows.append((run_id, c.setting_index, _dumps(c.params, f"the parameters of {where}"), c.output,
                         _dumps(c.stats, f"the stats of {where}")))

        def steps(db: sqlite3.Connection) -> None:
            db.execute("INSERT INTO lab_runs (id, created, model, prompt, settings) VALUES (?, ?, ?, ?, ?)",
                       (run_id, now, model, prompt, settings_json))
            db.executemany(
                "INSERT INTO lab_cells (run_id, setting_index, params, output, stats) VALUES (?, ?, ?, ?, ?)", rows)

        self._write(steps)
        return run_id

    def list_runs(self) -> list[dict[str, Any]]:
        rows = self._read(
            "SELECT r.id, r.created, r.model, r.prompt, COUNT(c.setting_index) AS cells "
            "FROM lab_runs r LEFT JOIN lab_cells c ON c.run_id = r.id "
            "GROUP BY r.id ORDER BY r.created DESC, r.rowid DESC")
        return [dict(zip(("id", "created", "model", "prompt", "cells"), row)) for row in rows]

    def load_run(self, run_id: str) -> LabRun | None:
        rows = self._read("SELECT id, created, model, prompt, settings FROM lab_runs WHERE id = ?", (run_id,))
        if not rows:
            return None
        run_id, created, model, prompt, settings = rows[0]
        run = LabRun(run_id, created, model, prompt, json.loads(settings))
        run.cells = [
            LabCell(index, json.loads(params), output, _loads(stats))
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
            chats.append({
                "id": chat.id, "title": chat.title, "created": iso_time(chat.created),
                "updated": iso_time(chat.updated), "model": chat.model, "system_prompt": chat.system_prompt,
                "messages": [{"role": m.role, "content": m.content, "stats": finite(m.stats),
                              "created": iso_time(m.created)} for m in chat.messages],
            })
        return {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "exported": iso_time(time.time()),
                "chats": chats}

    def import_chats(self, chats: list[Chat]) -> list[str]:
        """Store parsed chats (see parse_chat_export) in one transaction; returns their ids.

        A chat keeps its id unless this store already has one by that id (importing a file twice gives copies).
        """
        stats = [_checked_stats(chat, f"chat {number}") for number, chat in enumerate(chats, start=1)]
        taken = {row[0] for row in self._read("SELECT id FROM chats")}
        ids = []
        for chat in chats:
            chat_id = chat.id if chat.id and chat.id not in taken else new_id()
            taken.add(chat_id)
            ids.append(chat_id)

        def steps(db: sqlite3.Connection) -> None:
            for chat_id, chat, chat_stats in zip(ids, chats, stats):
                db.execute(
                    "INSERT INTO chats (id, title, created, updated, model, system_prompt) VALUES (?, ?, ?, ?, ?, ?)",
                    (chat_id, chat.title, chat.created, chat.updated, chat.model, chat.system_prompt))
                db.executemany(
                    "INSERT INTO messages (chat_id, position, role, content, stats, created) VALUES (?, ?, ?, ?, ?, ?)",
                    [(chat_id, position, m.role, m.content, m_stats, m.created)
                     for position, (m, m_stats) in enumerate(zip(chat.messages, chat_stats))])

        self._write(steps)
        return ids

    def export_runs_csv(self, run_ids: list[str] | None = None) -> str:
        """Runs as CSV: the lab's results columns, one row per cell, with the run's id and time in front."""
        ids = run_ids if run_ids is not None else [row["id"] for row in self.list_runs()]
        rows = []
        for run_id in ids:
            run = self.load_run(run_id)
            if run is None:
                raise StorageError(f"there is no lab run {run_id!r}")
            rows.extend(run_rows(run))
        columns: list[str] = []
        for row in rows:
            columns.extend(key for key in row if key not in columns)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns or ["run_id"])
        writer.writeheader()
        writer.writerows(rows)
        return buffer.getvalue()


def _checked_stats(chat: Chat, where: str) -> list[str | None]:
    """Check a chat's text can be stored, before any chat is written; returns its messages' stats as column JSON."""
    for value, name in ((chat.title, "title"), (chat.model, "model"), (chat.system_prompt, "system_prompt")):
        check_text(value, f"{where}: {name!r}")
    for index, message in enumerate(chat.messages, start=1):
        check_text(message.content, f"{where}, message {index}: 'content'")
    return [_dumps(m.stats, f"{where}, message {index}: 'stats'") for index, m in enumerate(chat.messages, start=1)]


def run_rows(run: LabRun) -> list[dict[str, Any]]:
    """One results row per cell, with the sampling lab's own columns (results_frame) after the run's id."""
    rows = []
    for cell in run.cells:
        row: dict[str, Any] = {"run_id": run.id, "run_created": iso_time(run.created), "model": run.model,
                               "setting": cell.setting_index + 1, **cell.params}
        stats = cell.stats or {}
        if stats:
            text = cell.output
            row.update(
                seed=stats.get("seed"), prompt_tokens=stats.get("prompt_tokens"), new_tokens=stats.get("new_tokens"),
                time_to_first_token_s=round(stats.get("time_to_first_token_s") or 0, 3),
                decode_tokens_per_s=round(stats.get("decode_tokens_per_s") or 0, 2),
                total_s=round(stats.get("total_s") or 0, 3), finish_reason=stats.get("finish_reason"),
                characters=len(text), words=len(text.split()),
            )
        row.update(prompt=run.prompt, output=cell.output)
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------ import parsing


def _timestamp(value: Any, where: str, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < LATEST_TIMESTAMP:
        return float(value)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            pass
        else:
            timestamp = (parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)).timestamp()
            if 0 <= timestamp < LATEST_TIMESTAMP:
                return timestamp
    raise ImportFileError(f"{where}: 'created'/'updated' must be an ISO 8601 time, got {value!r}")


def _text(value: Any, where: str, name: str, default: str | None = None) -> str:
    if value is None and default is not None:
        return default
    if not isinstance(value, str):
        raise ImportFileError(f"{where}: {name!r} must be text, got {type(value).__name__}")
    check_text(value, f"{where}: {name!r}", ImportFileError)
    return value


def _not_strict_json(constant: str) -> None:
    # Python's json reads NaN/Infinity/-Infinity, but they are not JSON: jq, browsers and other tools refuse them
    raise ImportFileError(f"the file is not strict JSON: {constant} is not a JSON value")


def parse_chat_export(data: bytes) -> list[Chat]:
    """Validate an exported chats file; raises ImportFileError naming what is wrong (and where)."""
    if len(data) > MAX_IMPORT_BYTES:
        raise ImportFileError(f"the file is {len(data) / 2**20:.1f} MB; chat files up to "
                              f"{MAX_IMPORT_BYTES // 2**20} MB can be imported")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ImportFileError(f"the file is not UTF-8 text (byte {exc.start} cannot be read); "
                              "choose a chat export (.json)") from None
    try:
        document = json.loads(text, parse_constant=_not_strict_json)
    except json.JSONDecodeError as exc:
        raise ImportFileError(
            f"the file is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from None
    except (ValueError, RecursionError) as exc:  # e.g. a number too long to read, nesting too deep
        raise ImportFileError(f"the file is not valid JSON: {exc}") from None
    if not isinstance(document, dict) or document.get("format") != EXPORT_FORMAT:
        raise ImportFileError(f"this is not a chat export: it needs \"format\": \"{EXPORT_FORMAT}\"")
    if document.get("version") != EXPORT_VERSION:
        raise ImportFileError(f"chat export version {document.get('version')!r} is not supported "
                              f"(this playground reads version {EXPORT_VERSION})")
    items = document.get("chats")
    if not isinstance(items, list):
        raise ImportFileError("\"chats\" must be a list of chats")
    if not items:
        raise ImportFileError("the file holds no chats")
    now = time.time()
    chats = []
    for number, item in enumerate(items, start=1):
        where = f"chat {number}"
        if not isinstance(item, dict):
            raise ImportFileError(f"{where}: must be an object")
        raw_messages = item.get("messages")
        if not isinstance(raw_messages, list):
            raise ImportFileError(f"{where}: \"messages\" must be a list")
        messages = []
        for index, raw in enumerate(raw_messages, start=1):
            at = f"{where}, message {index}"
            if not isinstance(raw, dict):
                raise ImportFileError(f"{at}: must be an object with \"role\" and \"content\"")
            if raw.get("role") not in ROLES:
                raise ImportFileError(f"{at}: \"role\" must be \"user\" or \"assistant\", got {raw.get('role')!r}")
            stats = raw.get("stats")
            if stats is not None and not isinstance(stats, dict):
                raise ImportFileError(f"{at}: \"stats\" must be an object or null")
            _dumps(stats, f"{at}: \"stats\"", ImportFileError)  # its text (keys too) must be storable
            messages.append(Message(raw["role"], _text(raw.get("content"), at, "content"), stats,
                                    _timestamp(raw.get("created"), at, now)))
        model = item.get("model")
        if model is not None and not isinstance(model, str):
            raise ImportFileError(f"{where}: \"model\" must be text or null")
        check_text(model, f"{where}: 'model'", ImportFileError)
        first_user = next((m.content for m in messages if m.role == "user"), "")
        created = _timestamp(item.get("created"), where, now)
        chat_id = item.get("id")
        chats.append(Chat(
            # an id that is not plain letters/digits is replaced: ids end up in download file names
            id=chat_id if isinstance(chat_id, str) and SAFE_ID.fullmatch(chat_id) else "",
            title=_text(item.get("title"), where, "title", default="") or chat_title(first_user),
            created=created, updated=_timestamp(item.get("updated"), where, created), model=model,
            system_prompt=_text(item.get("system_prompt"), where, "system_prompt", default=""), messages=messages,
        ))
    return chats


def read_chat_file(path: str | os.PathLike) -> list[Chat]:
    """parse_chat_export for a file on disk; the size is checked before the file is read."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_IMPORT_BYTES:
            raise ImportFileError(f"the file is {size / 2**20:.1f} MB; chat files up to "
                                  f"{MAX_IMPORT_BYTES // 2**20} MB can be imported")
        data = path.read_bytes()
    except OSError as exc:
        raise ImportFileError(f"cannot read the file: {exc}") from exc
    return parse_chat_export(data)
