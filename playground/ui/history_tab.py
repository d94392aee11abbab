"""History tab: saved chats and sampling-lab runs; search them, reopen a chat in the Chat tab or a run in the lab,
rename, delete, export and import.

The API endpoints (`/history_chats`, `/chat_export`, …) return plain values (history_views.HistoryViews); the page's
own events wrap them into updates that also show or hide what has or lacks content (an empty list, an export not
made yet), and clear what an earlier action showed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr
import pandas as pd

from playground.manager import ModelManager
from playground.storage import Storage
from playground.storage_exchange import MAX_IMPORT_BYTES, StorageError, megabytes
from playground.ui.chat_tab import ChatTab
from playground.ui.controls import session_owner
from playground.ui.history_views import CHAT_COLUMNS, RUN_COLUMNS, HistoryViews, md_text, plural
from playground.ui.lab_tab import LabTab

DELETE_LABEL = "Delete"
CONFIRM_LABEL = "Click again to delete"


def _row_id(event: gr.SelectData, shown: Any) -> str | None:
    """The id (the last column) of the clicked row."""
    if event.row_value:  # the clicked row as displayed, sorted or not
        return str(event.row_value[-1])
    row = event.index[0] if isinstance(event.index, (list, tuple)) else event.index
    frame = shown if isinstance(shown, pd.DataFrame) else pd.DataFrame(shown)
    return str(frame.iloc[row]["id"]) if "id" in frame and 0 <= row < len(frame) else None


def _shown_if_file(path: Any) -> dict:
    """An export's file box, shown only once there is a file in it."""
    return gr.update(visible=bool(path))


@dataclass
class ListPanel:
    """One list of the tab (chats or runs) and the controls for its selected row."""

    table: gr.Dataframe
    caption: gr.Markdown
    note: gr.Markdown  # what the last action here did; replaced by the next one
    selected: gr.Textbox  # the selected row's id: hidden, but the API endpoints' input
    actions: gr.Row  # rename, open, export, delete: shown once a row is selected
    title: gr.Textbox
    delete: gr.Button
    armed: gr.State  # the id a first click on Delete asked to delete
    file: gr.File  # the last export: shown once there is one

    def components(self) -> list:
        return [self.table, self.caption, self.note, self.selected, self.actions, self.title, self.delete,
                self.armed, self.file]

    def listed(self, frame: pd.DataFrame, caption: str) -> dict:
        return {self.table: gr.update(value=frame, visible=not frame.empty), self.caption: caption}

    def disarmed(self) -> dict:
        return {self.armed: None, self.delete: gr.update(value=DELETE_LABEL, variant="secondary")}

    def unselected(self) -> dict:
        return {self.note: "", self.selected: "", self.actions: gr.update(visible=False), self.title: "",
                **self.disarmed(), self.file: gr.update(value=None, visible=False)}

    def selected_row(self, row_id: str, title: str, note: str) -> dict:
        return {**self.unselected(), self.selected: row_id, self.actions: gr.update(visible=True),
                self.title: title, self.note: note}


def _list_panel(kind: str, noun: str, columns: list[str], value, open_label: str) -> tuple:
    """The list, its caption and note, and the selected row's controls -> (panel, rename, open, export)."""
    caption = gr.Markdown("", elem_id=f"history-{kind}s-caption")
    table = gr.Dataframe(value=value, headers=columns, interactive=False, wrap=True, max_height=320,
                         show_label=False, elem_id=f"history-{kind}s")
    with gr.Row(visible=False, elem_id=f"history-{kind}-actions") as actions:
        # no label box around it: the row stays one button high
        title = gr.Textbox(label=f"Title of the selected {noun}", show_label=False, container=False, max_lines=1,
                           placeholder=f"title of the selected {noun}", scale=2, elem_id=f"history-{kind}-title")
        buttons = dict(size="md", scale=1, min_width=110)
        rename = gr.Button("Rename", elem_id=f"history-rename-{kind}", **buttons)
        open_button = gr.Button(open_label, variant="primary", elem_id=f"history-open-{kind}", **buttons)
        export = gr.Button(f"Export ({'JSON' if kind == 'chat' else 'CSV'})", elem_id=f"history-export-{kind}",
                           **buttons)
        delete = gr.Button(DELETE_LABEL, elem_id=f"history-delete-{kind}", **buttons)
    selected = gr.Textbox(label=f"{noun} id", visible="hidden", elem_id=f"history-{kind}-id")
    note = gr.Markdown("", elem_id="history-status" if kind == "chat" else "history-run-status")
    file = gr.File(label=f"Exported {noun}s", interactive=False, visible=False, elem_id=f"history-{kind}-file")
    panel = ListPanel(table, caption, note, selected, actions, title, delete, gr.State(None), file)
    return panel, rename, open_button, export


