"""The Gradio Blocks app: a model status line and one tab per feature."""

from __future__ import annotations

import gradio as gr

from playground.config import Settings
from playground.manager import ModelManager
from playground.storage import Storage
from playground.storage_exchange import import_limit_bytes
from playground.ui.chat_tab import CHAT_CSS, build_chat_tab
from playground.ui.controls import UnavailableControls
from playground.ui.history_tab import build_history_tab
from playground.ui.insight_tab import build_insight_tab
from playground.ui.lab_tab import LAB_CSS, build_lab_tab
from playground.ui.memory_tab import build_memory_tab, refresh_only_when_shown
from playground.ui.model_panel import build_model_panel

TITLE = "Yuan2.0-M32 Playground"


# The state leads the line in words: colour emoji are missing from many system fonts (a box is all that shows).
# The page's own styles (Gradio 6 takes them where the app is mounted: server.create_app).
APP_CSS = LAB_CSS + CHAT_CSS

STAND_IN_NOTE = (
    "Serving **{name}**, a small stand-in shipped with the playground; for Yuan2.0-M32 start with "
    "`--model /path/to/Yuan2-M32-hf-int4` (the **Model** panel below has the commands)."
)


def status_line(status: dict) -> str:
    """The model status line from `manager.status()`: which model, its state, and how many requests wait."""
    if status["state"] == "loading":
        loading = status["loading"]
        return f"Loading **{loading['model']}**: {loading['message']} ({loading['fraction']:.0%})"
    if status["state"] == "ready":
        queue = f" · {status['queued']} waiting" if status["queued"] else ""
        if status.get("base_url"):  # served by a remote engine
            return (
                f"Ready: **{status['name']}** · remote engine at {status['base_url']} "
                f"({status['remote_owner'] or 'unknown kind'}) · prompt format: {status['remote_chat_format']} · "
                f"up to {status['remote_concurrency']} requests at once{queue}"
            )
        return (
            f"Ready: **{status['name']}** · {status['kind']} · {status['parameters'] / 1e6:.0f}M parameters · "
            f"{status['dtype']} on {status['device']} · loaded in {status['load_time_s']:.1f} s{queue}"
        )
    if status["state"] == "error":
        return f"No model loaded: {status['last_error']}"
    return "No model loaded."


def stand_in_note(status: dict) -> str:
    """A one-line note while the embedded stand-in serves, saying what it is and how to serve Yuan2-M32; "" else."""
    serving_stand_in = status["state"] == "ready" and status.get("kind") == "embedded"
    return STAND_IN_NOTE.format(name=status.get("name")) if serving_stand_in else ""


def keep_page_current(demo: gr.Blocks, manager: ModelManager, status: gr.Markdown, banner: gr.Markdown,
                      unavailable: UnavailableControls) -> None:
    """What a page keeps current (the status line, the stand-in banner, the greyed-out sampling controls), in one
    request when it loads and every 2 s. Each part is sent only when it differs from what this page shows (kept in
    its state), so an idle page gets an answer of skips and redraws nothing."""
    timer = gr.Timer(2.0)
    shown = gr.State(None)  # {"status": ..., "banner": ..., "greyed": [...]}: what this page shows

    def refresh(shown: dict | None) -> list:
        shown, status = dict(shown or {}), manager.status()  # one snapshot: the three parts agree
        line, note = status_line(status), stand_in_note(status)
        status_update = gr.skip() if shown.get("status") == line else line
        banner_update = gr.skip() if shown.get("banner") == note else gr.update(value=note, visible=bool(note))
        control_updates, shown["greyed"] = unavailable.refresh(shown.get("greyed"), status)
        shown.update(status=line, banner=note)
        return [status_update, banner_update, *control_updates, shown]

    gr.on([demo.load, timer.tick], refresh, shown, [status, banner, *unavailable.controls, shown], api_name=False,
          show_progress="hidden", queue=False)


def build_app(settings: Settings, manager: ModelManager, storage: Storage | None = None) -> gr.Blocks:
    """The whole UI around `manager`; chats and lab runs are saved to `storage` (None: nothing is saved)."""

    def current_status() -> str:
        """The model status line: which model, its state, and how many requests wait."""
        return status_line(manager.status())

    with gr.Blocks(title=TITLE) as demo:
        gr.Markdown(f"# {TITLE}")
        status = gr.Markdown(elem_id="model-status")
        banner = gr.Markdown(visible=False, elem_id="stand-in-banner")
        build_model_panel(manager, settings.models_root, device=settings.device, dtype=settings.dtype,
                          started_elsewhere=settings.backend == "openai" or settings.model is not None)
        with gr.Tabs(elem_id="tabs") as tabs:  # explicit, so the History tab can switch to the Chat tab
            chat = build_chat_tab(manager, storage)
            lab = build_lab_tab(manager, storage)
            build_insight_tab(manager, chat.details, lab.details)
            memory_timer, memory_paused = build_memory_tab(manager)
            build_history_tab(manager, chat, lab, storage, import_limit_bytes(settings.max_request_bytes))
        refresh_only_when_shown(tabs, memory_timer, memory_paused)
        keep_page_current(demo, manager, status, banner, chat.unavailable)
        gr.api(current_status, api_name="status", queue=False)  # the status line for API clients
        chat.restore_on_load(demo, storage)  # the chat this browser showed before a reload
    return demo
