"""``python -m services.api``: settings, logging, then uvicorn until SIGTERM.

On SIGTERM uvicorn stops accepting connections and lets requests in flight finish (up to
``GRACEFUL_SHUTDOWN_SECONDS``): an accepted email is always committed or never answered.
Afterwards uvicorn raises the signal again for the handler that was there before it; ours
turns that into exit status 0, since stopping on request is a clean stop.

With ``API_WORKERS`` > 1 ``services.api.processes`` runs that many server processes, each
on a listening socket of its own and building its app with ``app_from_environment``; on
SIGTERM it passes the signal on, each process finishes its requests as above, and it
exits 0.
"""

from __future__ import annotations

import logging
import signal
from types import FrameType

import uvicorn
from pydantic import ValidationError

from services.api import processes
from services.api.app import create_app
from services.core.logs import configure_logging
from services.core.settings import Settings

log = logging.getLogger("services.api")

GRACEFUL_SHUTDOWN_SECONDS = 30
EXIT_CONFIG = 2


def _stop(signum: int, frame: FrameType | None) -> None:
    log.info("api stopped on %s", signal.Signals(signum).name)
    raise SystemExit(0)


def main() -> int:
    signal.signal(signal.SIGTERM, _stop)
    try:
        settings = Settings()
    except ValidationError as exc:
        configure_logging()
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}"
            for error in exc.errors(include_input=False)
        )
        log.error("invalid settings, not starting: %s", problems)
        return EXIT_CONFIG
    configure_logging(settings.log_level)
    if not settings.api_keys:
        log.error("API_KEYS is empty: set at least one bearer token; refusing to start")
        return EXIT_CONFIG
    try:
        app = create_app(settings)
    except ValueError as exc:
        log.error("not starting: %s", exc)
        return EXIT_CONFIG
    options = {
        "host": settings.api_host,
        "port": settings.api_port,
        "log_config": None,
        # uvicorn's line per request; off by default, since the API logs each email it
        # schedules, cancels or reschedules itself (the access line cost ~8 % of a create).
        "access_log": settings.api_access_log,
        "log_level": settings.log_level.lower(),
        "timeout_graceful_shutdown": GRACEFUL_SHUTDOWN_SECONDS,
    }
    if settings.api_workers == 1:
        log.info("api listening on %s:%d", settings.api_host, settings.api_port)
        uvicorn.run(app, **options)  # type: ignore[arg-type]
        return 0
    # Each process builds its own app (engine, pool, Redis): the one built above only
    # proved that the settings make a working app before any process is started.
    del app
    log.info(
        "api listening on %s:%d with %d processes",
        settings.api_host,
        settings.api_port,
        settings.api_workers,
    )
    try:
        return processes.serve(settings.api_workers, options, GRACEFUL_SHUTDOWN_SECONDS)
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", settings.api_host, settings.api_port, exc)
        return EXIT_CONFIG


if __name__ == "__main__":
    raise SystemExit(main())
