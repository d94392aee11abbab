"""Server-sent events as OpenAI streams them: `data: {json}\\n\\n` lines, ending with `data: [DONE]`."""

from __future__ import annotations

import json
from typing import Any, AsyncIterator

from fastapi.responses import StreamingResponse

DONE = "data: [DONE]\n\n"


def event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def comment(text: str) -> str:
    """An SSE comment line: clients ignore it; proxies and people reading the stream see progress."""
    return f": {text}\n\n"


def response(chunks: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(
        chunks,
        media_type="text/event-stream",
        # No caching, and no proxy buffering: each token should reach the client as it is made.
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
