"""Start the playground: `python launch.py [--model DIR] [--device ...] [--port ...]` (see --help)."""

from __future__ import annotations

import sys

import uvicorn

from playground.config import parse_args
from playground.server import create_app, load_in_background


def main(argv: list[str] | None = None) -> None:
    settings = parse_args(argv)
    app = create_app(settings)
    load_in_background(settings)
    print(f"Yuan2.0-M32 Playground on http://{settings.host}:{settings.port}", flush=True)
    if settings.share:
        print("--share: a public link needs Gradio's share servers; see the README.", file=sys.stderr)
    # A short graceful shutdown: open UI event streams would otherwise hold a stop for a long time.
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning", timeout_graceful_shutdown=3)


if __name__ == "__main__":
    main()
