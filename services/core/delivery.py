"""The worker's side of an email's life: claim a batch of emails, record the outcomes.

A broker message says "deliver email X as of version N". A worker takes a batch of
messages and claims them with ONE conditional UPDATE: an email is claimed only if its
version is still N, it is ``pending`` or ``queued`` and due (within the ``LEAD``).
Claiming bumps the version (so every other copy of the message is stale), puts the email
``sending`` under a lease, stamps it with the batch's token, and writes a *recovery*
outbox row due when the lease ends (and a lead): if the worker dies before recording the
outcome, that row brings the email back to a worker (the documented duplicate window).
Recording an outcome - one transaction per email, so that a crash after a 250
duplicates at most that one email - deletes it (a batch's with the batch's last record).

Messages come a ``LEAD`` ahead of their instant: the relay publishes each row that much
before its ``fire_at``, and an email due within the lead is claimed, so that the broker's
commit, the claim's commit and the start of the SMTP transaction all happen before the
instant. The worker holds back the final "." - the moment the server accepts the
message - until the email is due by the database clock. A recovery row is due a lead
after its lease ends, so its message, too, comes only once the lease has ended.

The rare paths (an early message, an email a dead worker left ``sending``, a message
for an email that does not exist) are decided one by one in ``_claim_one``.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row

from services.core import outbox
from services.core.db import KeptConnection, Sent, Statement
from services.core.messages import DeliveryMessage
from services.core.schema import attempts, db_time, emails

CLAIMABLE = ("pending", "queued")

# How long before its instant a message is published and its email may be claimed: the
# broker's and the claim's commits, and the SMTP transaction up to its final ".", take
# a few milliseconds each; 100 ms covers them with room for a slow disk sync.
LEAD = timedelta(milliseconds=100)


class ClaimStatus(enum.Enum):
    CLAIMED = "claimed"  # this worker now owns the email, as version ``row.version``
    STALE = "stale"  # cancelled, rescheduled, finished or owned by another worker: drop
    EARLY = "early"  # the message came before due_at: a new outbox row will bring it back
    GONE = "gone"  # no such email at all: a poison message


@dataclass(frozen=True, slots=True)
class Claim:
    status: ClaimStatus
    row: Delivery | None = None  # the email as claimed (CLAIMED only)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one SMTP attempt came to - or ``released``: not attempted at all (the SMTP
    server was unreachable, or the lease ran short), handed back without using up an
    attempt, due again at ``retry_at``."""

    outcome: str  # "sent" | "transient_error" | "permanent_error" | "released"
    started_at: datetime
    finished_at: datetime
    smtp_code: int | None = None
    error: str | None = None
    retry_at: datetime | None = None  # set for a transient error with attempts left


# A batch's claim is driver SQL, like the record's statements below: SQLAlchemy's
# statement cache, expanding IN lists and per-row result processing cost a worker more
# Python time than the claim's round trips (~12 % of a worker's CPU went to its claims;
# as driver SQL, worker CPU per email went from 923-933 to 890-907 us with one worker and
# from 870-877 to 793-830 with two, in alternating runs of the bench's worker section).
# ``pairs`` holds one (id, version) per email, the version its message names; ``id IN``
# keeps the UPDATE on the primary key (MariaDB walks the whole key for the row
# constructor alone when it holds one pair: tests/integration/test_lifecycle.py checks
# the plans). PyMySQL writes a tuple as a parenthesized list, a tuple of pairs as one of
# pairs.
_CLAIM = (
    "UPDATE emails SET status = 'sending', version = version + 1,"
    " lease_until = %(lease_until)s, attempts = attempts + 1, claim_token = %(token)s,"
    " updated_at = %(now)s"
    " WHERE id IN %(ids)s AND (id, version) IN %(pairs)s"
    " AND status IN ('pending', 'queued') AND due_at <= %(horizon)s"  # (CLAIMABLE)
)


