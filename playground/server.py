"""One server: a FastAPI application with the Gradio app mounted at `/`, on one port."""

from __future__ import annotations

import secrets
import sys
import threading
from typing import Any, Callable

import gradio as gr
from fastapi import APIRouter, Depends, FastAPI

from playground import __version__
from playground.api import include_api
from playground.api.auth import api_key_check
from playground.api.guards import EndStreamsOnShutdown, LoginPageGuard, MethodGuard, RequestSizeLimit, ShutdownSignal
from playground.api.http_errors import ApiRoute
from playground.config import Settings
from playground.errors import PlaygroundError
from playground.manager import ModelManager
from playground.storage import Storage
from playground.storage_exchange import StorageError
from playground.ui.app import APP_CSS, TITLE, build_app


def build_manager(settings: Settings) -> ModelManager:
    """The app's model manager, configured by the options (one per app: two apps in a process do not share one)."""
    cache_bytes = None if settings.prompt_cache_mb is None else settings.prompt_cache_mb * 2**20
    return ModelManager(max_prompt_chars=settings.max_prompt_chars, prompt_cache_bytes=cache_bytes)


def load_in_background(settings: Settings, manager: ModelManager,
                       announce: Callable[[str], None] | None = None) -> threading.Thread:
    """Start loading the model without holding up the server; a failure is kept in the manager's status.
    `announce` gets one line when the model is ready or has failed (the command prints it)."""

    def load():
        try:
            if settings.backend == "openai":
                # An engine still starting (vLLM loads for minutes) is tried again with back-off until it answers.
                manager.keep_connecting_remote(
                    settings.base_url, api_key=settings.remote_api_key, model=settings.remote_model,
                    timeout_s=settings.remote_timeout, concurrency=settings.remote_concurrency,
                    chat_format=settings.remote_chat_format, extensions=settings.remote_extensions,
                )
            else:
                manager.load(settings.model, device=settings.device, dtype=settings.dtype)
        except PlaygroundError:
            pass  # the status line and /healthz show the error; the server stays up
        if announce is not None:
            status = manager.status()
            announce(f"Ready: {status['name']} ({status['kind']}, {status['dtype']} on {status['device']})"
                     if status["state"] == "ready" else f"No model loaded: {status['last_error']}")

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


# The schema pages; with an API key they are off (a browser cannot send the key), Gradio's copy included.
SCHEMA_PAGES = {"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}


def api_methods(routers: list[APIRouter]) -> dict[str, set[str]]:
    """Each API path and the methods it takes ("/" is shared with the UI's page, so it is left out)."""
    table: dict[str, set[str]] = {}
    for router in routers:
        for route in router.routes:
            if route.path != "/":
                table.setdefault(route.path, set()).update(route.methods)
    return table


def ui_login(settings: Settings) -> tuple[Any, str] | tuple[None, None]:
    """Gradio's login for the browser UI and its API: the --auth users; with only --api-key, the key as the
    password (any user name), so nothing that reaches the model or the saved chats answers without a credential."""
    if settings.auth:
        return settings.auth, "Yuan2.0-M32 Playground: log in with a user from --auth or --auth-file."
    if settings.api_key:
        key = settings.api_key.encode()
        return ((lambda _user, password: secrets.compare_digest(password.encode(), key)),
                "Yuan2.0-M32 Playground: log in with any user name and the server's API key as the password.")
    return None, None


def create_app(settings: Settings, manager: ModelManager | None = None) -> FastAPI:
    """The app for `settings`, around `manager` (built from the settings when not given): the UI's tabs, the API
    routes (`app.state.manager`) and /healthz all use it."""
    manager = manager if manager is not None else build_manager(settings)
    docs = {} if settings.api_key is None else dict(docs_url=None, redoc_url=None, openapi_url=None)
    app = FastAPI(title=TITLE, version=__version__, **docs)
    app.state.manager = manager
    health = APIRouter(route_class=ApiRoute, dependencies=[Depends(api_key_check(settings.api_key))])

    @health.get("/healthz")
    def healthz() -> dict:
        """The model manager's status: state (loading, ready, error, empty), model facts, queue."""
        return manager.status()

    app.include_router(health)
    routers = [health, *include_api(app, api_key=settings.api_key)]  # before the mount: POST / is the API's
    # Each middleware added wraps those before it: RequestSizeLimit, added last, runs first, so a body too large is
    # refused before anything else reads it.
    auth, auth_message = ui_login(settings)
    if auth is not None:  # only a login page has anything to hide; without one the page is not rewritten
        app.add_middleware(LoginPageGuard)
    app.add_middleware(MethodGuard, routes=api_methods(routers), hidden=SCHEMA_PAGES if settings.api_key else set())
    app.state.shutdown = ShutdownSignal()  # set by the command's server when it stops (cli.PlaygroundServer)
    app.add_middleware(EndStreamsOnShutdown, shutdown=app.state.shutdown)
    app.add_middleware(RequestSizeLimit, max_bytes=settings.max_request_bytes)
    manager.memory()  # start sampling now so the panel has history when first opened
    demo = build_app(settings, manager, open_storage(settings))  # the History tab lists what is already saved
    # The browser UI cannot send a bearer key: a login page stands in front of it (see ui_login).
    app = gr.mount_gradio_app(app, demo, path="/", auth=auth, auth_message=auth_message,
                              max_file_size=settings.max_request_bytes, css=APP_CSS)
    calm_gradio_queue(demo)  # after mounting, which sets up the queue it starts
    return app
