"""Liveness and readiness probes, open to everyone (no API key)."""

from __future__ import annotations

import logging

import sqlalchemy as sa
from fastapi import APIRouter
from fastapi.responses import JSONResponse

from services.api.deps import RuntimeDep
from services.api.schemas import HealthOut

log = logging.getLogger(__name__)

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> HealthOut:
    """200 while the process can answer at all - also while every request thread waits
    for MySQL: this one runs on the event loop."""
    return HealthOut(status="ok")


@router.get(
    "/readyz",
    response_model=HealthOut,
    responses={503: {"model": HealthOut, "description": "MySQL does not answer"}},
)
def readyz(runtime: RuntimeDep) -> JSONResponse:
    """200 when MySQL answers ``SELECT 1``: a load balancer should send traffic here."""
    try:
        with runtime.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except (sa.exc.DBAPIError, sa.exc.TimeoutError) as exc:
        log.warning("not ready: database unavailable (%s)", type(exc).__name__)
        return JSONResponse({"status": "unavailable"}, status_code=503)
    return JSONResponse({"status": "ok"})
