"""What the store holds and how it leaves and enters it: the chat and lab-run records, the checks on their text,
strict JSON, the chat export format (JSON) and the lab runs' CSV. No database here (that is playground/storage.py).

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
UPLOAD_OVERHEAD_BYTES = 64 * 1024  # room for a multipart upload's headers and boundaries
TITLE_CHARS = 60  # a title made from the first message
MAX_TITLE_CHARS = 200  # a title the user gives
ROLES = ("user", "assistant")
SAFE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
LATEST_TIMESTAMP = 253402300800  # 10000-01-01: later times cannot be written back as ISO 8601


class StorageError(PlaygroundError):
    """The data folder or its database cannot be read or written."""


class ImportFileError(StorageError):
    """An imported file is not a valid chat export; the message says what is wrong and where."""


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
    imported: float | None = None  # when this copy was imported; None for a chat made here


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
    title: str | None = None  # given by the user; None shows the prompt


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


def checked_title(title: Any) -> str:
    """A title the user typed, on one line; refused when empty, too long or not storable."""
    if not isinstance(title, str):
        raise StorageError(f"a title must be text, got {type(title).__name__}")
    check_text(title, "the title")
    line = " ".join(title.split())
    if not line:
        raise StorageError("the title is empty: type a name first")
    if len(line) > MAX_TITLE_CHARS:
        raise StorageError(f"the title is {len(line)} characters; at most {MAX_TITLE_CHARS} are kept")
    return line


def finite(value: Any) -> Any:
    """`value` with every NaN/Infinity float replaced by None, in nested dicts and lists too."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    return value


def dumps(value: Any, what: str, error: type[StorageError] = StorageError) -> str | None:
    """Strict JSON for a column (None stays NULL): NaN/Infinity become null (jq, browsers refuse them), text UTF-8."""
    if value is None:
        return None
    try:
        text = json.dumps(finite(value), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:  # a value JSON has no form for (an object, a NaN dict key)
        raise error(f"{what} cannot be saved as JSON: {exc}") from None
    check_text(text, what, error)
    return text


def loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def export_json(document: dict[str, Any]) -> str:
    """An export (see Storage.export_chats) as the text of its .json file: strict JSON, non-finite numbers null."""
    return json.dumps(finite(document), ensure_ascii=False, indent=2, allow_nan=False)


def checked_stats(chat: Chat, where: str) -> list[str | None]:
    """Check a chat's text can be stored, before any chat is written; returns its messages' stats as column JSON."""
    for value, name in ((chat.title, "title"), (chat.model, "model"), (chat.system_prompt, "system_prompt")):
        check_text(value, f"{where}: {name!r}")
    for index, message in enumerate(chat.messages, start=1):
        check_text(message.content, f"{where}, message {index}: 'content'")
    return [dumps(m.stats, f"{where}, message {index}: 'stats'") for index, m in enumerate(chat.messages, start=1)]


# ------------------------------------------------------------------------------------------------- export


def chats_document(chats: list[Chat]) -> dict[str, Any]:
    """Chats in the documented export format."""
    return {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "exported": iso_time(time.time()), "chats": [
        {"id": chat.id, "title": chat.title, "created": iso_time(chat.created), "updated": iso_time(chat.updated),
         "model": chat.model, "system_prompt": chat.system_prompt,
         "messages": [{"role": m.role, "content": m.content, "stats": finite(m.stats),
                       "created": iso_time(m.created)} for m in chat.messages]}
        for chat in chats]}


def result_row(setting: int, params: dict[str, Any], prompt: str, output: str,
               stats: dict[str, Any] | None) -> dict[str, Any]:
    """One setting's results row: its parameters and metrics (the lab's CSV and table, and History's export of a
    run, have the same columns). A setting that never ran has "not run" as its finish and no metrics."""
    row: dict[str, Any] = {"setting": setting, **params}
    if stats:
        row.update(
            seed=stats.get("seed"), prompt_tokens=stats.get("prompt_tokens"),
            cached_prompt_tokens=stats.get("cached_tokens"), new_tokens=stats.get("new_tokens"),
            time_to_first_token_s=round(stats.get("time_to_first_token_s") or 0, 3),
            decode_tokens_per_s=round(stats.get("decode_tokens_per_s") or 0, 2),
            total_s=round(stats.get("total_s") or 0, 3), finish_reason=stats.get("finish_reason"),
            characters=len(output), words=len(output.split()), mean_logprob=stats.get("mean_logprob"),
        )
    else:
        row.update(finish_reason="not run")
    row.update(prompt=prompt, output=output)
    return row


def run_rows(run: LabRun) -> list[dict[str, Any]]:
    """One results row per finished cell (`result_row`) after the run's id, time and model."""
    return [{"run_id": run.id, "run_created": iso_time(run.created), "model": run.model,
             **result_row(cell.setting_index + 1, cell.params, run.prompt, cell.output, cell.stats)}
            for cell in run.cells]


def runs_csv(runs: list[LabRun]) -> str:
    """Runs as CSV: the lab's results columns, one row per cell, with the run's id and time in front."""
    rows = [row for run in runs for row in run_rows(run)]
    columns: list[str] = []
    for row in rows:
        columns.extend(key for key in row if key not in columns)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns or ["run_id"])
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


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


