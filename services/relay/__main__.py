"""``python -m services.relay``: settings, logging, the poll timer, signals, exit code.

APScheduler 3 is only the timer: one interval job runs ``Relay.run_once`` every
``RELAY_POLL_INTERVAL`` with ``max_instances=1`` and ``coalesce=True``, and
``misfire_grace_time=None`` because the default (1 s) silently skips a poll whenever the
previous one overran, which is exactly when the outbox is busiest. A Redis wake-up (the
API saying "something is due now") moves the next poll to now; without Redis the relay
simply polls. SIGTERM/SIGINT: stop polling, let confirms arrive (bounded), record them,
hand back the rows not published, exit 0. If the publisher's thread ever ends on its own
(a bug), the same shutdown runs and the exit code is 1.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from datetime import UTC, datetime
from types import FrameType

from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers import SchedulerNotRunningError
from apscheduler.schedulers.background import BackgroundScheduler

from services.core.db import create_db_engine
from services.core.fastpath import FastPath
from services.core.logs import configure_logging
from services.core.settings import Settings, mask_url
from services.relay.publisher import Publisher, confirm_timeout_for
from services.relay.relay import Relay

log = logging.getLogger("services.relay")

POLL_JOB = "relay-poll"
HOUSEKEEPING_SECONDS = 60.0
SHUTDOWN_CONFIRM_SECONDS = 10.0
STARTUP_WAIT_SECONDS = 5.0
WAKEUP_MIN_GAP_SECONDS = 0.05  # a stream of wake-ups must not turn into a busy loop


def listen_for_wakeups(
    fastpath: FastPath, scheduler: BackgroundScheduler, relay: Relay, stop: threading.Event
) -> None:
    """Run the poll now when the API announces a due email (a thread of its own)."""
    last = 0.0
    for woke in fastpath.wakeups(timeout=1.0):
        if stop.is_set():
            return
        now = time.monotonic()
        if not woke or relay.busy or now - last < WAKEUP_MIN_GAP_SECONDS:
            continue
        last = now
        try:
            scheduler.modify_job(POLL_JOB, next_run_time=datetime.now(UTC))
        except (JobLookupError, SchedulerNotRunningError):
            return


def wait_for_stop(received: list[int], publisher: Publisher) -> int:
    """Until a signal (exit 0) or the publisher's thread has ended, which only a bug does:
    exit 1 then, so that the process is restarted instead of claiming rows it cannot
    publish (those it holds come back when their lease ends)."""
    while not received:
        if not publisher.alive:
            log.critical("relay publisher thread ended unexpectedly; stopping (exit 1)")
            return 1
        time.sleep(0.1)
    log.info("relay received %s, stopping", signal.Signals(received[0]).name)
    return 0


def main() -> int:
    settings = Settings()
    configure_logging(settings.log_level)
    engine = create_db_engine(settings.database_url.get_secret_value(), pre_ping=False)
    publisher = Publisher(
        settings.rabbitmq_url.get_secret_value(),
        settings.email_queue,
        confirm_timeout=confirm_timeout_for(settings.lease_seconds),
    )
    publisher.start()
    # A first poll before the broker answers would claim nothing and wait a whole interval.
    publisher.wait_ready(STARTUP_WAIT_SECONDS)
    relay = Relay(engine, publisher, settings)
    fastpath = FastPath(settings.redis_url.get_secret_value(), namespace=settings.email_queue)

    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        # Only note it: Event.set() here could deadlock on a lock the main thread holds.
        received.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    scheduler = BackgroundScheduler(timezone=UTC)
    scheduler.add_job(
        relay.run_once,
        "interval",
        seconds=settings.relay_poll_interval,
        id=POLL_JOB,
        max_instances=1,
        coalesce=True,
        misfire_grace_time=None,
        next_run_time=datetime.now(UTC),
    )
    scheduler.add_job(
        relay.housekeeping,
        "interval",
        seconds=HOUSEKEEPING_SECONDS,
        id="relay-housekeeping",
        max_instances=1,
        coalesce=True,
        misfire_grace_time=None,
    )
    scheduler.start()
    listener = threading.Thread(
        target=listen_for_wakeups,
        args=(fastpath, scheduler, relay, stop),
        name="relay-wakeups",
        daemon=True,
    )
    if fastpath.enabled:
        listener.start()
    log.info(
        "relay %s started: database %s, queue %s, poll every %.2f s, redis %s",
        relay.relay_id,
        mask_url(settings.database_url.get_secret_value()),
        settings.email_queue,
        settings.relay_poll_interval,
        "on" if fastpath.enabled else "off",
    )

    code = wait_for_stop(received, publisher)
    stop.set()
    relay.stop_claiming()
    scheduler.shutdown(wait=True)
    relay.close(timeout=SHUTDOWN_CONFIRM_SECONDS)
    if listener.is_alive():
        listener.join(timeout=2.0)  # it sees `stop` within one wake-up timeout (1 s)
    fastpath.close()
    engine.dispose()
    return code


if __name__ == "__main__":
    raise SystemExit(main())
