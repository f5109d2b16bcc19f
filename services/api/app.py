"""``create_app(settings)`` builds the whole API; nothing happens at import time."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import sqlalchemy as sa
from anyio import to_thread
from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from services.api.body_limit import BodyLimit
from services.api.deps import Runtime
from services.api.errors import install_error_handlers
from services.api.group_commit import GroupCommit
from services.api.routes import emails, health
from services.api.scheduling import wake_relay_if_due
from services.api.schemas import MAX_BATCH, normalize_address
from services.core.db import check_durability, create_db_engine
from services.core.fastpath import FastPath
from services.core.logs import configure_logging
from services.core.settings import Settings, mask_url

log = logging.getLogger(__name__)

# Requests do their blocking database work on API_THREADS threads per process (Starlette's
# default is 40), each holding one pooled connection; the pool keeps two more for /readyz
# and the start-up check, and the group commit writes on an engine of its own. Threads
# beyond what hides MySQL's round trips only take turns at the GIL: on two cores, one
# process spent 1.75 ms of CPU per create with 2 threads, ~2 ms with 4 and 2.6 ms with 8,
# and 40 threads halved throughput with 32 clients.
SPARE_CONNECTIONS = 2


def build_runtime(settings: Settings) -> Runtime:
    """Engine, Redis fast path and key digests; MAIL_FROM must be a valid address."""
    try:
        default_from = normalize_address(settings.mail_from) if settings.mail_from else ""
    except ValueError as exc:
        raise ValueError(f"MAIL_FROM is not a usable address: {exc}") from None
    engine = create_db_engine(
        settings.database_url.get_secret_value(),
        pool_size=settings.api_threads + SPARE_CONNECTIONS,
    )
    # The group commit's own: its kept connection, and one for a group too large for one
    # query. Only it sends several statements in a query (requests' work never does).
    writer = create_db_engine(
        settings.database_url.get_secret_value(), pool_size=2, multi_statements=True
    )
    fastpath = FastPath(settings.redis_url.get_secret_value(), namespace=settings.email_queue)
    return Runtime(
        settings=settings,
        engine=engine,
        fastpath=fastpath,
        key_digests=tuple(
            hashlib.sha256(key.get_secret_value().encode()).digest() for key in settings.api_keys
        ),
        default_from=default_from,
        group_commit=GroupCommit(
            writer,
            max_emails=MAX_BATCH,
            written=partial(wake_relay_if_due, fastpath, settings.relay_poll_interval),
        ),
    )


def _check_durability(runtime: Runtime) -> None:
    """Warn about a MySQL that could lose a commit; a database still down is no reason
    not to start (the API answers 503 until it is back)."""
    try:
        check_durability(runtime.engine)
    except (sa.exc.DBAPIError, sa.exc.TimeoutError) as exc:
        log.warning(
            "could not check MySQL durability settings at %s: %s",
            mask_url(runtime.settings.database_url.get_secret_value()),
            type(exc).__name__,
        )


def create_app(settings: Settings) -> FastAPI:
    runtime = build_runtime(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        to_thread.current_default_thread_limiter().total_tokens = settings.api_threads
        await run_in_threadpool(_check_durability, runtime)
        try:
            yield
        finally:
            runtime.group_commit.close()
            runtime.group_commit.engine.dispose()
            runtime.fastpath.close()
            runtime.engine.dispose()

    app = FastAPI(
        title="emailsched",
        summary="Schedule emails; each is sent once, not before its time.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    app.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes)
    install_error_handlers(app)
    app.include_router(emails.creates)
    app.include_router(emails.router)
    app.include_router(health.router)
    return app


def app_from_environment() -> FastAPI:
    """The app of one of ``API_WORKERS`` server processes: settings from the environment
    (the supervisor already validated them), logging set up in this process too."""
    settings = Settings()
    configure_logging(settings.log_level)
    return create_app(settings)
