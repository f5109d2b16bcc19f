"""Broker messages in, decisions out: the worker's logic, without the broker.

Messages come in batches (whatever the consumer has at hand, up to its prefetch):

    decode ──PoisonMessage / no such id ────────────────────────────────> REJECT (dead-letter)
    Redis knows a newer version ────────────────────────────────────────> ACK (stale)
    claim the batch (ONE transaction, DB clock) ─ GONE ─────────────────> REJECT
                                                ─ STALE / EARLY ────────> ACK
                                                ─ database unavailable ─> REQUEUE
                                                ─ CLAIMED ─> compose + SMTP, one by one,
                                                  each final "." held until due,
                                                  each outcome recorded before the
                                                  next email's final "."
                                                     committed ─────────> ACK
                                                     stop requested, database still down
                                                                     ───> REQUEUE

The ack comes only after the outcome is committed. Between the server's 250 and that
commit is the one window where a crash duplicates a message; the recovery outbox row
written by the claim is what brings such an email back, with the same Message-ID.
Claims are batched (one transaction for the batch), records are not: each send is
recorded before the next one is finished, so the window never holds more than one
email. The two overlap where that is safe: while one record commits (sent to MySQL, its
answer read afterwards, on the same thread), the next email's SMTP transaction is begun -
envelope and body, all but the final "." - and the dot goes out only after the commit.
A crash in between leaves the next message unfinished, which the server discards; a
record that fails makes the worker abort it (close the connection) and send it again
once the record is settled.
While MySQL is unavailable the record is retried (once more just before the lease ends,
then on until the database answers), since every retry that lands closes the window
without a duplicate. Past the lease a record can still land: the version it is made on
decides, and only another worker's claim of the email moves that on.

Messages come up to ``delivery.LEAD`` (100 ms) before their instant, and emails due
within it are claimed: by the instant the email is claimed and its SMTP transaction
begun, and only the final "." - with which the server takes the message - waits for
the database clock to reach ``due_at``. Nothing of an attempt happens on the record
before that: it starts at its instant, and a refusal is recorded once it is due.

An email is not attempted - it is *released*, due again shortly, without using up an
attempt - when the SMTP server proved unreachable earlier in the batch, or when so much of
the lease is gone that the send might outlive it.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from services.core import delivery
from services.core.db import KeptConnection, Sent, db_now, is_unavailable, transaction
from services.core.delivery import Claim, ClaimStatus, Delivery, Outcome
from services.core.errors import DeliveryError, PermanentDelivery, PoisonMessage
from services.core.fastpath import FastPath
from services.core.messages import DeliveryMessage
from services.core.settings import Settings
from services.worker.backoff import retry_delay
from services.worker.compose import build_message
from services.worker.smtp import SmtpSender, SmtpUnavailable

log = logging.getLogger(__name__)

RELEASE_DELAY_SECONDS = 1.0  # a released email is due again after this
_RECORD_RETRY_FIRST = 0.1  # seconds; doubles up to _RECORD_RETRY_MAX
_RECORD_RETRY_MAX = 2.0
_LAST_TRY_BEFORE_LEASE_END = 0.25  # seconds: one record retry this long before the lease ends


def _sleep(seconds: float) -> bool:
    time.sleep(seconds)
    return True


class Decision(enum.Enum):
    ACK = "ack"  # done with it: delivered, recorded, or obsolete
    REJECT = "reject"  # nobody can ever process it: to the dead-letter queue
    REQUEUE = "requeue"  # the database is unavailable: give it back and pause


@dataclass(frozen=True, slots=True)
class _Attempt:
    outcome: str  # "sent" | "transient_error" | "permanent_error" | "released"
    smtp_code: int | None
    error: str | None


@dataclass(frozen=True, slots=True)
class _Done:
    """One email of the batch, handled, its outcome not yet committed."""

    row: Delivery
    started_at: datetime
    finished_at: datetime
    attempt: _Attempt
    discard: tuple[tuple[str, int], ...]  # recovery rows the record drops (delivery.record)


class _Recording:
    """A ``_Done`` whose record's first try is sent: its answer is read once the next
    email's SMTP transaction is begun - the server commits it meanwhile."""

    __slots__ = ("_error", "_result", "_sent", "done", "index", "outcome")

    def __init__(self, index: int, done: _Done, outcome: Outcome, sent: Sent) -> None:
        self.index = index
        self.done = done
        self.outcome = outcome
        self._sent: Sent | None = sent
        self._result: tuple[bool, Outcome] | None = None
        self._error: Exception | None = None

    def error(self) -> Exception | None:
        """Read the answer (the first call waits for it); what went wrong, if anything."""
        if self._sent is not None:
            sent, self._sent = self._sent, None
            try:
                self._result = (sent.rowcount() > 0, self.outcome)
            except Exception as exc:  # raised again by result(), as a Future would
                self._error = exc
        return self._error

    def result(self) -> tuple[bool, Outcome]:
        """Whether this worker still owned the email, and the outcome as written."""
        if (error := self.error()) is not None:
            raise error
        if self._result is None:
            raise RuntimeError("record read without an answer")
        return self._result


