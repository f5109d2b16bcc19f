"""The relay: claim due outbox rows, hand them to the publisher, record what the broker
confirmed.

One ``run_once`` is one poll. It first records the publisher's outcomes in ONE
transaction (group commit): confirmed rows are marked published, failed ones released
with a back-off. Then, while the publisher is connected and has room, it claims rows
due before ``now + lookahead`` (lookahead = one poll interval and a margin, so a row is
already in the publisher when its instant comes) and hands each over with the monotonic
deadline at which the database clock reaches its ``fire_at``. It keeps claiming while
full batches come back, so a burst drains at the publisher's speed, not a batch per poll.

What can go wrong, and why nothing is lost:
- the broker is down: nothing is claimed, rows stay due;
- MySQL is down: outcomes wait in memory for the next run; if the relay dies first,
  the leases bring the rows back and they are published again (the worker drops such
  duplicates by version);
- the relay dies with rows claimed: they are due again when their lease ends.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from services.core import outbox, retention
from services.core.db import db_now, is_unavailable, transaction
from services.core.settings import Settings
from services.relay.publisher import Publisher, Result

log = logging.getLogger(__name__)

LOOKAHEAD_MARGIN_SECONDS = 0.25
RETRY_BASE_SECONDS = 0.5
RETRY_MAX_SECONDS = 30.0


@dataclass(slots=True)
class RunSummary:
    """What one poll did: rows claimed, and outcomes recorded (published / released)."""

    claimed: int = 0
    published: int = 0
    failed: int = 0


def retry_delay(publish_attempts: int) -> float:
    """Back-off before a row that failed to publish is due again: 0.5 s, doubling, 30 s cap."""
    exponent = min(max(publish_attempts - 1, 0), 16)
    return float(min(RETRY_MAX_SECONDS, RETRY_BASE_SECONDS * 2**exponent))


def new_relay_id() -> str:
    """``host:pid:random``: tells in ``outbox.claimed_by`` which process holds a lease."""
    return f"{socket.gethostname()[:40]}:{os.getpid()}:{secrets.token_hex(3)}"


class Relay:
    def __init__(
        self,
        engine: Engine,
        publisher: Publisher,
        settings: Settings,
        *,
        relay_id: str | None = None,
    ) -> None:
        self.relay_id = relay_id or new_relay_id()
        self._engine = engine
        self._publisher = publisher
        self._batch = settings.relay_batch_size
        self._poll = settings.relay_poll_interval
        self._lookahead = timedelta(seconds=settings.relay_poll_interval + LOOKAHEAD_MARGIN_SECONDS)
        self._lease = timedelta(seconds=settings.lease_seconds)
        self._window = outbox.ScanWindow()
        self._confirmed: list[int] = []
        self._failed: list[Result] = []
        self._lock = threading.Lock()  # one run at a time, and close() waits for it
        self._stopping = threading.Event()
        self._db_down = False

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    def run_once(self) -> RunSummary:
        summary = RunSummary()
        with self._lock:
            while True:
                self._collect(timeout=0.0)
                if not self._flush(summary, stopping=False):
                    return summary
                if self._stopping.is_set() or not self._publisher.ready:
                    return summary
                room = self._publisher.room
                if room == 0:
                    # Full: wait for confirms, or give up until the next poll.
                    if not self._collect(timeout=self._poll):
                        return summary
                    continue
                limit = min(room, self._batch)
                claimed = self._claim(limit)
                if claimed is None:
                    return summary
                summary.claimed += claimed
                if claimed < limit:
                    return summary

    def stop_claiming(self) -> None:
        """Let a running poll end early; no poll claims anything afterwards."""
        self._stopping.set()

    def close(self, timeout: float = 10.0) -> RunSummary:
        """Shut down: wait (bounded) for confirms, record them, hand back the rest.

        Rows claimed but not published are made due again at once, for another relay.
        """
        self.stop_claiming()
        summary = RunSummary()
        with self._lock:
            self._publisher.stop(timeout)
            self._collect(timeout=0.0)
            if not self._flush(summary, stopping=True):
                log.warning(
                    "could not record %d confirmed and %d unpublished rows; "
                    "their leases will bring them back",
                    len(self._confirmed),
                    len(self._failed),
                )
        log.info(
            "relay %s stopped: %d published, %d handed back",
            self.relay_id,
            summary.published,
            summary.failed,
        )
        return summary

    def housekeeping(self) -> None:
        """Delete what is past keeping (see ``services.core.retention``)."""
        try:
            retention.purge(self._engine)
        except SQLAlchemyError as exc:
            self._database_error("housekeeping", exc)

    def _collect(self, timeout: float) -> bool:
        results = self._publisher.results(timeout)
        for result in results:
            if result.error is None:
                self._confirmed.append(result.row.id)
            else:
                self._failed.append(result)
        return bool(results)

    def _flush(self, summary: RunSummary, *, stopping: bool) -> bool:
        """Record every outcome collected so far in one transaction. False: MySQL is away."""
        if not self._confirmed and not self._failed:
            return True
        confirmed, failed = self._confirmed, self._failed

        def record(conn: Connection) -> None:
            now = db_now(conn)
            outbox.mark_published(conn, confirmed, now)
            for (available_at, error), ids in self._releases(conn, failed, now, stopping).items():
                outbox.release(conn, ids, available_at=available_at, error=error)

        try:
            transaction(self._engine, record)
        except SQLAlchemyError as exc:
            self._database_error("recording publish outcomes", exc)
            return False
        self._database_back()
        summary.published += len(confirmed)
        summary.failed += len(failed)
        if failed and not stopping:
            log.warning(
                "%d rows not published, due again after a back-off (first: %s)",
                len(failed),
                failed[0].error,
            )
        self._confirmed, self._failed = [], []
        return True

    def _releases(
        self, conn: Connection, failed: list[Result], now: datetime, stopping: bool
    ) -> dict[tuple[datetime, str], list[int]]:
        """Failed rows grouped by (due again at, reason): a few UPDATEs, not one per row."""
        groups: dict[tuple[datetime, str], list[int]] = defaultdict(list)
        lookahead = self._lookahead
        if not failed:
            return groups
        attempts = {} if stopping else outbox.publish_attempts(conn, [r.row.id for r in failed])
        for result in failed:
            # Relays claim up to a lookahead early, so the back-off starts after it.
            delay = (
                timedelta(0)
                if stopping
                else lookahead + timedelta(seconds=retry_delay(attempts.get(result.row.id, 1)))
            )
            groups[(now + delay, result.error or "")].append(result.row.id)
        return groups

    def _claim(self, limit: int) -> int | None:
        """Claim and hand over up to ``limit`` rows; None when MySQL is away."""

        floor = self._window.floor()

        def claim(conn: Connection) -> tuple[datetime, float, list[outbox.OutboxRow]]:
            now = db_now(conn)
            # Read after the database clock: the deadline can only come out late, not early.
            monotonic_now = time.monotonic()
            rows = outbox.claim_due(
                conn,
                horizon=now + self._lookahead,
                limit=limit,
                lease_until=now + self._lease,
                claimed_by=self.relay_id,
                floor=floor,
            )
            return now, monotonic_now, rows

        try:
            now, monotonic_now, rows = transaction(self._engine, claim)
        except SQLAlchemyError as exc:
            self._database_error("claiming due rows", exc)
            return None
        self._database_back()
        self._window.scanned(floor, now, complete=len(rows) < limit)
        self._publisher.submit(
            [(row, monotonic_now + (row.fire_at - now).total_seconds()) for row in rows]
        )
        return len(rows)

    def _database_error(self, doing: str, exc: SQLAlchemyError) -> None:
        if not is_unavailable(exc):
            log.exception("database error while %s", doing)
        elif not self._db_down:
            self._db_down = True
            log.warning("database unavailable while %s; retrying each poll: %s", doing, exc)

    def _database_back(self) -> None:
        if self._db_down:
            self._db_down = False
            log.info("database available again")
