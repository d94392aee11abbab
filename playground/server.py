"""One server: a FastAPI application with the Gradio app mounted at `/`, on one port."""

from __future__ import annotations

import sys
import threading

import gradio as gr
from fastapi import APIRouter, Depends, FastAPI

from playground import __version__
from playground.api import include_api
from playground.api.auth import api_key_check
from playground.api.http_errors import ApiRoute
from playground.config import Settings
from playground.errors import PlaygroundError
from playground.manager import get_manager
from playground.storage import Storage, StorageError
from playground.ui.app import TITLE, build_app


def load_in_background(settings: Settings) -> threading.Thread:
    """Start loading the model without holding up the server; a failure is kept in the manager's status."""

    def load():
        try:
            if settings.backend == "openai":
                # An engine still starting (vLLM loads for minutes) is tried again with back-off until it answers.
                get_manager().keep_connecting_remote(
                    settings.base_url, api_key=settings.remote_api_key, model=settings.remote_model,
                    timeout_s=settings.remote_timeout, concurrency=settings.remote_concurrency,
                    chat_format=settings.remote_chat_format, extensions=settings.remote_extensions,
                )
            else:
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


def open_storage(settings: Settings) -> Storage | None:
    """The data folder's chat and lab store for the UI; None (saving off) when there is none or it cannot be used."""
    if not settings.data_dir:
        return None
    try:
        return Storage(settings.data_dir)
    except StorageError as exc:
        # The playground still works without it; the History tab says nothing is being saved.
        print(f"--data-dir: {exc}; chats and lab runs will not be saved", file=sys.stderr, flush=True)
        return None


def create_app(settings: Settings) -> FastAPI:
    # With an API key every route of this app needs it, so the schema pages go too (a browser cannot send it).
    docs = {} if settings.api_key is None else dict(docs_url=None, redoc_url=None, openapi_url=None)
    app = FastAPI(title=TITLE, version=__version__, **docs)
    health = APIRouter(route_class=ApiRoute, dependencies=[Depends(api_key_check(settings.api_key))])

    @health.get("/healthz")
    def healthz() -> dict:
        """The model manager's status: state (loading, ready, error, empty), model facts, queue."""
        return get_manager().status()

    app.include_router(health)
    include_api(app, api_key=settings.api_key)  # before the mount, so POST / is the API's, GET / the UI's
    get_manager().memory()  # start sampling now so the panel has history when first opened
    demo = build_app(settings, open_storage(settings))  # the History tab lists what is already saved
    # The browser UI cannot send a bearer key; --auth / --auth-file put Gradio's login page in front of it.
    app = gr.mount_gradio_app(app, demo, path="/", auth=settings.auth,
                              auth_message="Yuan2.0-M32 Playground: log in with a user from --auth or --auth-file.")
    calm_gradio_queue(demo)  # after mounting, which sets up the queue it starts
    return app