@dataclass(frozen=True, slots=True)
class Delivery:
    """What a delivery reads of a claimed email, as claimed: what its message is composed
    of and what its record is computed from - not the caller's metadata (up to 50 keys,
    never sent), nor the owner or the timestamps only the API shows."""

    id: str
    version: int
    attempts: int
    due_at: datetime
    sent_at: datetime | None
    message_id: str
    from_addr: str | None
    reply_to: str | None
    to_addrs: list[str]
    cc_addrs: list[str]
    bcc_addrs: list[str]
    subject: str
    headers: dict[str, str]
    text_body: str | None
    html_body: str | None

    @classmethod
    def from_driver(cls, values: Sequence[Any]) -> Delivery:
        """From a row of ``_CLAIMED`` as the driver gives it: naive UTC datetimes, JSON text."""
        (id_, version, attempts, due_at, sent_at, message_id, from_addr, reply_to) = values[:8]
        to, cc, bcc, subject, headers, text, html = values[8:]
        return cls(
            id_,
            version,
            attempts,
            due_at.replace(tzinfo=UTC),
            None if sent_at is None else sent_at.replace(tzinfo=UTC),
            message_id,
            from_addr,
            reply_to,
            json.loads(to),
            json.loads(cc),
            json.loads(bcc),
            subject,
            json.loads(headers),
            text,
            html,
        )


DELIVERY_COLUMNS: tuple[sa.Column[Any], ...] = tuple(
    emails.c[field.name] for field in dataclasses.fields(Delivery)
)
_CLAIMED = (
    f"SELECT {', '.join(column.name for column in DELIVERY_COLUMNS)} FROM emails"  # noqa: S608
    " WHERE id IN %(ids)s AND claim_token = %(token)s"
)


def claim_batch(
    conn: Connection,
    messages: Sequence[DeliveryMessage],
    *,
    now: datetime,
    lease: timedelta,
    max_attempts: int,
) -> list[Claim]:
    """One claim per message, in order. Copies of one message in a batch: the first wins."""
    if not messages:
        return []
    token = secrets.token_hex(8)
    lease_until = now + lease
    horizon = now + LEAD  # due by then: claimed now, its final "." held until due
    wanted = {m.email_id: m.version for m in reversed(messages)}  # the first copy wins
    ids = tuple(wanted)
    conn.exec_driver_sql(
        _CLAIM,
        {
            "ids": ids,
            "pairs": tuple(wanted.items()),
            "horizon": db_time(horizon),
            "lease_until": db_time(lease_until),
            "token": token,
            "now": db_time(now),
        },
    )
    found = conn.exec_driver_sql(_CLAIMED, {"ids": ids, "token": token}).all()
    claimed = {values[0]: Delivery.from_driver(values) for values in found}
    outbox.add(conn, [_recovery(row.id, row.version, lease_until) for row in claimed.values()])
    results: list[Claim] = []
    for message in messages:
        row = claimed.pop(message.email_id, None)
        if row is not None and row.version == message.version + 1:
            results.append(Claim(ClaimStatus.CLAIMED, row))
        else:
            results.append(
                _claim_one(
                    conn,
                    message,
                    now=now,
                    lease_until=lease_until,
                    token=token,
                    max_attempts=max_attempts,
                )
            )
    return results


def _claim_one(
    conn: Connection,
    message: DeliveryMessage,
    *,
    now: datetime,
    lease_until: datetime,
    token: str,
    max_attempts: int,
) -> Claim:
    """The rare paths: an email a dead worker left ``sending``, an early or stale message."""
    email_id, version = message.email_id, message.version
    row = conn.execute(sa.select(emails).where(emails.c.id == email_id).with_for_update()).first()
    if row is None:
        return Claim(ClaimStatus.GONE)
    abandoned = row.status == "sending" and row.lease_until is not None and row.lease_until <= now
    if row.version != version or not (row.status in CLAIMABLE or abandoned):
        return Claim(ClaimStatus.STALE)
    if row.status in CLAIMABLE and row.due_at > now + LEAD:  # early: bring it back on time
        outbox.add(conn, [outbox.Entry(email_id, version, row.due_at)])
        return Claim(ClaimStatus.EARLY)
    if row.status in CLAIMABLE:  # due, but the batch UPDATE held another copy's version
        return _take(conn, row, now=now, lease_until=lease_until, token=token)
    # A worker claimed this email and vanished before recording the outcome. The SMTP
    # server may or may not have the message: this is the documented duplicate window.
    _insert_attempt(
        conn,
        row,
        Outcome(
            "transient_error",
            started_at=row.updated_at,
            finished_at=now,
            error="worker lost during delivery; outcome unknown",
        ),
    )
    if row.attempts >= max_attempts:
        conn.execute(
            emails.update()
            .where(emails.c.id == email_id)
            .values(
                status="failed",
                version=version + 1,
                lease_until=None,
                updated_at=now,
                last_error=f"worker lost during delivery {row.attempts} times",
            )
        )
        return Claim(ClaimStatus.STALE)
    return _take(
        conn,
        row,
        now=now,
        lease_until=lease_until,
        token=token,
        last_error="previous attempt interrupted; re-sending",
    )


