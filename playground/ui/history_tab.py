"""History tab: saved chats and sampling-lab runs; reopen a chat in the Chat tab, view a run, export and import."""

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

from playground.manager import get_manager
from playground.storage import (
    MAX_IMPORT_BYTES,
    export_json,
    Storage,
    StorageError,
    read_chat_file,
    run_rows,
)
from playground.ui.chat_tab import ChatTab, display

CHAT_COLUMNS = ["id", "title", "messages", "model", "updated"]
RUN_COLUMNS = ["id", "created", "prompt", "cells", "model"]
PROMPT_PREVIEW_CHARS = 60
HISTORY_OFF = (
    "⚠️ Nothing is being saved: this server has no usable data folder (start it with `--data-dir DIR`; "
    "if it was given, the server log says why the folder could not be opened)."
)


def _local_time(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")


def _one_line(text: str, limit: int) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _selected_row(event: gr.SelectData, shown: Any) -> dict | None:
    row = event.index[0] if isinstance(event.index, (list, tuple)) else event.index
    frame = shown if isinstance(shown, pd.DataFrame) else pd.DataFrame(shown)
    if frame.empty or not 0 <= row < len(frame):
        return None
    return frame.iloc[row].to_dict()


def _html_note(text: str) -> str:
    return f"<p>{escape(text)}</p>"


def _download_path(name: str, suffix: str) -> Path:
    """A fresh file in its own temporary folder (Gradio serves it for download); `name` is made file-name safe."""
    safe = re.sub(r"[^A-Za-z0-9_-]+", "_", name)[:80]
    return Path(tempfile.mkdtemp(prefix="history-")) / f"{safe}-{time.strftime('%Y%m%d-%H%M%S')}{suffix}"


# ----------------------------------------------------------------------------------------------- chats


class HistoryViews:
    """What the History tab shows and does, over one store (None: nothing is saved)."""

    def __init__(self, storage: Storage | None):
        self.storage = storage

    def chats_table(self) -> pd.DataFrame:
        storage = self.storage
        rows = storage.list_chats() if storage else []
        return pd.DataFrame(
            [{**row, "title": row["title"] or "(untitled)", "model": row["model"] or "",
              "updated": _local_time(row["updated"])} for row in rows],
            columns=CHAT_COLUMNS,
        )

    def open_chat(self, chat_id: str, request: gr.Request | None = None):
        """A saved chat -> (note, chatbot, system prompt, history, stats, details, chat id, chat status, tab)."""
        keep = (gr.skip(),) * 8
        storage = self.storage
        if storage is None:
            return (HISTORY_OFF, *keep)
        chat_id = (chat_id or "").strip()
        if not chat_id:
            return ("⚠️ Choose a chat first: click a row of the table (or paste its id).", *keep)
        try:
            chat = storage.load_chat(chat_id)
        except StorageError as exc:
            return (f"⚠️ {exc}", *keep)
        if chat is None:
            return (f"⚠️ There is no saved chat {chat_id!r}.", *keep)
        owner = getattr(request, "session_hash", None)
        if owner:
            get_manager().cancel(owner)  # as Clear does: a reply still streaming into the old chat stops
        history = [{"role": m.role, "content": m.content} for m in chat.messages]
        stats = [(m.stats or {}).get("summary", "") for m in chat.messages if m.role == "assistant"]
        details = [None] * len(stats)  # token details are not saved; Insight skips these replies
        note = f"Opened **{chat.title or '(untitled)'}** ({len(history)} messages) in the Chat tab; new turns continue it."
        if history and history[-1]["role"] == "user":
            note += " Its last message has no reply (the server stopped during it): press **Regenerate** to answer it."
        return (note, display(history, stats), chat.system_prompt, history, stats, details, chat.id,
                f"Reopened saved chat {chat.id}.", gr.Tabs(selected="chat"))

    def new_chat(self, request: gr.Request | None = None):
        owner = getattr(request, "session_hash", None)
        if owner:
            get_manager().cancel(owner)
        return ("Started a new chat: your next message in the Chat tab begins it.", [], "", [], [], [], None,
                "New chat.", gr.Tabs(selected="chat"))

    def export_chats(self, chat_id: str):
        """One chat (its id) or, with no id, every chat -> (JSON file, note)."""
        storage = self.storage
        if storage is None:
            return None, HISTORY_OFF
        chat_id = (chat_id or "").strip()
        try:
            document = storage.export_chats([chat_id] if chat_id else None)
        except StorageError as exc:
            return None, f"⚠️ {exc}"
        if not document["chats"]:
            return None, "No chats are saved yet."
        path = _download_path(f"chat-{chat_id}" if chat_id else "chats", ".json")
        path.write_text(export_json(document), encoding="utf-8")
        count = len(document["chats"])
        return str(path), f"Exported {count} chat{'s' if count != 1 else ''} to `{path.name}`."

    def import_chats(self, file: Any):
        """An exported chats file -> (note, refreshed chats table). Any problem is a message, never a crash."""
        storage = self.storage
        if storage is None:
            return HISTORY_OFF, self.chats_table()
        path = file if isinstance(file, (str, Path)) else getattr(file, "name", None) or (file or {}).get("path")
        if not path:
            return "⚠️ Choose a chat export file (.json) to import first.", self.chats_table()
        try:
            chats = read_chat_file(path)
            ids = storage.import_chats(chats)
        except StorageError as exc:
            return f"⚠️ Import failed: {exc}", self.chats_table()
        titles = ", ".join(f"**{c.title or '(untitled)'}**" for c in chats[:5]) + (" …" if len(chats) > 5 else "")
        return f"Imported {len(ids)} chat{'s' if len(ids) != 1 else ''}: {titles}.", self.chats_table()


    # ------------------------------------------------------------------------------------------------ runs

    def runs_table(self) -> pd.DataFrame:
        storage = self.storage
        rows = storage.list_runs() if storage else []
        return pd.DataFrame(
            [{**row, "created": _local_time(row["created"]), "prompt": _one_line(row["prompt"], PROMPT_PREVIEW_CHARS),
              "model": row["model"] or ""} for row in rows],
            columns=RUN_COLUMNS,
        )

    def open_run(self, run_id: str):
        """A saved lab run -> (its prompt and cells as Markdown, its results table)."""
        storage = self.storage
        if storage is None:
            return _html_note(HISTORY_OFF), None
        run_id = (run_id or "").strip()
        if not run_id:
            return _html_note("⚠️ Choose a run first: click a row of the table (or paste its id)."), None
        try:
            run = storage.load_run(run_id)
        except StorageError as exc:
            return _html_note(f"⚠️ {exc}"), None
        if run is None:
            return _html_note(f"⚠️ There is no saved lab run {run_id!r}."), None
        # Everything from the run is escaped: prompts and model output are shown as text, never as HTML.
        parts = [f"<p><b>Run {run.id}</b> · {_local_time(run.created)} · {escape(run.model or 'unknown model')} · "
                 f"{len(run.cells)} of {len(run.settings)} settings finished</p>",
                 f"<p><b>Prompt:</b></p><pre style='white-space: pre-wrap'>{escape(run.prompt)}</pre>"]
        for cell in run.cells:
            summary = (cell.stats or {}).get("summary", "")
            settings = ", ".join(f"{name} {value}" for name, value in cell.params.items())
            parts.append(f"<p><b>Setting {cell.setting_index + 1}</b> ({escape(settings)})<br><small>{escape(summary)}"
                         f"</small></p><pre style='white-space: pre-wrap'>{escape(cell.output)}</pre>")
        frame = pd.DataFrame(run_rows(run)).drop(columns=["run_id", "run_created", "model", "prompt"], errors="ignore")
        return "\n".join(parts), frame

    def export_runs(self, run_id: str):
        """One run (its id) or, with no id, every run -> (CSV file, note)."""
        storage = self.storage
        if storage is None:
            return None, HISTORY_OFF
        run_id = (run_id or "").strip()
        try:
            if not run_id and not storage.list_runs():
                return None, "No lab runs are saved yet."
            text = storage.export_runs_csv([run_id] if run_id else None)
        except StorageError as exc:
            return None, f"⚠️ {exc}"
        path = _download_path(f"lab-run-{run_id}" if run_id else "lab-runs", ".csv")
        path.write_text(text, encoding="utf-8")
        return str(path), f"Exported {'run ' + run_id if run_id else 'every run'} to `{path.name}`."


    # -------------------------------------------------------------------------------------------------- tab

    def where_saved(self) -> str:
        storage = self.storage
        if storage is None:
            return HISTORY_OFF
        return f"Chats and sampling-lab runs are saved as they happen to `{storage.path}`."


def build_history_tab(chat: ChatTab, storage: Storage | None = None) -> None:
    views = HistoryViews(storage)
    with gr.Tab("History", id="history") as tab:
        gr.Markdown(
            "Your saved chats and sampling-lab runs. Click a chat to select it, then open it in the Chat tab to "
            "read and continue it, or export it. Click a run to see its cells and results."
        )
        gr.Markdown(views.where_saved, elem_id="history-location")
        note = gr.Markdown("", elem_id="history-status")
        with gr.Row():
            new = gr.Button("New chat", variant="primary", elem_id="history-new-chat")
            refresh = gr.Button("Refresh lists", elem_id="history-refresh")

        gr.Markdown("### Chats")
        chats = gr.Dataframe(value=views.chats_table, headers=CHAT_COLUMNS, interactive=False, wrap=True,
                             max_height=320,
                             elem_id="history-chats")
        with gr.Row():
            chat_id = gr.Textbox(label="Chat id", placeholder="click a chat above", scale=2,
                                 elem_id="history-chat-id")
            open_button = gr.Button("Open in Chat tab", variant="primary", elem_id="history-open-chat")
            export_one = gr.Button("Export this chat (JSON)")
            export_all = gr.Button("Export all chats (JSON)")
        chat_file = gr.File(label="Exported chats", interactive=False, elem_id="history-chat-file")
        with gr.Row():
            upload = gr.File(label=f"Import chats: a chat export (.json, up to {MAX_IMPORT_BYTES // 2**20} MB)",
                             file_types=[".json"], type="filepath", elem_id="history-import-file")
            import_button = gr.Button("Import", elem_id="history-import")

        gr.Markdown("### Sampling-lab runs")
        runs = gr.Dataframe(value=views.runs_table, headers=RUN_COLUMNS, interactive=False, wrap=True,
                            max_height=320,
                            elem_id="history-runs")
        with gr.Row():
            run_id = gr.Textbox(label="Run id", placeholder="click a run above", scale=2, elem_id="history-run-id")
            show_run = gr.Button("Show run", elem_id="history-open-run")
            export_run = gr.Button("Export this run (CSV)")
            export_every_run = gr.Button("Export all runs (CSV)")
        run_file = gr.File(label="Exported runs", interactive=False, elem_id="history-run-file")
        run_view = gr.HTML(elem_id="history-run")  # escaped text only (see HistoryViews.open_run)
        run_results = gr.Dataframe(label="Results", interactive=False, wrap=True, elem_id="history-run-results")

        def select_chat(shown, event: gr.SelectData):
            row = _selected_row(event, shown)
            if row is None:
                return gr.skip(), gr.skip()
            return row["id"], f"Selected **{row['title']}** ({row['messages']} messages)."

        def select_run(shown, event: gr.SelectData):
            row = _selected_row(event, shown)
            return (row["id"], *views.open_run(row["id"])) if row else (gr.skip(), gr.skip(), gr.skip())

        # Opening a chat fills the Chat tab's states (hidden from API clients) and switches to that tab.
        opened = [note, chat.chatbot, chat.system_prompt, chat.history, chat.stats, chat.details, chat.chat_id,
                  chat.status, tabs_of(tab)]
        refresh_lists = dict(fn=lambda: (views.chats_table(), views.runs_table()), inputs=None,
                             outputs=[chats, runs])
        tab.select(**refresh_lists, api_name=False, show_progress="hidden")
        refresh.click(**refresh_lists, api_name=False)
        chats.select(select_chat, chats, [chat_id, note], api_name=False)
        runs.select(select_run, runs, [run_id, run_view, run_results], api_name=False)
        # Listing is a quick read: off the queue, like the status line, so it never waits behind a generation.
        hidden_chats = gr.Button(visible=False)
        hidden_chats.click(views.chats_table, None, chats, api_name="history_chats", queue=False)
        hidden_runs = gr.Button(visible=False)
        hidden_runs.click(views.runs_table, None, runs, api_name="history_runs", queue=False)
        open_button.click(views.open_chat, chat_id, opened, api_name="history_open_chat")
        chat_id.submit(views.open_chat, chat_id, opened, api_name=False)
        new.click(views.new_chat, None, opened, api_name="history_new_chat")
        export_one.click(views.export_chats, chat_id, [chat_file, note], api_name="chat_export")
        export_all.click(lambda: views.export_chats(""), None, [chat_file, note], api_name=False)
        import_button.click(views.import_chats, upload, [note, chats], api_name="chat_import")
        show_run.click(views.open_run, run_id, [run_view, run_results], api_name="history_open_run")
        run_id.submit(views.open_run, run_id, [run_view, run_results], api_name=False)
        export_run.click(views.export_runs, run_id, [run_file, note], api_name="runs_export")
        export_every_run.click(lambda: views.export_runs(""), None, [run_file, note], api_name=False)


def tabs_of(tab: gr.Tab) -> gr.Tabs:
    """The gr.Tabs container around `tab` (Gradio makes one when tabs are not put in one explicitly)."""
    parent = tab.parent
    while parent is not None and not isinstance(parent, gr.Tabs):
        parent = parent.parent
    if parent is None:
        raise RuntimeError("the History tab must be inside a gr.Tabs container")
    return parent
