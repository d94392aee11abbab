"""The HTTP APIs next to the Gradio UI: the tutorial's `POST /` and the OpenAI-compatible `/v1/*`."""

from __future__ import annotations

from fastapi import APIRouter, Depends, FastAPI

from playground.api import openai_api, prompt_endpoint
from playground.api.auth import api_key_check


def include_api(app: FastAPI, api_key: str | None = None) -> list[APIRouter]:
    """Add the API routes and return their routers; call before Gradio is mounted at "/" so `POST /` reaches the
    prompt endpoint."""
    guard = [Depends(api_key_check(api_key))]
    routers = [prompt_endpoint.router, openai_api.router]
    for router in routers:
        app.include_router(router, dependencies=guard)
    return routers
