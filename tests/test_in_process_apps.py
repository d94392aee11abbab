"""Apps built in this process, over ASGI: the entry point builds a model manager per app and hands it down, so two
differently configured apps live side by side (nothing reaches a process-wide manager)."""

from __future__ import annotations

from fastapi.testclient import TestClient

from playground.config import parse_args
from playground.server import create_app

LONG = [{"role": "user", "content": "word " * 20}]  # 100 characters


def test_two_differently_configured_apps_share_a_process(embedded_manager):
    loose = create_app(parse_args(["--data-dir", ""]), manager=embedded_manager)
    strict = create_app(parse_args(["--data-dir", "", "--max-prompt-chars", "40"]))
    assert strict.state.manager is not embedded_manager and strict.state.manager.max_prompt_chars == 40
    strict.state.manager.load()
    with TestClient(loose) as first, TestClient(strict) as second:
        body = {"messages": LONG, "max_tokens": 2, "temperature": 0}
        assert first.post("/v1/chat/completions", json=body).status_code == 200
        refused = second.post("/v1/chat/completions", json=body)
        assert refused.status_code == 400 and "40" in refused.json()["error"]["message"]
        assert first.get("/healthz").json()["state"] == second.get("/healthz").json()["state"] == "ready"
    # The first app's manager answered its request; the second's was refused before anything ran.
    assert embedded_manager.status()["state"] == "ready"
