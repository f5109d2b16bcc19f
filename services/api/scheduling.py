"""The write side of the API: each call is one transaction, then a best-effort nudge.

Emails and their outbox rows are written in the same unit of work, so a 201 means both
are committed and a failure leaves neither (a create without an Idempotency-Key shares
its transaction with the creates in flight with it: ``services.api.group_commit``).
Only after the commit, when something falls due before the relay's next poll, is the
relay woken through Redis; that wake-up may be lost (Redis down) and the poll still
finds the row.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.engine import Connection, Row
from starlette.concurrency import run_in_threadpool

from services.api.deps import Runtime
from services.api.idempotency import Outcome, Scope, create_once
from services.core import emails
from services.core.db import transaction
from services.core.emails import Creation, NewEmail
from services.core.fastpath import FastPath

log = logging.getLogger(__name__)


async def schedule(
    runtime: Runtime, owner: str, items: Sequence[NewEmail], scope: Scope | None
) -> Outcome:
    """Create ``items`` all or nothing; with a ``scope``, at most once per Idempotency-Key.

    Without one, in a transaction shared with other creates in flight (``GroupCommit``);
    with one, in a transaction of its own, on a request thread.
    """
    creation = Creation(owner, items, datetime.now(UTC))
    if scope is None:
        outcome = Outcome(await runtime.group_commit.create(creation), replayed=False)
    else:
        outcome = await run_in_threadpool(_create_once, runtime, scope, creation)
    if outcome.replayed:
        log.info(
            "idempotent replay of %d email(s) first=%s owner=%s",
            len(outcome.rows),
            outcome.rows[0]["id"] if outcome.rows else "-",
            owner[:8],
        )
    elif len(outcome.rows) == 1:
        log.info("email scheduled id=%s owner=%s", outcome.rows[0]["id"], owner[:8])
    else:
        log.info(
            "batch of %d emails scheduled first=%s last=%s owner=%s",
            len(outcome.rows),
            outcome.rows[0]["id"],
            outcome.rows[-1]["id"],
            owner[:8],
        )
    return outcome


def _create_once(runtime: Runtime, scope: Scope, creation: Creation) -> Outcome:
    def create(conn: Connection) -> list[dict[str, Any]]:
        return emails.create_many(conn, [creation])[0]

    outcome = create_once(runtime.engine, scope, creation.now, create)
    if not outcome.replayed:
        wake_relay_if_due(runtime.fastpath, runtime.settings.relay_poll_interval, [creation])
    return outcome


def cancel(runtime: Runtime, owner: str, email_id: str) -> Row[Any]:
    """Cancel a pending or queued email (a cancelled one stays so); the email afterwards."""
    now = datetime.now(UTC)

    def work(conn: Connection) -> Row[Any]:
        emails.cancel(conn, owner, email_id, now)
        return emails.get(conn, owner, email_id)

    row = transaction(runtime.engine, work)
    log.info("email cancelled id=%s owner=%s", email_id, owner[:8])
    return row


def reschedule(runtime: Runtime, owner: str, email_id: str, send_at: datetime) -> Row[Any]:
    """Move a pending or queued email to ``send_at``; older broker messages become stale."""
    now = datetime.now(UTC)

    def work(conn: Connection) -> Row[Any]:
        emails.reschedule(conn, owner, email_id, send_at, now)
        return emails.get(conn, owner, email_id)

    row = transaction(runtime.engine, work)
    if _due_soon([send_at], now, runtime.settings.relay_poll_interval):
        runtime.fastpath.notify_due()
    log.info(
        "email rescheduled id=%s send_at=%s owner=%s", email_id, send_at.isoformat(), owner[:8]
    )
    return row


def wake_relay_if_due(
    fastpath: FastPath, poll_interval: float, creations: Sequence[Creation]
) -> None:
    """After a commit: wake the relay if a new email falls due before its next poll."""
    if any(_due_soon([item.send_at for item in c.items], c.now, poll_interval) for c in creations):
        fastpath.notify_due()


def _due_soon(send_times: Sequence[datetime | None], now: datetime, poll_interval: float) -> bool:
    horizon = now + timedelta(seconds=poll_interval)
    return any(when is None or when <= horizon for when in send_times)
