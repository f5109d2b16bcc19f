"""What is deleted, and when: the relay's housekeeping.

- published outbox rows, a day after publishing (the emails and attempts stay);
- ``Idempotency-Key`` rows, two days after creation (the contract promises >= 24 h).

Each purge deletes a bounded batch per short transaction, so that housekeeping never
holds many locks or a long transaction (which would stall InnoDB's purge of the very
index entries the relay's due-row scan walks over).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from services.core.db import db_now, transaction
from services.core.schema import idempotency_keys, outbox

log = logging.getLogger(__name__)

KEEP_PUBLISHED_OUTBOX = timedelta(days=1)
KEEP_IDEMPOTENCY_KEYS = timedelta(days=2)
BATCH = 5000
MAX_BATCHES = 20  # per table and run; the next run continues


def purge_published_outbox(conn: Connection, *, before: datetime, limit: int = BATCH) -> int:
    ids = (
        conn.execute(
            sa.select(outbox.c.id)
            .where(outbox.c.published_at < before)
            .order_by(outbox.c.published_at)
            .limit(limit)
        )
        .scalars()
        .all()
    )
    if not ids:
        return 0
    return int(conn.execute(outbox.delete().where(outbox.c.id.in_(ids))).rowcount)


def purge_idempotency_keys(conn: Connection, *, before: datetime, limit: int = BATCH) -> int:
    oldest = conn.execute(
        sa.select(idempotency_keys.c.owner, idempotency_keys.c.key_hash)
        .where(idempotency_keys.c.created_at < before)
        .order_by(idempotency_keys.c.created_at)
        .limit(limit)
    ).all()
    if not oldest:
        return 0
    return int(
        conn.execute(
            idempotency_keys.delete().where(
                sa.tuple_(idempotency_keys.c.owner, idempotency_keys.c.key_hash).in_(oldest)
            )
        ).rowcount
    )


def purge(engine: Engine, *, batch: int = BATCH) -> dict[str, int]:
    """One housekeeping round over both tables; returns rows deleted per table."""
    deleted = {
        "outbox": _purge_table(engine, purge_published_outbox, KEEP_PUBLISHED_OUTBOX, batch),
        "idempotency_keys": _purge_table(
            engine, purge_idempotency_keys, KEEP_IDEMPOTENCY_KEYS, batch
        ),
    }
    if any(deleted.values()):
        log.info("housekeeping deleted %s", ", ".join(f"{n} {t}" for t, n in deleted.items()))
    return deleted


def _purge_table(engine: Engine, job: Callable[..., int], keep: timedelta, batch: int) -> int:
    def one_batch(conn: Connection) -> int:
        return job(conn, before=db_now(conn) - keep, limit=batch)

    total = 0
    for _ in range(MAX_BATCHES):
        count = transaction(engine, one_batch)
        total += count
        if count < batch:
            break
    return total