def build_history_tab(manager: ModelManager, chat: ChatTab, lab: LabTab, storage: Storage | None = None,
                      import_limit: int = MAX_IMPORT_BYTES) -> None:
    views = HistoryViews(manager, storage, import_limit)
    with gr.Tab("History", id="history") as tab:
        gr.Markdown(views.where_saved(), elem_id="history-location")
        with gr.Row():
            search = gr.Textbox(label="Search", placeholder="text in chat titles and messages, run titles, prompts "
                                "and outputs", max_lines=1, scale=4, elem_id="history-search")
            refresh = gr.Button("Refresh lists", size="md", scale=0, min_width=140, elem_id="history-refresh")

        gr.Markdown("### Chats")
        chats, rename_chat, open_chat, export_chat = _list_panel("chat", "chat", CHAT_COLUMNS, views.chats_table,
                                                                 "Open in Chat tab")
        with gr.Row():
            new = gr.Button("New chat", size="md", scale=0, min_width=120, elem_id="history-new-chat")
            export_all = gr.Button("Export all chats (JSON)", size="md", scale=0, min_width=200,
                                   elem_id="history-export-chats")
            upload = gr.UploadButton(f"Import chats (.json, up to {megabytes(import_limit)})", size="md", scale=0,
                                     min_width=280, file_types=[".json"], type="filepath", elem_id="history-import")

        gr.Markdown("### Sampling-lab runs")
        runs, rename_run, open_run, export_run = _list_panel("run", "run", RUN_COLUMNS, views.runs_table,
                                                             "Open in lab")
        with gr.Row():
            export_every_run = gr.Button("Export all runs (CSV)", size="md", scale=0, min_width=200,
                                         elem_id="history-export-runs")
        run_view = gr.HTML(visible=False, elem_id="history-run")  # escaped text only (see HistoryViews.open_run)
        # not wrapped: its many narrow number columns would break their names letter by letter
        run_results = gr.Dataframe(label="Results", interactive=False, visible=False, elem_id="history-run-results")

        tabs = tabs_of(tab)
        _wire_lists(views, tab, search, refresh, chats, runs, run_view, run_results)
        _wire_chats(views, chats, chat, tabs, dict(rename=rename_chat, open=open_chat, export=export_chat,
                                                   export_all=export_all, new=new, upload=upload), search)
        _wire_runs(views, runs, lab, tabs, dict(rename=rename_run, open=open_run, export=export_run,
                                                export_all=export_every_run), search, run_view, run_results)


def _wire_lists(views: HistoryViews, tab: gr.Tab, search, refresh, chats: ListPanel, runs: ListPanel, run_view,
                run_results) -> None:
    """Refresh and search: both lists again, and everything shown about an earlier selection or action cleared."""

    def show_lists(query: str):
        query = (query or "").strip()
        try:
            chat_frame, run_frame = views.chats_table(query), views.runs_table(query)
        except StorageError as exc:
            return {chats.note: f"⚠️ {exc}"}
        return {**chats.unselected(), **runs.unselected(), **chats.listed(chat_frame, views.chats_caption(
            chat_frame, query)), **runs.listed(run_frame, views.runs_caption(run_frame, query)),
            run_view: gr.update(value="", visible=False), run_results: gr.update(value=None, visible=False)}

    everything = [*chats.components(), *runs.components(), run_view, run_results]
    # Listing is a quick read with a queue of its own (it never waits behind a generation), one at a time: answered in
    # the order asked, so a refresh answered late cannot put the full lists back over a search typed after it.
    lists = dict(fn=show_lists, inputs=search, outputs=everything, api_name=False, show_progress="hidden",
                 concurrency_limit=1, concurrency_id="history-lists")
    tab.select(**lists)
    refresh.click(**lists)
    search.change(**lists, trigger_mode="always_last")
    hidden_chats = gr.Button(visible=False)
    hidden_chats.click(views.chats_table, None, chats.table, api_name="history_chats", queue=False)
    hidden_runs = gr.Button(visible=False)
    hidden_runs.click(views.runs_table, None, runs.table, api_name="history_runs", queue=False)
    hidden_search = gr.Button(visible=False)
    hidden_search.click(views.search, search, [chats.note, chats.table, runs.table], api_name="history_search",
                        queue=False)


