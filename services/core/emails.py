"""The life of an email, as SQL statements on ``emails`` (and their outbox rows).

    pending --relay confirm--> queued --worker claim--> sending --250--> sent
                                                       |--4xx/conn, attempts left--> pending
                                                       |--5xx or attempts spent----> failed
    cancel (pending|queued) -> cancelled; reschedule (pending|queued) -> pending

Every transition that makes outstanding broker messages obsolete bumps ``version``; a
message is honoured only while its version equals the email's. Everything that must
happen later - the first send, a retry, a re-send after a worker died holding the email
- is an outbox row that becomes due. No function here commits.
"""

from __future__ import annotations

import base64
import binascii
import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row

from services.core import outbox
from services.core.errors import Conflict, NotFound
from services.core.ids import new_id
from services.core.schema import attempts, emails

CANCELLABLE = ("pending", "queued")
STATUSES = ("pending", "queued", "sending", "sent", "failed", "cancelled")


@dataclass(frozen=True, slots=True)
class NewEmail:
    """A validated request to schedule one email (addresses already checked)."""

    to: list[str]
    from_addr: str
    subject: str
    send_at: datetime | None
    cc: list[str] = field(default_factory=list)
    bcc: list[str] = field(default_factory=list)
    reply_to: str | None = None
    text: str | None = None
    html: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)


def message_id_for(email_id: str, from_addr: str) -> str:
    domain = from_addr.rpartition("@")[2].strip(">") or "emailsched.invalid"
    return f"<{email_id}@{domain}>"


def create(conn: Connection, owner: str, items: Sequence[NewEmail], now: datetime) -> list[str]:
    """Insert the emails and their first outbox rows: both or neither, with the caller's commit."""
    rows: list[dict[str, Any]] = []
    entries: list[outbox.Entry] = []
    for item in items:
        email_id = new_id()
        send_at = item.send_at or now
        due_at = max(send_at, now)
        rows.append(
            {
                "id": email_id,
                "owner": owner,
                "status": "pending",
                "version": 1,
                "send_at": send_at,
                "due_at": due_at,
                "from_addr": item.from_addr,
                "reply_to": item.reply_to,
                "to_addrs": item.to,
                "cc_addrs": item.cc,
                "bcc_addrs": item.bcc,
                "subject": item.subject,
                "text_body": item.text,
                "html_body": item.html,
                "headers": item.headers,
                "metadata": item.metadata,
                "message_id": message_id_for(email_id, item.from_addr),
                "attempts": 0,
                "created_at": now,
                "updated_at": now,
            }
        )
        entries.append(outbox.Entry(email_id, 1, due_at))
    conn.execute(emails.insert(), rows)
    outbox.add(conn, entries)
    return [row["id"] for row in rows]


def get(conn: Connection, owner: str, email_id: str, *, lock: bool = False) -> Row[Any]:
    query = sa.select(emails).where(emails.c.id == email_id, emails.c.owner == owner)
    if lock:
        query = query.with_for_update()
    row = conn.execute(query).first()
    if row is None:
        raise NotFound(email_id)
    return row


def get_many(conn: Connection, owner: str, ids: Sequence[str]) -> list[Row[Any]]:
    """Emails in the order of ``ids`` (the order a batch was submitted in)."""
    found = {
        r.id: r
        for r in conn.execute(
            sa.select(emails).where(emails.c.owner == owner, emails.c.id.in_(list(ids)))
        )
    }
    return [found[i] for i in ids if i in found]


