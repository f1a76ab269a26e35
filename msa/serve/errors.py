"""OpenAI error bodies, ``{"error": {"message", "type", "param", "code"}}``, for every failure path.

Validation errors name the offending field in ``param``; engine errors map to the status a client
can act on: 400 for a bad or too-long request, 429 + Retry-After when the queue is full, 503 when
the engine is dead.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from msa.cluster.protocol import (
    EngineDeadError,
    EngineOverloadedError,
    InvalidRequestError,
    RequestTooLongError,
)

logger = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_error",
    503: "service_unavailable",
}


class OpenAIError(Exception):
    """An error to answer with an OpenAI error body and ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    @property
    def kind(self) -> str:
        return _TYPES.get(self.status, "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def from_engine_error(exc: Exception, prompt_field: str) -> OpenAIError:
    """The HTTP answer to an error raised by ``Engine.generate``; ``prompt_field`` names the
    request field holding the prompt ("messages" or "prompt")."""
    if isinstance(exc, RequestTooLongError):
        return OpenAIError(400, str(exc), param=prompt_field, code="context_length_exceeded")
    if isinstance(exc, InvalidRequestError):
        return OpenAIError(400, str(exc), param=request_field(exc, prompt_field), code="invalid_value")
    if isinstance(exc, EngineOverloadedError):
        retry = str(max(1, math.ceil(exc.retry_after)))
        return OpenAIError(
            429,
            f"the server is overloaded: {exc}; retry after {retry} s",
            code="queue_full",
            headers={"Retry-After": retry},
        )
    if isinstance(exc, EngineDeadError):
        return OpenAIError(503, f"the engine is not running: {exc}", code="engine_dead")
    logger.exception("unexpected error while generating", exc_info=exc)
    return OpenAIError(500, f"internal error: {type(exc).__name__}: {exc}")


def request_field(exc: InvalidRequestError, prompt_field: str) -> str | None:
    """The HTTP request's field an engine error names: the prompt's for ``prompt_token_ids``,
    else the sampling parameter, which has the same name in the request."""
    return prompt_field if exc.param == "prompt_token_ids" else exc.param


def _param(loc: tuple[Any, ...]) -> str | None:
    path = [str(part) for part in loc[1:] if not str(part).startswith(("function-after", "function-before"))]
    # Union members add their type name to the location; it is no field a client could fix.
    path = [p for p in path if not (p[:1].isalpha() and ("[" in p or p in ("str", "int", "list", "dict")))]
    return ".".join(path) or None


def validation_error(exc: RequestValidationError) -> OpenAIError:
    """The first pydantic error as a 400 naming its field."""
    errors = exc.errors()
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request", "type": "value_error"}
    if first.get("type") == "json_invalid":
        reason = first.get("ctx", {}).get("error", "")
        return OpenAIError(400, f"the request body is not valid JSON: {reason}", code="invalid_json")
    loc = tuple(first.get("loc", ()))
    if first.get("type") == "missing" and loc in (("body",), ()):
        return OpenAIError(400, "the request needs a JSON body", code="invalid_json")
    param = _param(loc)
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if param:
        message = f"{param}: {message}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more error(s))"
    return OpenAIError(400, message, param=param, code=str(first.get("type", "invalid_value")))


def install_error_handlers(app: FastAPI) -> None:
    """Make every error the app answers an OpenAI error body."""

    async def on_openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        return exc.response()

    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return OpenAIError(exc.status_code, str(exc.detail), headers=dict(exc.headers or {})).response()

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s", request.url.path, exc_info=exc)
        return OpenAIError(500, f"internal error: {type(exc).__name__}").response()

    app.add_exception_handler(OpenAIError, on_openai_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