class _Clock:
    """The database clock, carried forward by the monotonic clock from one reading.

    ``started`` is read after the database answered, so this clock lags the database's
    by that answer's trip and never runs ahead of it: an email held until it is due by
    this clock is due by the database's."""

    def __init__(self, db_time: datetime, started: float) -> None:
        self._db_time = db_time
        self._started = started

    def now(self) -> datetime:
        return self._db_time + timedelta(seconds=time.monotonic() - self._started)

    def wait_until(self, instant: datetime) -> None:
        """Return once ``now()`` has reached ``instant`` (at once if it has)."""
        while (left := (instant - self.now()).total_seconds()) > 0:
            time.sleep(left)


class Worker:
    """Handles delivery messages; one ``SmtpSender`` (one SMTP connection) per worker."""

    def __init__(
        self, settings: Settings, engine: Engine, sender: SmtpSender, fastpath: FastPath
    ) -> None:
        self._settings = settings
        self._engine = engine
        self._sender = sender
        self._fastpath = fastpath
        self._lease = timedelta(seconds=settings.lease_seconds)
        # Start no send when less than this is left of the lease: it might outlive it.
        self._send_margin = min(settings.lease_seconds / 2, 2 * settings.smtp_timeout)
        self._smtp_down = False
        self._learned: dict[str, int] = {}  # versions recorded in this batch, for Redis
        # Each send's record goes out on a connection kept for the batch, and is read
        # after the next email's transaction is begun: the engine must let one query hold
        # several statements (``multi_statements``).
        self._records = KeptConnection(engine)

    def close(self) -> None:
        self._records.release()

    @property
    def smtp_down(self) -> bool:
        """The last attempt could not even open an SMTP session: take no more messages
        until ``smtp_recovered`` says so (the consumer pauses)."""
        return self._smtp_down

    def smtp_recovered(self) -> bool:
        """Probe the server; True (and consuming may go on) once a session is open."""
        problem = self._sender.probe()
        if problem is None:
            self._smtp_down = False
            return True
        log.warning("SMTP server still unavailable: %s", problem)
        return False

    def handle(self, body: bytes, *, pause: Callable[[float], bool] = _sleep) -> Decision:
        """One message: a batch of one."""
        return self.handle_batch([body], pause=pause)[0]

    def handle_batch(
        self, bodies: Sequence[bytes], *, pause: Callable[[float], bool] = _sleep
    ) -> list[Decision]:
        """One decision per message, in order. ``pause`` is how to wait between retries of
        the record while MySQL is away, False when the process is stopping (the retries
        end); the consumer passes one that keeps servicing the broker connection
        (heartbeats), so a long retry does not cost it the connection."""
        decisions: dict[int, Decision] = {}
        decoded = [(index, _decode(body)) for index, body in enumerate(bodies)]
        known = self._fastpath.known_versions([m.email_id for _, m in decoded if m is not None])
        wanted: list[tuple[int, DeliveryMessage]] = []
        for index, message in decoded:
            if message is None:
                decisions[index] = Decision.REJECT
            elif known.get(message.email_id, 0) > message.version:
                log.debug("email %s v%d: stale (Redis)", message.email_id, message.version)
                decisions[index] = Decision.ACK
            else:
                wanted.append((index, message))
        if wanted:
            decisions.update(self._deliver_batch(wanted, pause))
        self._fastpath.remember_versions(self._learned)
        self._learned = {}
        return [decisions[index] for index in range(len(bodies))]

    def _deliver_batch(
        self, wanted: list[tuple[int, DeliveryMessage]], pause: Callable[[float], bool]
    ) -> dict[int, Decision]:
        messages = [message for _, message in wanted]
        # The lease is counted from before the claim: the database's own count starts
        # somewhere inside the claim transaction, so this end is never later than its.
        lease_ends = time.monotonic() + self._settings.lease_seconds
        try:
            clock, claims = transaction(self._engine, lambda conn: self._claim(conn, messages))
        except SQLAlchemyError as exc:
            self._log_db_error(exc, f"claim of {len(messages)} messages failed, requeueing")
            return dict.fromkeys((index for index, _ in wanted), Decision.REQUEUE)
        decisions: dict[int, Decision] = {}
        to_send: list[tuple[int, Delivery]] = []
        for (index, message), claim in zip(wanted, claims, strict=True):
            if claim.status is ClaimStatus.GONE:
                log.warning("dead-lettering a message for unknown email %s", message.email_id)
                decisions[index] = Decision.REJECT
            elif claim.row is None or claim.status is not ClaimStatus.CLAIMED:
                log.info(
                    "email %s v%d: %s, dropped",
                    message.email_id,
                    message.version,
                    claim.status.value,
                )
                decisions[index] = Decision.ACK
            else:
                to_send.append((index, claim.row))
        # Claimed up to a lead before they are due: in the order they fall due.
        to_send.sort(key=lambda item: item[1].due_at)
        decisions.update(self._send(to_send, clock, lease_ends, pause))
        return decisions

    def _send(
        self,
        to_send: list[tuple[int, Delivery]],
        clock: _Clock,
        lease_ends: float,
        pause: Callable[[float], bool],
    ) -> dict[int, Decision]:
        """Send the claimed emails one by one, each recorded before the next is finished.

        Their recovery rows all go with the batch's last record: one DELETE per batch,
        not one per email. A record that did not land (requeued) keeps its row."""
        decisions: dict[int, Decision] = {}
        previous: _Recording | None = None
        settled: list[tuple[str, int]] = []  # recorded: their recovery rows may go
        try:
            for position, (index, row) in enumerate(to_send, start=1):
                # Claimed up to a lead early, the attempt counts from its instant.
                started_at = max(clock.now(), row.due_at)
                attempt = self._begin(row, started_at, lease_ends)
                if previous is not None:
                    # The previous send is recorded before this one's final "." goes out:
                    # a crash in between leaves this message unfinished, so discarded.
                    failed = previous.error() is not None
                    if failed and attempt is None:  # retries may take long: give it up
                        self._sender.abort()
                    decisions[previous.index] = self._settle(previous, lease_ends, pause)
                    if decisions[previous.index] is Decision.ACK:
                        settled.append((previous.done.row.id, previous.done.row.version))
                    previous = None
                    if failed and attempt is None:  # never sent: start it again
                        started_at = max(clock.now(), row.due_at)
                        attempt = self._begin(row, started_at, lease_ends)
                # Nothing is sent - or decided - before the email is due.
                clock.wait_until(row.due_at)
                if attempt is None:
                    attempt = self._finish()
                last = position == len(to_send)
                discard = (*settled, (row.id, row.version)) if last else ()
                done = _Done(row, started_at, clock.now(), attempt, discard)
                outcome = self._outcome(done)
                sent = delivery.send_record(self._records, row, outcome, discard=discard)
                previous = _Recording(index, done, outcome, sent)
            if previous is not None:
                decisions[previous.index] = self._settle(previous, lease_ends, pause)
                previous = None
        finally:  # after a bug: no record left running, nothing half-sent left open
            if previous is not None:  # its answer read: the connection is left clean
                previous.error()
            if self._sender.begun:
                self._sender.abort()
            self._records.release()
        return decisions

    def _settle(
        self, recording: _Recording, lease_ends: float, pause: Callable[[float], bool]
    ) -> Decision:
        """The record's first try, and the retries if it failed."""
        return self._record(recording.done, lease_ends, pause, first_try=recording.result)

    def _claim(
        self, conn: Connection, messages: list[DeliveryMessage]
    ) -> tuple[_Clock, list[Claim]]:
        now = db_now(conn)
        clock = _Clock(now, time.monotonic())  # read after the database's answer
        claims = delivery.claim_batch(
            conn,
            messages,
            now=now,
            lease=self._lease,
            max_attempts=self._settings.max_attempts,
        )
        return clock, claims

    def _begin(self, row: Delivery, now: datetime, lease_ends: float) -> _Attempt | None:
        """Start the email's SMTP transaction, all but its final "."; None when it is
        begun, else what came of it without a send (released, refused, unreachable)."""
        if self._smtp_down:
            return _Attempt("released", None, "not attempted: SMTP server unavailable")
        if time.monotonic() > lease_ends - self._send_margin:
            return _Attempt("released", None, "not attempted: lease running short")
        try:
            composed = build_message(row, self._settings, now=now)
            self._sender.begin(
                composed.data,
                composed.envelope_from,
                composed.recipients,
                smtputf8=composed.smtputf8,
            )
        except DeliveryError as exc:
            return self._failed(exc)
        return None

    def _finish(self) -> _Attempt:
        """The final "." of the begun transaction, and what the server made of it."""
        try:
            result = self._sender.finish()
        except DeliveryError as exc:
            return self._failed(exc)
        refused = "; ".join(f"{rcpt}: {reply}" for rcpt, reply in result.refused.items())
        return _Attempt("sent", result.code, f"refused: {refused}" if refused else None)

    def _failed(self, exc: DeliveryError) -> _Attempt:
        self._smtp_down = isinstance(exc, SmtpUnavailable)
        kind = "permanent_error" if isinstance(exc, PermanentDelivery) else "transient_error"
        return _Attempt(kind, exc.smtp_code, str(exc))

    def _outcome(self, done: _Done) -> Outcome:
        """What the record writes of the attempt."""
        attempt = done.attempt
        return Outcome(
            attempt.outcome,
            started_at=done.started_at,
            finished_at=done.finished_at,
            smtp_code=attempt.smtp_code,
            error=attempt.error,
            retry_at=self._retry_at(done.row, attempt, done.finished_at),
        )

    def _try_record(self, done: _Done, *, retrying: bool = False) -> tuple[bool, Outcome]:
        """One transaction committing the outcome (after a first try that failed): whether
        this worker still owned the email, and the outcome as written."""
        row, outcome = done.row, self._outcome(done)
        recorded = delivery.record(self._records, row, outcome, discard=done.discard)
        if not recorded and retrying:
            landed = transaction(
                self._engine, lambda conn: delivery.recorded_before(conn, row, outcome)
            )
            if landed:
                log.info("email %s: the record had landed; its answer was lost", row.id)
                recorded = True
        return recorded, outcome

    def _record(
        self,
        done: _Done,
        lease_ends: float,
        pause: Callable[[float], bool],
        *,
        first_try: Callable[[], tuple[bool, Outcome]] | None = None,
    ) -> Decision:
        """Commit the outcome, retrying while MySQL is unavailable; ack only after the commit.

        ``first_try`` is the result of a try made already (sent before the next email's
        transaction was begun).
        The retries go on past the lease (a stop request ends them): until another worker
        claims the email, which needs the database too, a late record still lands. One
        retry comes just before the lease ends, so a database back by then always gets
        the record before the recovery path can take the email up."""
        row, attempt = done.row, done.attempt
        retrying = False
        delay = _RECORD_RETRY_FIRST
        last_try = lease_ends - _LAST_TRY_BEFORE_LEASE_END
        while True:
            try:
                if first_try is not None and not retrying:
                    recorded, outcome = first_try()
                else:
                    recorded, outcome = self._try_record(done, retrying=retrying)
                break
            except SQLAlchemyError as exc:
                if not is_unavailable(exc):
                    self._log_db_error(exc, self._not_recorded(done))
                    return Decision.REQUEUE
                retrying = True
                if delay == _RECORD_RETRY_FIRST:
                    log.warning(
                        "email %s: database unavailable, retrying the record until it answers: %s",
                        row.id,
                        _short(exc),
                    )
                left = last_try - time.monotonic()
                if not pause(min(delay, left) if left > 0 else delay):
                    log.warning("%s (stop requested)", self._not_recorded(done))
                    return Decision.REQUEUE
                delay = min(delay * 2, _RECORD_RETRY_MAX)
        if not recorded:
            log.warning(
                "email %s attempt %d: lease lost before recording %s; the recovery path owns it",
                row.id,
                row.attempts,
                attempt.outcome,
            )
            return Decision.ACK
        self._learned[row.id] = row.version + 1 if outcome.retry_at is not None else row.version
        self._log_outcome(row, outcome)
        return Decision.ACK

    @staticmethod
    def _not_recorded(done: _Done) -> str:
        return (
            f"email {done.row.id} attempt {done.row.attempts}: {done.attempt.outcome} not"
            " recorded; requeueing, its recovery row brings it back when the lease ends"
        )

    def _retry_at(self, row: Delivery, attempt: _Attempt, now: datetime) -> datetime | None:
        """When to try again after a transient error; None when attempts are spent.
        ``now`` is when the attempt finished, by the database clock (``_Clock``)."""
        if attempt.outcome == "released":
            return now + timedelta(seconds=RELEASE_DELAY_SECONDS)
        if attempt.outcome != "transient_error" or row.attempts >= self._settings.max_attempts:
            return None
        delay = retry_delay(
            row.attempts,
            self._settings.retry_backoff_seconds,
            self._settings.retry_backoff_max_seconds,
        )
        return now + timedelta(seconds=delay)

    @staticmethod
    def _log_outcome(row: Delivery, outcome: Outcome) -> None:
        if outcome.outcome == "sent":
            status = "sent"
        elif outcome.outcome == "released":
            status = f"released, due again at {outcome.retry_at}"
        elif outcome.retry_at is not None:
            status = f"pending, retry at {outcome.retry_at.isoformat()}"
        else:
            status = "failed"
        log.info(
            "email %s attempt %d: %s code=%s -> %s%s",
            row.id,
            row.attempts,
            outcome.outcome,
            outcome.smtp_code,
            status,
            f" ({outcome.error})" if outcome.error else "",
        )

    @staticmethod
    def _log_db_error(exc: SQLAlchemyError, what: str) -> None:
        if is_unavailable(exc):
            log.warning("%s: database unavailable: %s", what, _short(exc))
        else:
            log.exception("%s: database error", what)


def _decode(body: bytes) -> DeliveryMessage | None:
    """The message, or None (logged) when it is poison: undecodable, or no email id."""
    try:
        return DeliveryMessage.decode(body)
    except PoisonMessage as exc:
        log.warning("dead-lettering an undecodable message: %s", exc)
        return None


def _short(exc: SQLAlchemyError) -> str:
    """The driver's one-line message, without SQLAlchemy's statement and parameters."""
    orig = getattr(exc, "orig", None) or exc
    lines = str(orig).splitlines()
    return f"{type(orig).__name__}: {lines[0] if lines else ''}"
