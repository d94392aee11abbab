"""What the History tab shows and does, as plain values: the chats and runs lists, a chat or a run reopened,
renamed, deleted, exported or imported. These are also the tab's API endpoints; ui/history_tab.py lays them out."""

from __future__ import annotations

import re
import tempfile
import time
from datetime import datetime
from html import escape
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from playground.manager import ModelManager
from playground.storage import Storage
from playground.storage_exchange import (
    MAX_IMPORT_BYTES,
    StorageError,
    export_json,
    megabytes,
    read_chat_file,
    run_rows,
)
from playground.ui.chat_tab import reopened_note, saved_chat_states
from playground.ui.controls import session_owner
from playground.insight import for_people
from playground.ui.lab_tab import SETTING_FIELDS, describe, varying_fields

# "found": with a search, where it matched (a few words around it); empty otherwise.
CHAT_COLUMNS = ["title", "found", "updated", "messages", "model", "id"]
RUN_COLUMNS = ["title", "found", "created", "cells", "model", "id"]
SNIPPET_CONTEXT_CHARS = 30  # on each side of the match
IMPORTED = " (imported)"  # after an imported chat's title, so a copy never looks like its original
PROMPT_PREVIEW_CHARS = 60
HISTORY_OFF = (
    "⚠️ Nothing is being saved: this server has no usable data folder (start it with `--data-dir DIR`; "
    "if it was given, the server log says why the folder could not be opened)."
)


