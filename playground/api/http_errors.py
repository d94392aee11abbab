"""API errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, on every API route.

`ApiRoute` turns what a handler raises (validation errors, the manager's errors, `ApiError`) into that
shape, so the routes themselves only raise; Gradio's routes and /healthz keep FastAPI's defaults.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Coroutine

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from playground.errors import LoadInProgressError, ModelNotLoadedError, ParameterError, PlaygroundError

log = logging.getLogger(__name__)

# Not an HTTP status a client sees (it has gone); nginx's code for "client closed request", for the logs.
CLIENT_CLOSED_REQUEST = 499


class ApiError(Exception):
    """An error answer: HTTP status plus OpenAI's error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class ClientDisconnected(Exception):
    """The client went away before its answer was ready; its generation was cancelled."""


def model_unavailable(exc: PlaygroundError) -> ApiError:
    return ApiError(503, str(exc), type="server_error", code="model_not_ready")


def from_validation_error(exc: RequestValidationError) -> ApiError:
    """One readable 400 from FastAPI's validation errors, naming the field at fault."""
    parts: list[str] = []
    first_param: str | None = None
    for error in exc.errors():
        if error.get("type") == "json_invalid":
            reason = (error.get("ctx") or {}).get("error", "invalid JSON")
            position = error["loc"][-1] if error.get("loc") else "?"
            return ApiError(400, f"malformed JSON body: {reason} at character {position}", code="invalid_json")
        location = [str(part) for part in error.get("loc", ()) if part != "body"]
        field = ".".join(location)
        message = str(error.get("msg", "is invalid")).removeprefix("Value error, ")
        if error.get("type") == "extra_forbidden":
            message = "is not a field of this request"
        if not field:  # the body as a whole is wrong (not an object, or not sent as JSON)
            field = "body"
            message = f"{message}; send a JSON object with Content-Type: application/json"
        first_param = first_param or field
        parts.append(f"{field}: {message}")
    return ApiError(400, "; ".join(parts) or "invalid request", param=first_param, code="invalid_value")


def from_parameter_error(exc: ParameterError, renames: dict[str, str] | None = None) -> ApiError:
    """A manager/SamplingParams ParameterError as a 400; `renames` maps internal field names to the API's."""
    message, field = str(exc), exc.field
    for internal, public in (renames or {}).items():
        message = message.replace(f"{internal}:", f"{public}:")  # SamplingParams writes "field: reason"
        if field == internal:
            field = public
    return ApiError(400, message, param=field, code="invalid_value")


def to_api_error(exc: Exception) -> ApiError | None:
    """The API answer for an exception a handler raised; None for ones to let through."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, HTTPException) and exc.status_code == 400:
        # FastAPI's own answer to a body it cannot decode at all (bytes that are not UTF-8, say).
        return ApiError(400, f"the request body could not be read: {exc.detail}; send UTF-8 JSON "
                             "with Content-Type: application/json", code="invalid_json")
    if isinstance(exc, RequestValidationError):
        return from_validation_error(exc)
    if isinstance(exc, ParameterError):
        return from_parameter_error(exc)
    if isinstance(exc, (ModelNotLoadedError, LoadInProgressError)):
        return model_unavailable(exc)
    if isinstance(exc, PlaygroundError):
        return ApiError(500, str(exc), type="server_error")
    return None


class ApiRoute(APIRoute):
    """An APIRoute whose errors come back in OpenAI's error shape."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except ClientDisconnected:
                return Response(status_code=CLIENT_CLOSED_REQUEST)
            except Exception as exc:
                error = to_api_error(exc)
                if error is None:
                    log.exception("unexpected error in %s %s", request.method, request.url.path)
                    error = ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")
                return error.response()

        return handle


def generation_failed(stats) -> ApiError:
    """The answer for a generation that ended in an error (GenerationStats): a gateway's codes when the remote
    engine failed (502) or stayed silent (504), 400 when it refused the request itself, 500 when this process
    failed."""
    source = getattr(stats, "error_source", None) or ""
    if source == "remote-rejected":
        return ApiError(400, f"the remote engine refused the request: {stats.error}", type="invalid_request_error")
    status = {"remote": 502, "remote-timeout": 504}.get(source, 500)
    return ApiError(status, f"the generation failed: {stats.error}", type="server_error")
