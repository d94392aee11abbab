"""One server: a FastAPI application with the Gradio app mounted at `/`, on one port."""

from __future__ import annotations

import threading

import gradio as gr
from fastapi import FastAPI

from playground import __version__
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


def create_app(settings: Settings) -> FastAPI:
    app = FastAPI(title=TITLE, version=__version__)

    @app.get("/healthz")
    def healthz() -> dict:
        """The model manager's status: state (loading, ready, error, empty), model facts, queue."""
        return get_manager().status()

    get_manager().memory()  # start sampling now so the panel has history when first opened
    demo = build_app()
    return gr.mount_gradio_app(app, demo, path="/")
