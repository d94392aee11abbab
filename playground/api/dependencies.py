"""What the API routes take from the app: its model manager, put in `app.state` by `server.create_app`."""

from __future__ import annotations

from fastapi import Request

from playground.manager import ModelManager


def current_manager(request: Request) -> ModelManager:
    """The app's model manager (a FastAPI dependency: `manager: ModelManager = Depends(current_manager)`)."""
    return request.app.state.manager