def _local_time(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M")


def _one_line(text: str, limit: int) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def snippet(text: str, query: str) -> str:
    """The words around the first place `text` holds `query` (any case), on one line; empty without a query."""
    if not query:
        return ""
    line = " ".join(str(text).split())
    at = line.casefold().find(query.casefold())
    if at < 0:
        return ""
    start, end = max(0, at - SNIPPET_CONTEXT_CHARS), min(len(line), at + len(query) + SNIPPET_CONTEXT_CHARS)
    return ("…" if start else "") + line[start:end] + ("…" if end < len(line) else "")


def run_title(prompt: str, settings: list[dict]) -> str:
    """An untitled run's name: its prompt, and what its settings vary (runs of one prompt differ there)."""
    varying = varying_fields(settings or [])
    values = {name: " / ".join(for_people(row.get(name)) or "random" for row in settings) for name in varying}
    what = "; ".join(f"{name} {shown}" for name, shown in values.items())
    return _one_line(prompt, PROMPT_PREVIEW_CHARS) + (f" · {what}" if what else "")


def md_text(text: str) -> str:
    """User text inside a Markdown note: shown as typed, never as formatting or links."""
    return re.sub(r"([\\`*_\[\]()#<>!|~{}])", r"\\\1", str(text))


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _html_note(text: str) -> str:
    return f"<p>{escape(text)}</p>"


def _download_path(name: str, suffix: str) -> Path:
    """A fresh file in its own temporary folder (Gradio serves it for download); `name` is made file-name safe."""
    safe = re.sub(r"[^A-Za-z0-9_-]+", "_", name)[:80]
    return Path(tempfile.mkdtemp(prefix="history-")) / f"{safe}-{time.strftime('%Y%m%d-%H%M%S')}{suffix}"


def _caption(count: int, noun: str, query: str, searched: str, none_yet: str, hint: str) -> str:
    """The line above a list: how many it shows, or why it shows none."""
    if query and not count:
        return f"No {noun} has “{md_text(query)}” in {searched}."
    if query:
        return f"{plural(count, noun)} with “{md_text(query)}” in {searched}. {hint}"
    return f"{plural(count, 'saved ' + noun)}. {hint}" if count else none_yet


class HistoryViews:
    """What the History tab shows and does, over one store (None: nothing is saved). Plain values: these are
    also the API endpoints."""

    def __init__(self, manager: ModelManager, storage: Storage | None, import_limit: int = MAX_IMPORT_BYTES):
        self.manager = manager
        self.storage = storage
        self.import_limit = import_limit  # the largest chat file this server takes (storage_exchange.import_limit_bytes)

    def _choose(self, row_id: str, kind: str) -> str | None:
        """Why nothing can be done to the row (no store, no id), or None."""
        if self.storage is None:
            return HISTORY_OFF
        return None if row_id else f"⚠️ Choose a {kind} first: click a row of the list."

    # ------------------------------------------------------------------------------------------------- chats

    def chats_table(self, query: str = "") -> pd.DataFrame:
        rows = self.storage.list_chats(query) if self.storage else []
        return pd.DataFrame(
            [{"title": (row["title"] or "(untitled)") + (IMPORTED if row["imported"] else ""),
              "found": snippet(row["hit"] or row["title"] or "", query),
              "updated": _local_time(row["updated"]), "messages": row["messages"], "model": row["model"] or "",
              "id": row["id"]} for row in rows],
            columns=CHAT_COLUMNS,
        )

    def chats_caption(self, shown: pd.DataFrame, query: str) -> str:
        if self.storage is None:
            return ""
        return _caption(len(shown), "chat", query, "its title or messages",
                        "No chats saved yet: what you send in the Chat tab appears here.",
                        "Click one to open, rename, export or delete it.")

    def open_chat(self, chat_id: str, request: gr.Request | None = None):
        """A saved chat -> (note, chatbot, system prompt, history, stats, details, chat id, chat status, tab)."""
        keep = (gr.skip(),) * 8
        chat_id = (chat_id or "").strip()
        refusal = self._choose(chat_id, "chat")
        if refusal:
            return (refusal, *keep)
        try:
            chat = self.storage.load_chat(chat_id)
        except StorageError as exc:
            return (f"⚠️ {exc}", *keep)
        if chat is None:
            return (f"⚠️ There is no saved chat {chat_id!r}.", *keep)
        owner = session_owner(request)
        if owner:
            self.manager.cancel(owner)  # as Clear does: a reply still streaming into the old chat stops
        states = saved_chat_states(chat)  # (chatbot, system prompt, history, stats, details, chat id)
        history = states[2]
        note = (f"Opened **{md_text(chat.title or '(untitled)')}** ({len(history)} messages) in the Chat tab; "
                "new turns continue it.")
        return (note, *states, reopened_note(chat), gr.Tabs(selected="chat"))

    def new_chat(self, request: gr.Request | None = None):
        owner = session_owner(request)
        if owner:
            self.manager.cancel(owner)
        return ("Started a new chat: your next message in the Chat tab begins it.", [], "", [], [], [], None,
                "New chat.", gr.Tabs(selected="chat"))

    def rename_chat(self, chat_id: str, title: str) -> tuple[str, pd.DataFrame]:
        """-> (note, chats table)."""
        chat_id = (chat_id or "").strip()
        note = self._choose(chat_id, "chat") or self._renamed(self.storage.rename_chat, chat_id, title)
        return note, self.chats_table()

    def delete_chat(self, chat_id: str) -> tuple[str, pd.DataFrame]:
        """-> (note, chats table). No confirmation here: the page asks for a second click."""
        chat_id = (chat_id or "").strip()
        refusal = self._choose(chat_id, "chat")
        if refusal:
            return refusal, self.chats_table()
        try:
            chat = self.storage.load_chat(chat_id)
            gone = chat is not None and self.storage.delete_chat(chat_id)
        except StorageError as exc:
            return f"⚠️ Not deleted: {exc}", self.chats_table()
        if not gone:
            return f"⚠️ There is no saved chat {chat_id!r} (deleted already?).", self.chats_table()
        return f"Deleted the chat **{md_text(chat.title or '(untitled)')}**.", self.chats_table()

    def export_chats(self, chat_id: str):
        """One chat (its id) or, with no id, every chat -> (JSON file, note)."""
        if self.storage is None:
            return None, HISTORY_OFF
        chat_id = (chat_id or "").strip()
        try:
            document = self.storage.export_chats([chat_id] if chat_id else None)
        except StorageError as exc:
            return None, f"⚠️ {exc}"
        if not document["chats"]:
            return None, "No chats are saved yet."
        path = _download_path(f"chat-{chat_id}" if chat_id else "chats", ".json")
        path.write_text(export_json(document), encoding="utf-8")
        note = f"Exported {plural(len(document['chats']), 'chat')} to `{path.name}`: download it below."
        size = path.stat().st_size
        if size > self.import_limit:  # said now, not when the file is refused later
            note += (f" ⚠️ It is {megabytes(size)}, more than this server imports ({megabytes(self.import_limit)}, "
                     "set by --max-request-bytes): export chats one at a time to move them to another playground.")
        return str(path), note

    def import_chats(self, file: Any):
        """An exported chats file -> (note, refreshed chats table). Any problem is a message, never a crash."""
        if self.storage is None:
            return HISTORY_OFF, self.chats_table()
        path = file if isinstance(file, (str, Path)) else getattr(file, "name", None) or (file or {}).get("path")
        if not path:
            return "⚠️ Choose a chat export file (.json) to import first.", self.chats_table()
        try:
            chats = read_chat_file(path, self.import_limit)
            ids = self.storage.import_chats(chats)
        except StorageError as exc:
            return f"⚠️ Import failed: {exc}", self.chats_table()
        titles = ", ".join(f"**{md_text(c.title or '(untitled)')}**" for c in chats[:5]) + (" …" if chats[5:] else "")
        return (f"Imported {plural(len(ids), 'chat')}: {titles}. The list marks imported chats "
                f"“{IMPORTED.strip()}”.", self.chats_table())

    # -------------------------------------------------------------------------------------------------- runs

    def runs_table(self, query: str = "") -> pd.DataFrame:
        rows = self.storage.list_runs(query) if self.storage else []
        return pd.DataFrame(
            [{"title": row["title"] or run_title(row["prompt"], row["settings"]),
              "found": snippet(row["hit"] or f"{row['title'] or ''} {row['prompt']}", query),
              "created": _local_time(row["created"]), "cells": row["cells"], "model": row["model"] or "",
              "id": row["id"]} for row in rows],
            columns=RUN_COLUMNS,
        )

    def runs_caption(self, shown: pd.DataFrame, query: str) -> str:
        if self.storage is None:
            return ""
        return _caption(len(shown), "run", query, "its title, prompt or outputs",
                        "No lab runs saved yet: each finished run in the Sampling lab appears here.",
                        "Click one to see it, open it in the lab, rename, export or delete it.")

    def open_run(self, run_id: str):
        """A saved lab run -> (its prompt and cells as HTML, its results table)."""
        run_id = (run_id or "").strip()
        refusal = self._choose(run_id, "run")
        if refusal:
            return _html_note(refusal), None
        try:
            run = self.storage.load_run(run_id)
        except StorageError as exc:
            return _html_note(f"⚠️ {exc}"), None
        if run is None:
            return _html_note(f"⚠️ There is no saved lab run {run_id!r}."), None
        # Everything from the run is escaped: prompts and model output are shown as text, never as HTML.
        name = f"{escape(run.title)} · " if run.title else ""
        parts = [f"<p><b>{name}Run {run.id}</b> · {_local_time(run.created)} · {escape(run.model or 'unknown model')}"
                 f" · {len(run.cells)} of {len(run.settings)} settings finished</p>",
                 f"<p><b>Prompt:</b></p><pre style='white-space: pre-wrap'>{escape(run.prompt)}</pre>"]
        for cell in run.cells:
            summary = (cell.stats or {}).get("summary", "")
            settings = describe(cell.params, list(cell.params))
            parts.append(f"<p><b>Setting {cell.setting_index + 1}</b> ({escape(settings)})<br><small>{escape(summary)}"
                         f"</small></p><pre style='white-space: pre-wrap'>{escape(cell.output)}</pre>")
        frame = pd.DataFrame(run_rows(run)).drop(columns=["run_id", "run_created", "model", "prompt"], errors="ignore")
        return "\n".join(parts), frame

    def run_to_lab(self, run_id: str):
        """A saved run's prompt and settings back into the Sampling lab -> (note, lab prompt, lab table, tab)."""
        keep = (gr.skip(),) * 3
        run_id = (run_id or "").strip()
        refusal = self._choose(run_id, "run")
        if refusal:
            return (refusal, *keep)
        try:
            run = self.storage.load_run(run_id)
        except StorageError as exc:
            return (f"⚠️ {exc}", *keep)
        if run is None:
            return (f"⚠️ There is no saved lab run {run_id!r}.", *keep)
        # the saved settings are the table's rows as they were run (lab_tab.save_run), a column each field
        table = pd.DataFrame([{name: row.get(name) for name in SETTING_FIELDS} for row in run.settings],
                             columns=SETTING_FIELDS)
        name = run.title or _one_line(run.prompt, PROMPT_PREVIEW_CHARS)
        note = (f"Opened run **{md_text(name)}** in the Sampling lab ({plural(len(table), 'setting')}): press "
                "**Run** there to run it again.")
        return note, run.prompt, table, gr.Tabs(selected="lab")

    def rename_run(self, run_id: str, title: str) -> tuple[str, pd.DataFrame]:
        """-> (note, runs table)."""
        run_id = (run_id or "").strip()
        note = self._choose(run_id, "run") or self._renamed(self.storage.rename_run, run_id, title)
        return note, self.runs_table()

    def delete_run(self, run_id: str) -> tuple[str, pd.DataFrame]:
        """-> (note, runs table). No confirmation here: the page asks for a second click."""
        run_id = (run_id or "").strip()
        refusal = self._choose(run_id, "run")
        if refusal:
            return refusal, self.runs_table()
        try:
            gone = self.storage.delete_run(run_id)
        except StorageError as exc:
            return f"⚠️ Not deleted: {exc}", self.runs_table()
        if not gone:
            return f"⚠️ There is no saved lab run {run_id!r} (deleted already?).", self.runs_table()
        return f"Deleted the lab run {run_id}.", self.runs_table()

    def export_runs(self, run_id: str):
        """One run (its id) or, with no id, every run -> (CSV file, note)."""
        if self.storage is None:
            return None, HISTORY_OFF
        run_id = (run_id or "").strip()
        try:
            if not run_id and not self.storage.list_runs():
                return None, "No lab runs are saved yet."
            text = self.storage.export_runs_csv([run_id] if run_id else None)
        except StorageError as exc:
            return None, f"⚠️ {exc}"
        path = _download_path(f"lab-run-{run_id}" if run_id else "lab-runs", ".csv")
        path.write_text(text, encoding="utf-8")
        return str(path), f"Exported {'run ' + run_id if run_id else 'every run'} to `{path.name}`: download it below."

    # --------------------------------------------------------------------------------------------------- both

    @staticmethod
    def _renamed(rename, row_id: str, title: str) -> str:
        try:
            rename(row_id, title)
        except StorageError as exc:
            return f"⚠️ Not renamed: {exc}."
        return f"Renamed to **{md_text(' '.join(str(title).split()))}**."

    def search(self, query: str) -> tuple[str, pd.DataFrame, pd.DataFrame]:
        """-> (note, chats, runs): the chats and runs holding `query`, in any case; a refused query says why."""
        query = (query or "").strip()
        try:
            chats, runs = self.chats_table(query), self.runs_table(query)
        except StorageError as exc:
            return f"⚠️ {exc}", self.chats_table(), self.runs_table()
        return f"{plural(len(chats), 'chat')} and {plural(len(runs), 'run')} found.", chats, runs

    def where_saved(self) -> str:
        if self.storage is None:
            return HISTORY_OFF
        return f"Chats and sampling-lab runs are saved as they happen to `{self.storage.path}`."
