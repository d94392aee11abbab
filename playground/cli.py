"""The playground's command: `python launch.py [options]` in a checkout, `yuan-playground [options]` installed."""

from __future__ import annotations

import secrets
import sys
import threading
import time

import uvicorn

from playground.config import parse_args


def open_share_link(server: uvicorn.Server, host: str, port: int) -> None:
    """Once the server is up, ask Gradio's share service for a public tunnel to it (needs internet)."""
    from gradio import networking

    while not server.started:
        time.sleep(0.2)
    local_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    try:
        url = networking.setup_tunnel(local_host, port, secrets.token_urlsafe(32), None, None)
        print(f"Public share link: {url}", flush=True)
    except Exception as exc:  # no internet, share service down: the local server keeps running
        print(f"--share: could not open a public link ({exc}); the local server keeps running", file=sys.stderr)


class PlaygroundServer(uvicorn.Server):
    """uvicorn's server, stopping the way a person expects: on Ctrl+C (or SIGTERM) the replies being written stop,
    the pages' open event streams end at once (no graceful-timeout errors), one line says so, and the process exits
    with 0."""

    def __init__(self, config: uvicorn.Config, manager, streams_end):
        super().__init__(config)
        self.manager, self.streams_end = manager, streams_end

    def handle_exit(self, sig, frame) -> None:
        if not self.should_exit:
            self.manager.cancel_all()
            self.streams_end.set()
        super().handle_exit(sig, frame)
        # uvicorn re-raises the signal once it has stopped (a traceback for Ctrl+C, no exit code 0 for SIGTERM);
        # the stop is complete here, so the process ends normally instead.
        self._captured_signals.clear()


def main(argv: list[str] | None = None) -> None:
    settings = parse_args(argv)  # --help and a bad option answer before the app's imports (Gradio: seconds)
    from playground.server import create_app, load_in_background

    app = create_app(settings)
    manager = app.state.manager
    url = f"http://{settings.host}:{settings.port}"
    load_in_background(settings, manager, announce=lambda line: print(f"{line} · {url}", flush=True))
    # A short graceful shutdown: the open streams are ended at once (EndStreamsOnShutdown); this bounds the rest.
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning",
                            timeout_graceful_shutdown=3)
    server = PlaygroundServer(config, manager, app.state.shutdown)
    if settings.share:
        threading.Thread(target=open_share_link, args=(server, settings.host, settings.port), daemon=True).start()
    print(f"Yuan2.0-M32 Playground on {url} (loading the model; a line says when it is ready)", flush=True)
    server.run()
    manager.close()
    print("Stopped: replies being written ended there; saved chats and lab runs are kept.", flush=True)


if __name__ == "__main__":
    main()
