"""The outbox: rows that say "publish (email_id, version) at fire_at".

A row is *due* when its ``available_at`` has come and it is not published. Claiming a
row moves ``available_at`` forward by the lease: if the claiming relay dies, the row is
simply due again when the lease runs out, and another relay publishes it. Only a
publisher confirm lets a relay mark a row published.

None of these functions commit: they run inside the caller's unit of work.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from services.core.schema import db_time, emails, outbox


@dataclass(frozen=True, slots=True)
class OutboxRow:
    id: int
    email_id: str
    version: int
    fire_at: datetime


@dataclass(frozen=True, slots=True)
class Entry:
    """One outbox row to write."""

    email_id: str
    version: int
    fire_at: datetime


# Driver SQL, like every statement written once per email (see emails.create_many).
_ADD_HEAD = "INSERT INTO outbox (email_id, version, fire_at, available_at) VALUES "
_ADD_ROW = "(%s, %s, %s, %s)"
_ADD = _ADD_HEAD + _ADD_ROW


def add(conn: Connection, entries: Sequence[Entry]) -> None:
    if entries:
        conn.exec_driver_sql(_ADD, _bound(entries))


def add_statement(entries: Sequence[Entry]) -> tuple[str, list[Any]]:
    """``add`` as one statement, for ``KeptConnection.commit`` (``entries`` not empty)."""
    rows = ", ".join([_ADD_ROW] * len(entries))
    return _ADD_HEAD + rows, [value for row in _bound(entries) for value in row]


def _bound(entries: Sequence[Entry]) -> list[tuple[str, int, str | None, str | None]]:
    rows = []
    for e in entries:
        fire_at = db_time(e.fire_at)
        rows.append((e.email_id, e.version, fire_at, fire_at))
    return rows


class ScanWindow:
    """Where a relay's next claim starts looking: the guard against InnoDB purge lag.

    Publishing a row turns its ``due_at`` to NULL, which leaves a delete-marked entry at
    the old value in the ``due_at`` index until InnoDB purges it - and purge waits for
    the oldest open snapshot. A claim scanning ``due_at <= horizon`` from the start of
    the index walks every such entry: 50,000 of them after a drain cost 48 ms per empty
    poll instead of 1 ms while another session held a snapshot.

    Every write gives a row a ``due_at`` no earlier than the writer's clock (a new email:
    ``max(send_at, now)``; a lease, a retry, a back-off: later still). So once a claim
    has taken everything due by its horizon, the next one may start at that claim's
    ``now`` minus ``margin`` - the margin covers writes that were in flight during the
    claim and a little clock skew. Anything below the floor that the rule misses (a
    claim rolled back by a crashed relay, a writer's clock far behind the database, a
    transaction held for seconds) is found by a full scan every ``full_scan_seconds``.
    """

    def __init__(
        self, margin: timedelta = timedelta(seconds=2), full_scan_seconds: float = 5.0
    ) -> None:
        self._margin = margin
        self._full_scan_seconds = full_scan_seconds
        self._floor: datetime | None = None
        self._last_full_scan = float("-inf")

    def floor(self) -> datetime | None:
        """The lower bound for the next claim; None: scan from the start of the index."""
        if time.monotonic() - self._last_full_scan >= self._full_scan_seconds:
            return None
        return self._floor

    def scanned(self, floor: datetime | None, now: datetime, *, complete: bool) -> None:
        """A claim from ``floor`` at database time ``now`` committed; ``complete``: it
        took every row due by its horizon (fewer rows than its limit)."""
        if floor is None:
            self._last_full_scan = time.monotonic()
        if complete:
            self._floor = now - self._margin


# A claim's and a mark's statements run once per lot of up to RELAY_BATCH_SIZE rows, but
# their work is per row: driver SQL, like every statement written once per email, for
# SQLAlchemy's per-row result processing and expanding IN-list rendering cost the relay's
# claim more than its own Python. An id list is bound as a tuple: PyMySQL writes (1,2,3).
_CLAIM_SELECT = (
    "SELECT id, email_id, version, fire_at FROM outbox WHERE {due}"
    " ORDER BY due_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED"
)
_CLAIM = _CLAIM_SELECT.format(due="due_at <= %(horizon)s")
_CLAIM_FROM = _CLAIM_SELECT.format(due="due_at >= %(floor)s AND due_at <= %(horizon)s")
_LEASE = (
    "UPDATE outbox SET available_at = %(lease_until)s, claimed_by = %(claimed_by)s,"
    " publish_attempts = publish_attempts + 1 WHERE id IN %(ids)s"
)
_MARK = (
    "UPDATE outbox SET published_at = %(now)s, last_error = NULL"
    " WHERE id IN %(ids)s AND published_at IS NULL"
)
_QUEUED = (
    "UPDATE emails, outbox SET emails.status = 'queued', emails.updated_at = %(now)s"
    " WHERE emails.id = outbox.email_id AND emails.version = outbox.version"
    " AND emails.status = 'pending' AND outbox.id IN %(ids)s"
)


def claim_due(
    conn: Connection,
    *,
    horizon: datetime,
    limit: int,
    lease_until: datetime,
    claimed_by: str,
    floor: datetime | None = None,
) -> list[OutboxRow]:
    """Lock and lease up to ``limit`` rows due by ``horizon`` (and not before ``floor``,
    see ``ScanWindow``), earliest first.

    ``SKIP LOCKED`` lets several relays claim side by side without waiting on each
    other. Rows are leased, not published: the caller publishes them at ``fire_at``.
    """
    bound = {"horizon": db_time(horizon), "limit": limit, "floor": db_time(floor)}
    rows = conn.exec_driver_sql(_CLAIM if floor is None else _CLAIM_FROM, bound).all()
    if not rows:
        return []
    conn.exec_driver_sql(
        _LEASE,
        {
            "lease_until": db_time(lease_until),
            "claimed_by": claimed_by,
            "ids": tuple(r[0] for r in rows),
        },
    )
    return [OutboxRow(r[0], r[1], r[2], r[3].replace(tzinfo=UTC)) for r in rows]


def mark_published(conn: Connection, ids: Iterable[int], now: datetime) -> int:
    """Confirmed by the broker: flag the rows, and move their emails pending -> queued.

    Rows deleted meanwhile (a cancel or reschedule) are simply not there any more; an
    email whose version moved on stays as it is.
    """
    id_list = tuple(ids)
    if not id_list:
        return 0
    bound = {"now": db_time(now), "ids": id_list}
    marked = conn.exec_driver_sql(_MARK, bound).rowcount
    conn.exec_driver_sql(_QUEUED, bound)
    return int(marked)


def release(conn: Connection, ids: Iterable[int], *, available_at: datetime, error: str) -> None:
    """Not published (nack, return, broker gone): due again at ``available_at``.

    The reason also goes to the emails still waiting for these rows, so that an operator
    sees in the API why an email is late ("publish failed: ...").
    """
    id_list = list(ids)
    if not id_list:
        return
    conn.execute(
        outbox.update()
        .where(outbox.c.id.in_(id_list), outbox.c.published_at.is_(None))
        .values(available_at=available_at, claimed_by=None, last_error=error[:1000])
    )
    conn.execute(
        emails.update()
        .where(
            emails.c.id == outbox.c.email_id,
            emails.c.version == outbox.c.version,
            emails.c.status == "pending",
            outbox.c.id.in_(id_list),
        )
        .values(last_error=f"publish failed, retrying: {error}"[:2000])
    )


_DISCARD_PENDING = outbox.delete().where(
    outbox.c.email_id == sa.bindparam("b_email_id"), outbox.c.published_at.is_(None)
)


def discard_pending(conn: Connection, email_id: str) -> None:
    """Drop every unpublished row of an email (it was cancelled or rescheduled)."""
    conn.execute(_DISCARD_PENDING, {"b_email_id": email_id})


# A worker's record is one script of driver SQL, sent with its COMMIT (delivery.record):
# these are its outbox statements, each with its parameters (named ``o_...``).


def discard_versions(versions: Sequence[tuple[str, int]]) -> tuple[str | None, dict[str, Any]]:
    """The statement dropping the unpublished rows of these (email id, version) pairs:
    the recovery rows of the emails a worker recorded (one, or a batch's worth)."""
    if not versions:
        return None, {}
    # One pair - the worker's most common call - by equality: MariaDB does not
    # range-scan a row constructor with a single pair, it scans the table.
    if len(versions) == 1:
        ((email_id, version),) = versions
        return (
            "DELETE FROM outbox WHERE email_id = %(o_email_id)s AND version = %(o_version)s"
            " AND published_at IS NULL",
            {"o_email_id": email_id, "o_version": version},
        )
    params: dict[str, Any] = {}
    for index, (email_id, version) in enumerate(versions):
        params[f"o_email_id{index}"] = email_id
        params[f"o_version{index}"] = version
    pairs = ", ".join(f"(%(o_email_id{i})s, %(o_version{i})s)" for i in range(len(versions)))
    return (  # a range scan of the email_id index, MySQL and MariaDB
        f"DELETE FROM outbox WHERE (email_id, version) IN ({pairs})"  # noqa: S608 (placeholders)
        " AND published_at IS NULL",
        params,
    )


def add_if_owned(entry: Entry) -> tuple[str, dict[str, Any]]:
    """The statement writing ``entry`` if the record's UPDATE found the email it claimed
    (``@owned``, set by the statement before it in ``delivery.record``)."""
    return (
        "INSERT INTO outbox (email_id, version, fire_at, available_at)"
        " SELECT %(o_add_email_id)s, %(o_add_version)s, %(o_add_fire_at)s, %(o_add_fire_at)s"
        " FROM DUAL WHERE @owned > 0",
        {
            "o_add_email_id": entry.email_id,
            "o_add_version": entry.version,
            "o_add_fire_at": db_time(entry.fire_at),
        },
    )


def publish_attempts(conn: Connection, ids: Iterable[int]) -> dict[int, int]:
    """How many times each row was claimed: the exponent of its back-off after a failure."""
    id_list = list(ids)
    if not id_list:
        return {}
    rows = conn.execute(
        sa.select(outbox.c.id, outbox.c.publish_attempts).where(outbox.c.id.in_(id_list))
    )
    return {r.id: r.publish_attempts for r in rows}
