"""One server: a FastAPI application with the Gradio app mounted at `/`, on one port."""

from __future__ import annotations

import threading

import gradio as gr
from fastapi import FastAPI

from playground import __version__
from playground.api import include_api
from playground.config import Settings
from playground.errors import PlaygroundError
from playground.manager import get_manager
from playground.ui.app import TITLE, build_app


def load_in_background(settings: Settings) -> threading.Thread:
    """Start loading the model without holding up the server; a failure is kept in the manager's status."""

    def load():
        try:
            get_manager().load(settings.model, device=settings.device, dtype=settings.dtype)
        except PlaygroundError:
            pass  # the status line and /healthz show the error; the server stays up

    thread = threading.Thread(target=load, name="model-load", daemon=True)
    thread.start()
    return thread


# Gradio's queue polls for work every 1 ms while idle (progress every 10 ms). On a CPU box those wake-ups
# cost every generation, the UI's and the API's, about 7% of its decode speed (bench/api_overhead.py).
# 20 ms / 100 ms (Gradio itself uses 50 ms / 100 ms on Windows) delay nothing a person can see.
GRADIO_IDLE_POLL_S = 0.02
GRADIO_PROGRESS_POLL_S = 0.1


def calm_gradio_queue(demo: gr.Blocks) -> None:
    queue = getattr(demo, "_queue", None)  # a private attribute: if Gradio renames it, keep its defaults
    if queue is not None and hasattr(queue, "sleep_when_free"):
        queue.sleep_when_free = GRADIO_IDLE_POLL_S
        queue.progress_update_sleep_when_free = GRADIO_PROGRESS_POLL_S


def create_app(settings: Settings) -> FastAPI:
    app = FastAPI(title=TITLE, version=__version__)

    @app.get("/healthz")
    def healthz() -> dict:
        """The model manager's status: state (loading, ready, error, empty), model facts, queue."""
        return get_manager().status()

    include_api(app, api_key=settings.api_key)  # before the mount, so POST / is the API's, GET / the UI's
    get_manager().memory()  # start sampling now so the panel has history when first opened
    demo = build_app()
    app = gr.mount_gradio_app(app, demo, path="/")
    calm_gradio_queue(demo)  # after mounting, which sets up the queue it starts
    return app
