"""The HTTP APIs next to the Gradio UI: the tutorial's `POST /` and the OpenAI-compatible `/v1/*`."""

from __future__ import annotations

from fastapi import Depends, FastAPI

from playground.api import openai_api, prompt_endpoint
from playground.api.auth import api_key_check


def include_api(app: FastAPI, api_key: str | None = None) -> None:
    """Add the API routes; call before Gradio is mounted at "/" so `POST /` reaches the prompt endpoint."""
    guard = [Depends(api_key_check(api_key))]
    app.include_router(prompt_endpoint.router, dependencies=guard)
    app.include_router(openai_api.router, dependencies=guard)
