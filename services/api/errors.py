"""Domain errors become HTTP answers here, and only here.

A database that cannot be reached is a 503 with ``Retry-After`` (the unit of work has
rolled back, so nothing is half-written); any other database error is logged and
answered with a bare 500 whose body reveals nothing about the statement.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import sqlalchemy as sa
from fastapi import FastAPI, Request, status
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from services.core.db import is_unavailable
from services.core.errors import Conflict, IdempotencyInFlight, IdempotencyMismatch, NotFound

log = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 5


def _detail(status_code: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status_code, headers=headers)


async def _not_found(request: Request, exc: Exception) -> JSONResponse:
    return _detail(status.HTTP_404_NOT_FOUND, "email not found")


async def _conflict(request: Request, exc: Exception) -> JSONResponse:
    return _detail(status.HTTP_409_CONFLICT, str(exc))


async def _mismatch(request: Request, exc: Exception) -> JSONResponse:
    return _detail(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc))


async def _invalid(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's 422, also when an input echoed back is NaN or infinity (which JSON
    cannot carry: FastAPI's own handler fails on them with a 500)."""
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    detail = _finite(jsonable_encoder(errors))
    return JSONResponse({"detail": detail}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, list):
        return [_finite(item) for item in value]
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    return value


async def _database(request: Request, exc: Exception) -> JSONResponse:
    if is_unavailable(exc):
        log.warning("database unavailable: %s %s answered 503", request.method, request.url.path)
        return _detail(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            "database unavailable, retry later",
            {"Retry-After": str(RETRY_AFTER_SECONDS)},
        )
    log.error(
        "database error on %s %s: %s",
        request.method,
        request.url.path,
        type(exc).__name__,
        exc_info=exc,
    )
    return _detail(status.HTTP_500_INTERNAL_SERVER_ERROR, "internal error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(NotFound, _not_found)
    app.add_exception_handler(Conflict, _conflict)
    app.add_exception_handler(IdempotencyInFlight, _conflict)
    app.add_exception_handler(IdempotencyMismatch, _mismatch)
    app.add_exception_handler(sa.exc.DBAPIError, _database)
    app.add_exception_handler(sa.exc.TimeoutError, _database)