def _take(
    conn: Connection,
    row: Row[Any],
    *,
    now: datetime,
    lease_until: datetime,
    token: str,
    last_error: str | None = None,
) -> Claim:
    """Claim one email already locked by the caller (``SELECT ... FOR UPDATE``)."""
    values: dict[str, Any] = {
        "status": "sending",
        "version": row.version + 1,
        "lease_until": lease_until,
        "attempts": row.attempts + 1,
        "claim_token": token,
        "updated_at": now,
    }
    if last_error is not None:
        values["last_error"] = last_error
    conn.execute(emails.update().where(emails.c.id == row.id).values(**values))
    outbox.add(conn, [_recovery(row.id, row.version + 1, lease_until)])
    taken = conn.execute(sa.select(*DELIVERY_COLUMNS).where(emails.c.id == row.id)).one()
    return Claim(ClaimStatus.CLAIMED, Delivery(*taken))


def _recovery(email_id: str, version: int, lease_until: datetime) -> outbox.Entry:
    """The outbox row that brings a claimed email back if its worker vanishes: due a lead
    after the lease ends, so that its message, published a lead early, finds the lease
    over (``_claim_one`` takes up only an email whose lease has ended)."""
    return outbox.Entry(email_id, version, lease_until + LEAD)


# The worker records every email in a transaction of its own, so these statements run
# once per email sent. They are driver SQL, sent with the COMMIT in one round trip
# (``KeptConnection.commit``): SQLAlchemy's Core path for them (statement cache, bind
# processors, the insert's primary-key bookkeeping) cost a worker more than the round
# trips themselves - a record's client time 175 -> 120 us - and one round trip instead
# of three (UPDATE, INSERT, COMMIT) took one worker from ~790 to ~920 deliveries/s here,
# two from ~1,040 to ~1,140 (bench worker section, four alternating runs each).
# What the UPDATE found decides the rest: ``@owned`` carries its rowcount to the
# statements after it.
_RECORD = (
    "UPDATE emails SET status = %(status)s, version = %(new_version)s, due_at = %(due_at)s,"
    " attempts = %(attempts)s, lease_until = NULL, sent_at = %(sent_at)s,"
    " last_error = %(last_error)s, updated_at = %(updated_at)s"
    " WHERE id = %(id)s AND version = %(version)s AND status = 'sending'"
)
_OWNED = "SET @owned = ROW_COUNT()"
_INSERT_ATTEMPT = (
    "INSERT INTO attempts (email_id, number, started_at, finished_at, outcome, smtp_code, error)"
    " VALUES (%(a_email_id)s, %(a_number)s, %(a_started_at)s, %(a_finished_at)s, %(a_outcome)s,"
    " %(a_smtp_code)s, %(a_error)s)"
)
_INSERT_ATTEMPT_IF_OWNED = (
    "INSERT INTO attempts (email_id, number, started_at, finished_at, outcome, smtp_code, error)"
    " SELECT %(a_email_id)s, %(a_number)s, %(a_started_at)s, %(a_finished_at)s, %(a_outcome)s,"
    " %(a_smtp_code)s, %(a_error)s FROM DUAL WHERE @owned > 0"
)


def record(
    kept: KeptConnection,
    row: Delivery,
    result: Outcome,
    *,
    discard: Sequence[tuple[str, int]] | None = None,
) -> bool:
    """Record one attempt and the email's new status, drop recovery outbox rows, and
    commit: one transaction, one round trip.

    One email per transaction, on purpose: between the SMTP server's 250 and this commit
    a crash duplicates the email, and recording each send at once keeps that window to
    one email. ``row`` is the email as claimed. An email whose lease ran out meanwhile
    (another worker took it up: its version moved on) is left alone and False returned;
    the recovery path has already recorded that attempt as "outcome unknown".

    ``discard`` names the recovery rows, as (email id, version), this transaction drops:
    by default the email's own. A recovery row outliving its record is harmless (its
    message, when the lease ends, finds a newer version or a finished email and is
    dropped), so a worker recording a batch drops them all with the batch's last record.
    """
    statements, owned_at = _record_query(row, result, discard)
    return kept.commit(statements, rowcount_of=owned_at) > 0