def _relist(views: HistoryViews, panel: ListPanel, kind: str, query: str) -> dict:
    """The panel's list again under the current search (after a rename, a delete, an import)."""
    query = (query or "").strip()
    try:
        frame = views.chats_table(query) if kind == "chat" else views.runs_table(query)
    except StorageError:  # a search refused as it was typed: the list as it is, unfiltered
        query, frame = "", views.chats_table() if kind == "chat" else views.runs_table()
    caption = views.chats_caption(frame, query) if kind == "chat" else views.runs_caption(frame, query)
    return panel.listed(frame, caption)


def _wire_selection(views: HistoryViews, panel: ListPanel, kind: str, rename, search, select,
                    extra_outputs: list) -> None:
    """Select a row (`select` says what it shows), rename it; the same without the page, for API clients."""
    rename_api = views.rename_chat if kind == "chat" else views.rename_run
    delete_api = views.delete_chat if kind == "chat" else views.delete_run

    def rename_selected(row_id: str, title: str, query: str):
        note, _ = rename_api(row_id, title)
        changed = {} if note.startswith("⚠️") else {**_relist(views, panel, kind, query), **panel.disarmed()}
        return {panel.note: note, **changed}

    outputs = [*panel.components(), *extra_outputs]
    panel.table.select(select, panel.table, outputs, api_name=False, show_progress="hidden")
    quiet = dict(api_name=False, show_progress="hidden")  # quick writes: no spinner over the list
    rename.click(rename_selected, [panel.selected, panel.title, search], outputs, **quiet)
    panel.title.submit(rename_selected, [panel.selected, panel.title, search], outputs, **quiet)
    # API clients rename and delete in one call: the page's confirmation step is for clicks.
    gr.Button(visible=False).click(rename_api, [panel.selected, panel.title], [panel.note, panel.table],
                                   api_name=f"history_rename_{kind}")
    gr.Button(visible=False).click(delete_api, panel.selected, [panel.note, panel.table],
                                   api_name=f"history_delete_{kind}")


def _delete_step(views: HistoryViews, panel: ListPanel, kind: str, row_id: str, armed: str | None,
                 query: str) -> tuple[dict, bool]:
    """A click on Delete: the first one only asks, a second one on the same row deletes -> (updates, deleted)."""
    if not row_id:
        return {panel.note: f"⚠️ Choose a {kind} first: click a row of the list."}, False
    if armed != row_id:
        ask = f"Delete this {kind} for good? Click the button again to confirm; anything else keeps it."
        return {panel.armed: row_id, panel.delete: gr.update(value=CONFIRM_LABEL, variant="stop"),
                panel.note: ask}, False
    note, _ = views.delete_chat(row_id) if kind == "chat" else views.delete_run(row_id)
    updates = {**panel.unselected(), **_relist(views, panel, kind, query), panel.note: note}
    return updates, not note.startswith("⚠️")


