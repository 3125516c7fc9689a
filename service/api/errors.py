"""One OpenAI error envelope for every failure, mapped to HTTP in one place."""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.engine.types import EngineOverloaded, RequestTooLarge
from service.pool.pool import ModelNotFound, PoolFull
from service.rag.errors import RagError

log = logging.getLogger(__name__)


# One error `type` per status, whichever route or layer answers (clients branch on it).
_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 429: "rate_limit_error"}


def error_type(status: int) -> str:
    return _TYPES.get(status) or ("server_error" if status >= 500 else "invalid_request_error")


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        """OpenAI's error `type` follows from the status (error_type)."""
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, error_type(status), param, code
        self.headers = headers


def envelope(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(envelope(exc.message, exc.type, exc.param, exc.code), status_code=exc.status,
                        headers=exc.headers)


def to_api_error(exc: Exception) -> APIError:
    """Domain exceptions -> HTTP. Anything unknown is a 500 with a generic message (logged)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ModelNotFound):
        return APIError(404, str(exc), param="model", code="model_not_found")
    if isinstance(exc, RequestTooLarge):
        return APIError(400, str(exc), param="messages", code="context_length_exceeded")
    if isinstance(exc, EngineOverloaded):
        return APIError(429, str(exc), code="server_overloaded",
                        headers={"Retry-After": str(exc.retry_after_s)})
    if isinstance(exc, PoolFull):
        return APIError(503, str(exc), code="insufficient_memory")
    if isinstance(exc, RagError):
        return APIError(exc.status, exc.message, param=exc.param, code=exc.code)
    log.error("unhandled error", exc_info=exc)
    return APIError(500, "internal server error")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"malformed JSON body: {first.get('ctx', {}).get('error', 'could not parse')}", None
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "missing" and param:
        return f"'{param}' is a required field", param
    detail = first.get("msg", "invalid value")
    return (f"invalid value for '{param}': {detail}" if param else detail), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return error_response(APIError(400, message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        return error_response(APIError(exc.status_code, str(exc.detail)))

    @app.exception_handler(json.JSONDecodeError)
    async def _json(_: Request, exc: json.JSONDecodeError):
        return error_response(APIError(400, f"malformed JSON body: {exc}"))

    for kind in (APIError, ModelNotFound, RequestTooLarge, EngineOverloaded, PoolFull, RagError, Exception):
        app.add_exception_handler(kind, lambda _r, exc: error_response(to_api_error(exc)))
