"""The life of an email, as SQL statements on ``emails`` (and their outbox rows).

    pending --relay confirm--> queued --worker claim--> sending --250--> sent
                                                       |--4xx/conn, attempts left--> pending
                                                       |--5xx or attempts spent----> failed
    cancel (pending|queued) -> cancelled; reschedule (pending|queued) -> pending

This module holds the API's side (create, read, cancel, reschedule);
``services.core.delivery`` holds the worker's (claim, record).

Every transition that makes outstanding broker messages obsolete bumps ``version``; a
message is honoured only while its version equals the email's. Everything that must
happen later - the first send, a retry, a re-send after a worker died holding the email
- is an outbox row that becomes due. No function here commits.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row

from services.core import outbox
from services.core.db import Statement
from services.core.errors import Conflict, NotFound
from services.core.ids import new_id
from services.core.schema import attempts, db_time, emails, json_text

CANCELLABLE = ("pending", "queued")
# The columns a new email leaves to their defaults, as a read-back would show them.
_UNSET: dict[str, Any] = {
    "sent_at": None,
    "last_error": None,
    "claim_token": None,
    "lease_until": None,
}
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
    return [row["id"] for row in create_many(conn, [Creation(owner, items, now)])[0]]


# A new email's columns (the rest keep their defaults: _UNSET). Driver SQL, not
# ``emails.insert()``: for a batch, SQLAlchemy's per-row parameter processing and a time
# formatted anew for each column holding it cost the API more than PyMySQL's escaping.
_INSERT_HEAD = (
    "INSERT INTO emails (id, owner, status, version, send_at, due_at, from_addr, reply_to,"
    " to_addrs, cc_addrs, bcc_addrs, subject, text_body, html_body, headers, metadata,"
    " message_id, attempts, created_at, updated_at) VALUES "
)
_INSERT_ROW = "(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
_INSERT = _INSERT_HEAD + _INSERT_ROW


@dataclass(frozen=True, slots=True)
class Creation:
    """One request's emails: whose, which, and the time it was received."""

    owner: str
    items: Sequence[NewEmail]
    now: datetime


def create_many(conn: Connection, creations: Sequence[Creation]) -> list[list[dict[str, Any]]]:
    """``create`` for several requests in the same two statements, returning each
    request's emails with their columns as written (what a read-back would return,
    without the round trip: the API answers a create from these), in order."""
    written: list[list[dict[str, Any]]] = []
    bound: list[tuple[Any, ...]] = []
    entries: list[outbox.Entry] = []
    for creation in creations:
        written.append(_bind(creation, bound, entries))
    if bound:
        conn.exec_driver_sql(_INSERT, bound)
    outbox.add(conn, entries)
    return written


def create_statements(
    creations: Sequence[Creation],
) -> tuple[list[Statement], list[list[dict[str, Any]]]]:
    """``create_many`` as two statements for ``KeptConnection.commit`` - every email in
    one INSERT, every outbox row in another - and what ``create_many`` returns. They go
    to MySQL in one packet: for creations of about a megabyte of text at most
    (``text_size``), not for any size the API accepts."""
    written: list[list[dict[str, Any]]] = []
    bound: list[tuple[Any, ...]] = []
    entries: list[outbox.Entry] = []
    for creation in creations:
        written.append(_bind(creation, bound, entries))
    if not bound:
        return [], written
    insert = _INSERT_HEAD + ", ".join([_INSERT_ROW] * len(bound))
    statements: list[Statement] = [(insert, [value for row in bound for value in row])]
    return [*statements, outbox.add_statement(entries)], written


def text_size(creations: Sequence[Creation]) -> int:
    """Roughly the characters of the creations' rows, as values in SQL text (escaping
    aside): bodies, subject, addresses, headers, metadata, and 400 for the rest."""
    size = 0
    for creation in creations:
        for item in creation.items:
            size += 400 + len(item.subject) + len(item.text or "") + len(item.html or "")
            size += sum(len(address) + 4 for address in (*item.to, *item.cc, *item.bcc))
            size += sum(len(name) + len(value) + 6 for name, value in item.headers.items())
            size += sum(len(str(k)) + len(str(v)) + 6 for k, v in item.metadata.items())
    return size


def _bind(
    creation: Creation, bound: list[tuple[Any, ...]], entries: list[outbox.Entry]
) -> list[dict[str, Any]]:
    """``creation``'s emails: their INSERT parameters and outbox entries appended to
    ``bound`` and ``entries``; their columns returned."""
    owner, now = creation.owner, creation.now
    rows: list[dict[str, Any]] = []
    now_text = db_time(now)
    for item in creation.items:
        email_id = new_id()
        send_at = item.send_at or now
        due_at = max(send_at, now)
        send_text = db_time(send_at)
        message_id = message_id_for(email_id, item.from_addr)
        row = {
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
            "message_id": message_id,
            "attempts": 0,
            "created_at": now,
            "updated_at": now,
        }
        rows.append(row | _UNSET)
        bound.append(
            (
                email_id,
                owner,
                "pending",
                1,
                send_text,
                send_text if due_at is send_at else now_text,
                item.from_addr,
                item.reply_to,
                json_text(item.to),
                json_text(item.cc),
                json_text(item.bcc),
                item.subject,
                item.text,
                item.html,
                json_text(item.headers),
                json_text(item.metadata),
                message_id,
                0,
                now_text,
                now_text,
            )
        )
        entries.append(outbox.Entry(email_id, 1, due_at))
    return rows


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
