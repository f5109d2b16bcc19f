"""The relay: claim due outbox rows, hand them to the publisher, record what the broker
confirmed.

One ``run_once`` is one poll. It hands the publisher's outcomes to the recorder, a
thread that writes each lot in ONE transaction (group commit): confirmed rows are marked
published, failed ones released with a back-off. One lot is recorded at a time, while
the poll goes on claiming: recording and claiming overlap instead of taking turns. Then,
while the publisher is connected and has room, the poll claims rows
due before ``now + lookahead`` (lookahead = one poll interval and a margin, so a row is
already in the publisher when its instant comes) and hands each over with the monotonic
deadline at which the database clock reaches its ``fire_at`` less the delivery ``LEAD``
(the worker holds the email's final "." until its instant: services.core.delivery).
It keeps claiming while full batches come back, so a burst drains at the publisher's
speed, not a batch per poll.

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
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from services.core import outbox, retention
from services.core.db import db_now, is_unavailable, transaction
from services.core.delivery import LEAD
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
        # Outcomes not yet recorded; the poll adds, the recorder takes (under _outcomes).
        self._confirmed: list[int] = []
        self._failed: list[Result] = []
        self._outcomes = threading.Lock()
        self._recorder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relay-record")
        self._recording: Future[RunSummary | None] | None = None  # None: MySQL was away
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
                if not self._record_in_background(summary):
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
            self._harvest(summary, wait=True)
            self._recorder.shutdown()
            self._publisher.stop(timeout)
            self._collect(timeout=0.0)
            recorded = self._record(stopping=True)
            if recorded is None:
                log.warning(
                    "could not record %d confirmed and %d unpublished rows; "
                    "their leases will bring them back",
                    len(self._confirmed),
                    len(self._failed),
                )
            else:
                summary.published += recorded.published
                summary.failed += recorded.failed
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
        with self._outcomes:
            for result in results:
                if result.error is None:
                    self._confirmed.append(result.row.id)
                else:
                    self._failed.append(result)
        return bool(results)

    def _record_in_background(self, summary: RunSummary) -> bool:
        """Start recording the outcomes collected so far, unless a lot is being recorded
        already: they then wait for the next one, but never more than two claims' worth
        (what a crash would make the relay publish again). False: MySQL was away."""
        with self._outcomes:
            waiting = len(self._confirmed) + len(self._failed)
        if not self._harvest(summary, wait=waiting >= 2 * self._batch):
            return False
        if self._recording is None and waiting:
            self._recording = self._recorder.submit(self._record, stopping=False)
        return True

    def _harvest(self, summary: RunSummary, *, wait: bool) -> bool:
        """Count a finished recording into ``summary``. False: it found MySQL away."""
        recording = self._recording
        if recording is None or not (wait or recording.done()):
            return True
        self._recording = None
        recorded = recording.result()
        if recorded is None:
            return False
        summary.published += recorded.published
        summary.failed += recorded.failed
        return True

    def _record(self, *, stopping: bool) -> RunSummary | None:
        """Record every outcome collected so far in one transaction; None: MySQL is away
        (the outcomes are kept for the next try)."""
        with self._outcomes:
            confirmed, failed = self._confirmed, self._failed
            self._confirmed, self._failed = [], []
        if not confirmed and not failed:
            return RunSummary()

        def record(conn: Connection) -> None:
            now = db_now(conn)
            outbox.mark_published(conn, confirmed, now)
            for (available_at, error), ids in self._releases(conn, failed, now, stopping).items():
                outbox.release(conn, ids, available_at=available_at, error=error)

        try:
            transaction(self._engine, record)
        except SQLAlchemyError as exc:
            with self._outcomes:
                self._confirmed[:0], self._failed[:0] = confirmed, failed
            self._database_error("recording publish outcomes", exc)
            return None
        self._database_back()
        if failed and not stopping:
            log.warning(
                "%d rows not published, due again after a back-off (first: %s)",
                len(failed),
                failed[0].error,
            )
        return RunSummary(published=len(confirmed), failed=len(failed))

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
        # Published a lead early: the worker claims it and holds its final "." till due.
        ahead = monotonic_now - LEAD.total_seconds()
        self._publisher.submit([(row, ahead + (row.fire_at - now).total_seconds()) for row in rows])
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
