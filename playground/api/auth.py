"""Optional API key (`--api-key`): when set, API routes need `Authorization: Bearer KEY`."""

from __future__ import annotations

import secrets
from typing import Callable

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from playground.api.http_errors import ApiError

# auto_error=False: a missing header is answered by us, in OpenAI's error shape, not with FastAPI's 403.
_bearer = HTTPBearer(auto_error=False, description="the server's --api-key, when it was started with one")


def api_key_check(api_key: str | None) -> Callable[..., None]:
    """A dependency that lets every request through when `api_key` is None, else only those bearing it."""

    def check(credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
        if api_key is None:
            return
        given = credentials.credentials if credentials else ""
        # compare_digest: the time taken does not reveal how much of a guess was right.
        if not secrets.compare_digest(given.encode(), api_key.encode()):
            reason = "a wrong API key was given" if given else "an API key is required"
            raise ApiError(
                401, f"{reason}: send the header 'Authorization: Bearer <key>' with the server's --api-key",
                type="authentication_error", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"},
            )

    return check
