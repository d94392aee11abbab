"""The playground's command: `python launch.py [options]` in a checkout, `yuan-playground [options]` installed."""

from __future__ import annotations

import secrets
import sys
import threading
import time

import uvicorn

from playground.config import parse_args
from playground.server import create_app, load_in_background


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


def main(argv: list[str] | None = None) -> None:
    settings = parse_args(argv)
    app = create_app(settings)
    load_in_background(settings, app.state.manager)
    # A short graceful shutdown: open UI event streams would otherwise hold a stop for a long time.
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning",
                            timeout_graceful_shutdown=3)
    server = uvicorn.Server(config)
    if settings.share:
        threading.Thread(target=open_share_link, args=(server, settings.host, settings.port), daemon=True).start()
    print(f"Yuan2.0-M32 Playground on http://{settings.host}:{settings.port}", flush=True)
    server.run()


if __name__ == "__main__":
    main()