def import_limit_bytes(max_request_bytes: int | None = None) -> int:
    """The largest chat file this server imports: MAX_IMPORT_BYTES, or less where the server's request limit
    (--max-request-bytes) would refuse the upload first (a multipart upload adds a few hundred bytes)."""
    if max_request_bytes is None:
        return MAX_IMPORT_BYTES
    return max(0, min(MAX_IMPORT_BYTES, max_request_bytes - UPLOAD_OVERHEAD_BYTES))


def megabytes(size: int) -> str:
    return f"{size / 2**20:.1f} MB"


def _check_size(size: int, limit: int) -> None:
    if size > limit:
        raise ImportFileError(f"the file is {megabytes(size)}; this server imports chat files up to {megabytes(limit)}")


def _document(data: bytes, limit: int = MAX_IMPORT_BYTES) -> dict[str, Any]:
    """The file's JSON object, checked to be a chat export of the version this playground reads."""
    _check_size(len(data), limit)
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
    return document


def _message(raw: Any, at: str, now: float) -> Message:
    if not isinstance(raw, dict):
        raise ImportFileError(f"{at}: must be an object with \"role\" and \"content\"")
    if raw.get("role") not in ROLES:
        raise ImportFileError(f"{at}: \"role\" must be \"user\" or \"assistant\", got {raw.get('role')!r}")
    stats = raw.get("stats")
    if stats is not None and not isinstance(stats, dict):
        raise ImportFileError(f"{at}: \"stats\" must be an object or null")
    dumps(stats, f"{at}: \"stats\"", ImportFileError)  # its text (keys too) must be storable
    content = _text(raw.get("content"), at, "content")
    return Message(raw["role"], content, stats, _timestamp(raw.get("created"), at, now))


def _chat(item: Any, where: str, now: float) -> Chat:
    if not isinstance(item, dict):
        raise ImportFileError(f"{where}: must be an object")
    raw_messages = item.get("messages")
    if not isinstance(raw_messages, list):
        raise ImportFileError(f"{where}: \"messages\" must be a list")
    messages = [_message(raw, f"{where}, message {index}", now) for index, raw in enumerate(raw_messages, start=1)]
    model = item.get("model")
    if model is not None and not isinstance(model, str):
        raise ImportFileError(f"{where}: \"model\" must be text or null")
    check_text(model, f"{where}: 'model'", ImportFileError)
    first_user = next((m.content for m in messages if m.role == "user"), "")
    created = _timestamp(item.get("created"), where, now)
    chat_id = item.get("id")
    return Chat(
        # an id that is not plain letters/digits is replaced: ids end up in download file names
        id=chat_id if isinstance(chat_id, str) and SAFE_ID.fullmatch(chat_id) else "",
        title=_text(item.get("title"), where, "title", default="") or chat_title(first_user),
        created=created, updated=_timestamp(item.get("updated"), where, created), model=model,
        system_prompt=_text(item.get("system_prompt"), where, "system_prompt", default=""), messages=messages,
    )


def parse_chat_export(data: bytes, limit: int = MAX_IMPORT_BYTES) -> list[Chat]:
    """Validate an exported chats file; raises ImportFileError naming what is wrong (and where)."""
    items = _document(data, limit).get("chats")
    if not isinstance(items, list):
        raise ImportFileError("\"chats\" must be a list of chats")
    if not items:
        raise ImportFileError("the file holds no chats")
    now = time.time()
    return [_chat(item, f"chat {number}", now) for number, item in enumerate(items, start=1)]


def read_chat_file(path: str | os.PathLike, limit: int = MAX_IMPORT_BYTES) -> list[Chat]:
    """parse_chat_export for a file on disk; the size is checked before the file is read."""
    path = Path(path)
    try:
        _check_size(path.stat().st_size, limit)
        data = path.read_bytes()
    except OSError as exc:
        raise ImportFileError(f"cannot read the file: {exc}") from exc
    return parse_chat_export(data, limit)
