"""The admin port's one error shape, ``{"error": {"code": ..., "message": ...}}``, for every route and refusal.

``code`` is stable and machine-readable (``not_found``, ``forbidden``, ``invalid_request``, ...); ``message`` is for
people. ``details`` lists validation problems when there are some.
"""

from __future__ import annotations

from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException


class ErrorDetail(BaseModel):
    code: str = Field(description="stable, machine-readable")
    message: str
    details: list[dict[str, Any]] | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class ApiError(Exception):
    """Raised by an admin route or dependency; answered as ``ErrorBody`` with ``status``."""

    def __init__(self, status: int, code: str, message: str, details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details


def _details(errors: Sequence[Any]) -> list[dict[str, Any]]:
    # Never the input: a header value may be a credential.
    return [{"loc": list(error["loc"]), "msg": error["msg"]} for error in errors]


def invalid_request(error: ValidationError, message: str = "") -> ApiError:
    """400 for a body that does not validate; without ``message``, the first problems say where and what."""
    details = _details(error.errors(include_input=False))
    text = message or "; ".join(f"{'.'.join(map(str, d['loc'])) or 'body'}: {d['msg']}" for d in details[:5])
    return ApiError(400, "invalid_request", text, details)


def error_response(
    status: int, code: str, message: str, details: list[dict[str, Any]] | None = None, **extra: Any
) -> JSONResponse:
    body = ErrorBody(error=ErrorDetail(code=code, message=message, details=details))
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status, **extra)


def error_json(status: int, message: str = "") -> bytes:
    """The body of an answer written below the app (the admin protocol's own 408/413/431/503)."""
    body = ErrorBody(error=ErrorDetail(code=code_of(status), message=message or HTTPStatus(status).phrase))
    return body.model_dump_json(exclude_none=True).encode()


def code_of(status: int) -> str:
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        return "error"


def install_error_handlers(app: FastAPI) -> None:
    """Answer framework errors (404, 405, validation) in the one shape too."""

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.details)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, code_of(exc.status_code), str(exc.detail), headers=exc.headers)

    @app.exception_handler(Exception)
    async def internal(_request: Request, _exc: Exception) -> JSONResponse:
        # Starlette still logs the traceback and re-raises to the server after this answer.
        return error_response(500, "internal_error", "internal error")

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, "invalid_request", "invalid request", _details(exc.errors()))


# For a route's ``responses=``: the error answers appear in the OpenAPI schema with their model.
def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorBody, "description": HTTPStatus(status).phrase} for status in statuses}