def send_record(
    kept: KeptConnection,
    row: Delivery,
    result: Outcome,
    *,
    discard: Sequence[tuple[str, int]] | None = None,
) -> Sent:
    """``record`` in two halves (``KeptConnection.send``): the transaction goes out now;
    whether the worker still owned the email is ``rowcount() > 0`` of what this returns."""
    statements, owned_at = _record_query(row, result, discard)
    return kept.send(statements, rowcount_of=owned_at)


def _record_query(
    row: Delivery, result: Outcome, discard: Sequence[tuple[str, int]] | None
) -> tuple[list[Statement], int]:
    """The record as one text (its parameters escaped once, not once a statement), and
    where the UPDATE's answer - whether the worker still owned the email - comes."""
    statements, params = record_statements(row, result, discard=discard)
    return [(";".join(statements), params)], statements.index(_RECORD)


def record_statements(
    row: Delivery, result: Outcome, *, discard: Sequence[tuple[str, int]] | None = None
) -> tuple[list[str], dict[str, Any]]:
    """``record``'s statements, in order, and their parameters (the rowcount of
    ``_RECORD``, the UPDATE, says whether the worker still owned the email).

    Every column the UPDATE sets is computed from ``row``: the version condition makes
    the claimed row the row being updated.
    """
    sent = result.outcome == "sent"
    retry_at = None if sent else result.retry_at  # set: pending again, due at retry_at
    status = "sent" if sent else ("pending" if retry_at else "failed")
    params: dict[str, Any] = {
        "id": row.id,
        "version": row.version,
        "status": status,
        "new_version": row.version + 1 if retry_at else row.version,
        "due_at": db_time(retry_at or row.due_at),
        "attempts": row.attempts - 1 if result.outcome == "released" else row.attempts,
        "sent_at": db_time(result.finished_at if sent else row.sent_at),
        "last_error": None if sent else _describe(result),
        "updated_at": db_time(result.finished_at),
    }
    # The recovery rows go first: locks are taken outbox rows, then the email - the order
    # of the relay's mark (``outbox.mark_published``), which flags a lot's rows published
    # and then their emails queued. The other way round, a record and a mark meeting on
    # one email deadlocked (the DELETE walks the email's index entries, the published row
    # too), the record the victim: its retry on a new connection cost the next email of
    # the batch tens of milliseconds.
    statements = []
    drop, drop_params = outbox.discard_versions(
        [(row.id, row.version)] if discard is None else discard
    )
    if drop:
        statements.append(drop)
        params.update(drop_params)
    statements += [_RECORD, _OWNED]
    if result.outcome != "released":
        statements.append(_INSERT_ATTEMPT_IF_OWNED)
        params.update(_attempt_params(row, result))
    if retry_at is not None:
        add, add_params = outbox.add_if_owned(outbox.Entry(row.id, row.version + 1, retry_at))
        statements.append(add)
        params.update(add_params)
    return statements, params


def recorded_before(conn: Connection, row: Delivery, result: Outcome) -> bool:
    """Whether ``result`` is already recorded: a retried ``record`` whose first commit
    landed although its answer was lost with the connection. An attempt leaves its row,
    told apart from the recovery path's "outcome unknown" by its outcome and finish time;
    a release leaves the email pending at the next version, updated when it finished
    (unless another worker has claimed it since: nothing was sent, so no matter)."""
    if result.outcome == "released":
        found = conn.execute(
            sa.select(emails.c.id).where(
                emails.c.id == row.id,
                emails.c.version == row.version + 1,
                emails.c.status == "pending",
                emails.c.updated_at == result.finished_at,
            )
        ).first()
    else:
        found = conn.execute(
            sa.select(attempts.c.id).where(
                attempts.c.email_id == row.id,
                attempts.c.number == row.attempts,
                attempts.c.outcome == result.outcome,
                attempts.c.finished_at == result.finished_at,
            )
        ).first()
    return found is not None


def _describe(result: Outcome) -> str:
    text = result.error or result.outcome
    return (f"{result.smtp_code} {text}" if result.smtp_code else text)[:2000]


def _insert_attempt(conn: Connection, row: Row[Any], result: Outcome) -> None:
    conn.exec_driver_sql(_INSERT_ATTEMPT, _attempt_params(row, result))


def _attempt_params(row: Delivery | Row[Any], result: Outcome) -> dict[str, Any]:
    return {
        "a_email_id": row.id,
        "a_number": row.attempts,
        "a_started_at": db_time(result.started_at),
        "a_finished_at": db_time(result.finished_at),
        "a_outcome": result.outcome,
        "a_smtp_code": result.smtp_code,
        "a_error": None if result.error is None else result.error[:2000],
    }