def encode_cursor(email_id: str) -> str:
    return base64.urlsafe_b64encode(email_id.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    try:
        email_id = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise ValueError("malformed cursor") from exc
    if len(email_id) != 36:
        raise ValueError("malformed cursor")
    return email_id


def page(
    conn: Connection, owner: str, *, status: str | None, limit: int, cursor: str | None
) -> tuple[list[Row[Any]], str | None]:
    """Newest first, by keyset on the (time-ordered) id: stable under concurrent inserts."""
    query = sa.select(emails).where(emails.c.owner == owner)
    if status is not None:
        query = query.where(emails.c.status == status)
    if cursor is not None:
        query = query.where(emails.c.id < decode_cursor(cursor))
    rows = list(conn.execute(query.order_by(emails.c.id.desc()).limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, (encode_cursor(rows[-1].id) if more and rows else None)


def cancel(conn: Connection, owner: str, email_id: str, now: datetime) -> None:
    row = get(conn, owner, email_id, lock=True)
    if row.status == "cancelled":
        return
    if row.status not in CANCELLABLE:
        raise Conflict(f"cannot cancel an email that is {row.status}")
    conn.execute(
        emails.update()
        .where(emails.c.id == email_id)
        .values(status="cancelled", version=row.version + 1, updated_at=now)
    )
    outbox.discard_pending(conn, email_id)


def reschedule(
    conn: Connection, owner: str, email_id: str, send_at: datetime, now: datetime
) -> None:
    row = get(conn, owner, email_id, lock=True)
    if row.status not in CANCELLABLE:
        raise Conflict(f"cannot reschedule an email that is {row.status}")
    version, due_at = row.version + 1, max(send_at, now)
    conn.execute(
        emails.update()
        .where(emails.c.id == email_id)
        .values(status="pending", version=version, send_at=send_at, due_at=due_at, updated_at=now)
    )
    outbox.discard_pending(conn, email_id)
    outbox.add(conn, [outbox.Entry(email_id, version, due_at)])


def list_attempts(conn: Connection, owner: str, email_id: str) -> list[Row[Any]]:
    get(conn, owner, email_id)
    return list(
        conn.execute(
            sa.select(attempts).where(attempts.c.email_id == email_id).order_by(attempts.c.number)
        )
    )


# --- the worker's side ----------------------------------------------------------------


class ClaimStatus(enum.Enum):
    CLAIMED = "claimed"  # this worker now owns the email, as version ``row.version``
    STALE = "stale"  # cancelled, rescheduled, finished or owned by another worker: drop
    EARLY = "early"  # the message came before due_at: a new outbox row will bring it back
    GONE = "gone"  # no such email at all: a poison message


@dataclass(frozen=True, slots=True)
class Claim:
    status: ClaimStatus
    row: Row[Any] | None = None


def claim(
    conn: Connection,
    email_id: str,
    version: int,
    *,
    now: datetime,
    lease: timedelta,
    max_attempts: int,
) -> Claim:
    """Decide, with one conditional UPDATE, whether this worker may send the email now.

    On success the email is ``sending`` under a lease, its version is bumped (so every
    other copy of the message is stale), and a *recovery* outbox row is written, due when
    the lease ends: if this worker dies before recording the outcome, that row brings the
    email back to a worker. Recording the outcome deletes it.
    """
    lease_until = now + lease
    taken = conn.execute(
        emails.update()
        .where(
            emails.c.id == email_id,
            emails.c.version == version,
            emails.c.status.in_(CANCELLABLE),
            emails.c.due_at <= now,
        )
        .values(
            status="sending",
            version=version + 1,
            lease_until=lease_until,
            attempts=emails.c.attempts + 1,
            updated_at=now,
        )
    ).rowcount
    if not taken:
        return _claim_abandoned(
            conn, email_id, version, now=now, lease_until=lease_until, max_attempts=max_attempts
        )
    outbox.add(conn, [outbox.Entry(email_id, version + 1, lease_until)])
    return Claim(
        ClaimStatus.CLAIMED, conn.execute(sa.select(emails).where(emails.c.id == email_id)).one()
    )


def _claim_abandoned(
    conn: Connection,
    email_id: str,
    version: int,
    *,
    now: datetime,
    lease_until: datetime,
    max_attempts: int,
) -> Claim:
    """The rare paths: an email a dead worker left ``sending``, an early or stale message."""
    row = conn.execute(sa.select(emails).where(emails.c.id == email_id).with_for_update()).first()
    if row is None:
        return Claim(ClaimStatus.GONE)
    if row.version != version:
        return Claim(ClaimStatus.STALE, row)
    if row.status in CANCELLABLE:  # right version, not due yet: bring it back on time
        outbox.add(conn, [outbox.Entry(email_id, version, row.due_at)])
        return Claim(ClaimStatus.EARLY, row)
    if row.status != "sending" or row.lease_until is None or row.lease_until > now:
        return Claim(ClaimStatus.STALE, row)
    # A worker claimed this email and vanished before recording the outcome. The SMTP
    # server may or may not have the message: this is the documented duplicate window.
    _record_attempt(
        conn,
        email_id,
        row.attempts,
        started_at=row.updated_at,
        finished_at=now,
        outcome="transient_error",
        smtp_code=None,
        error="worker lost during delivery; outcome unknown",
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
        return Claim(ClaimStatus.STALE, row)
    conn.execute(
        emails.update()
        .where(emails.c.id == email_id)
        .values(
            version=version + 1,
            lease_until=lease_until,
            attempts=row.attempts + 1,
            updated_at=now,
            last_error="previous attempt interrupted; re-sending",
        )
    )
    outbox.add(conn, [outbox.Entry(email_id, version + 1, lease_until)])
    return Claim(
        ClaimStatus.CLAIMED, conn.execute(sa.select(emails).where(emails.c.id == email_id)).one()
    )


def _load(conn: Connection, email_id: str) -> Row[Any]:
    return conn.execute(sa.select(emails).where(emails.c.id == email_id)).one()


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one SMTP attempt came to, to be recorded in one transaction."""

    outcome: str  # "sent" | "transient_error" | "permanent_error"
    started_at: datetime
    finished_at: datetime
    smtp_code: int | None = None
    error: str | None = None
    retry_at: datetime | None = None  # set for a transient error with attempts left


def record(conn: Connection, row: Row[Any], result: Outcome) -> bool:
    """Record the attempt and the email's new status; drop its recovery outbox row.

    ``row`` is the email as claimed. Returns False when the lease was lost meanwhile
    (the lease ran out and the email went back to the queue): nothing is written then,
    and the recovery path has already recorded this attempt as "outcome unknown".
    """
    owned = (emails.c.id == row.id, emails.c.version == row.version, emails.c.status == "sending")
    now = result.finished_at
    values: dict[str, Any] = {"lease_until": None, "updated_at": now}
    if result.outcome == "sent":
        values.update(status="sent", sent_at=now, last_error=None)
    elif result.retry_at is not None:
        values.update(
            status="pending",
            version=row.version + 1,
            due_at=result.retry_at,
            last_error=_describe(result),
        )
    else:
        values.update(status="failed", last_error=_describe(result))
    if not conn.execute(emails.update().where(*owned).values(**values)).rowcount:
        return False
    _record_attempt(
        conn,
        row.id,
        row.attempts,
        started_at=result.started_at,
        finished_at=result.finished_at,
        outcome=result.outcome,
        smtp_code=result.smtp_code,
        error=result.error,
    )
    outbox.discard_pending(conn, row.id, row.version)
    if result.outcome != "sent" and result.retry_at is not None:
        outbox.add(conn, [outbox.Entry(row.id, row.version + 1, result.retry_at)])
    return True


def _describe(result: Outcome) -> str:
    text = result.error or result.outcome
    return (f"{result.smtp_code} {text}" if result.smtp_code else text)[:2000]


def _record_attempt(
    conn: Connection,
    email_id: str,
    number: int,
    *,
    started_at: datetime,
    finished_at: datetime,
    outcome: str,
    smtp_code: int | None,
    error: str | None,
) -> None:
    conn.execute(
        attempts.insert().values(
            email_id=email_id,
            number=number,
            started_at=started_at,
            finished_at=finished_at,
            outcome=outcome,
            smtp_code=smtp_code,
            error=None if error is None else error[:2000],
        )
    )