def _wire_chats(views: HistoryViews, chats: ListPanel, chat: ChatTab, tabs: gr.Tabs, buttons: dict, search) -> None:
    open_tab = [chat.chatbot, chat.history, chat.stats, chat.details, chat.chat_id, chat.status]

    def select_chat(shown, event: gr.SelectData):
        chat_id = _row_id(event, shown)
        try:
            saved = views.storage.load_chat(chat_id) if views.storage and chat_id else None
        except StorageError as exc:
            return {chats.note: f"⚠️ {exc}"}
        if saved is None:
            return {**chats.unselected(), chats.note: "⚠️ That chat is no longer saved: press **Refresh lists**."}
        return chats.selected_row(saved.id, saved.title, f"Selected **{md_text(saved.title or '(untitled)')}** "
                                  f"({plural(len(saved.messages), 'message')}).")

    def delete_chat(row_id: str, armed: str | None, query: str, open_id: str | None,
                    request: gr.Request | None = None):
        updates, deleted = _delete_step(views, chats, "chat", row_id, armed, query)
        if not deleted or row_id != open_id:
            return updates
        # The deleted chat leaves the Chat tab too, else its next message would save it all again as a new chat.
        owner = session_owner(request)
        if owner:
            views.manager.cancel(owner)  # a reply still streaming into it stops
        return {**updates, chat.chatbot: [], chat.history: [], chat.stats: [], chat.details: [], chat.chat_id: None,
                chat.status: "This chat was deleted in the History tab; your next message starts a new one."}

    _wire_selection(views, chats, "chat", buttons["rename"], search, select_chat, open_tab)
    chats.delete.click(delete_chat, [chats.selected, chats.armed, search, chat.chat_id], [*chats.components(),
                       *open_tab], api_name=False, show_progress="hidden")

    # Opening a chat fills the Chat tab's states (hidden from API clients) and switches to that tab.
    opened = [chats.note, chat.chatbot, chat.system_prompt, chat.history, chat.stats, chat.details, chat.chat_id,
              chat.status, tabs]
    chat.restore_settings_after(buttons["open"].click(views.open_chat, chats.selected, opened,
                                                      api_name="history_open_chat"), views.storage)
    buttons["new"].click(views.new_chat, None, opened, api_name="history_new_chat")
    # Exports: the endpoint's plain (file, note), then the file box shown only when there is a file.
    buttons["export"].click(views.export_chats, chats.selected, [chats.file, chats.note], api_name="chat_export").then(
        _shown_if_file, chats.file, chats.file, api_name=False, show_progress="hidden")
    buttons["export_all"].click(lambda: views.export_chats(""), None, [chats.file, chats.note], api_name=False).then(
        _shown_if_file, chats.file, chats.file, api_name=False, show_progress="hidden")
    buttons["upload"].upload(views.import_chats, buttons["upload"], [chats.note, chats.table],
                             api_name="chat_import").then(
        lambda query: _relist(views, chats, "chat", query), search, [chats.table, chats.caption], api_name=False,
        show_progress="hidden")


def _wire_runs(views: HistoryViews, runs: ListPanel, lab: LabTab, tabs: gr.Tabs, buttons: dict, search, run_view,
               run_results) -> None:
    shown_run = [run_view, run_results]

    def select_run(shown, event: gr.SelectData):
        run_id = _row_id(event, shown)
        try:
            saved = views.storage.load_run(run_id) if views.storage and run_id else None
        except StorageError as exc:
            return {runs.note: f"⚠️ {exc}"}
        if saved is None:
            return {**runs.unselected(), runs.note: "⚠️ That run is no longer saved: press **Refresh lists**.",
                    **hide_run()}
        view, results = views.open_run(saved.id)
        return {**runs.selected_row(saved.id, saved.title or "", ""), run_view: gr.update(value=view, visible=True),
                run_results: gr.update(value=results, visible=results is not None)}

    def hide_run() -> dict:
        return {run_view: gr.update(value="", visible=False), run_results: gr.update(value=None, visible=False)}

    def delete_run(row_id: str, armed: str | None, query: str):
        updates, deleted = _delete_step(views, runs, "run", row_id, armed, query)
        return {**updates, **hide_run()} if deleted else updates

    _wire_selection(views, runs, "run", buttons["rename"], search, select_run, shown_run)
    runs.delete.click(delete_run, [runs.selected, runs.armed, search], [*runs.components(), *shown_run],
                      api_name=False, show_progress="hidden")
    lab.show_saved_run_after(buttons["open"].click(views.run_to_lab, runs.selected, [runs.note, lab.prompt,
                                                   lab.table, tabs], api_name="history_run_to_lab"),
                             views.storage, runs.selected)
    gr.Button(visible=False).click(views.open_run, runs.selected, shown_run, api_name="history_open_run")
    buttons["export"].click(views.export_runs, runs.selected, [runs.file, runs.note], api_name="runs_export").then(
        _shown_if_file, runs.file, runs.file, api_name=False, show_progress="hidden")
    buttons["export_all"].click(lambda: views.export_runs(""), None, [runs.file, runs.note], api_name=False).then(
        _shown_if_file, runs.file, runs.file, api_name=False, show_progress="hidden")


def tabs_of(tab: gr.Tab) -> gr.Tabs:
    """The gr.Tabs container around `tab` (Gradio makes one when tabs are not put in one explicitly)."""
    parent = tab.parent
    while parent is not None and not isinstance(parent, gr.Tabs):
        parent = parent.parent
    if parent is None:
        raise RuntimeError("the History tab must be inside a gr.Tabs container")
    return parent
