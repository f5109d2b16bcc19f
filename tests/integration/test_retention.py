"""Housekeeping deletes what is past keeping, in bounded batches, and nothing else."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from services.core import retention
from services.core.schema import idempotency_keys, outbox

OWNER = "e" * 32


def count(engine: Engine, table: sa.Table) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())


def test_purge_keeps_recent_and_unpublished_rows(db: Engine) -> None:
    now = datetime.now(UTC)
    old = now - timedelta(days=3)
    with db.begin() as conn:
        conn.execute(
            idempotency_keys.insert(),
            [
                {
                    "owner": OWNER,
                    "key_hash": f"{i:064x}",
                    "request_hash": "0" * 64,
                    "email_ids": [],
                    "created_at": old if i < 7 else now - timedelta(hours=25),
                }
                for i in range(10)
            ],
        )
        rows = [
            # (published_at, fire_at): old published, recent published, never published
            *[(old, old)] * 5,
            (now - timedelta(hours=1), now),
            (None, old),
        ]
        conn.execute(
            outbox.insert(),
            [
                {
                    "email_id": f"{i:036d}",
                    "version": 1,
                    "fire_at": fire_at,
                    "available_at": fire_at,
                    "published_at": published_at,
                }
                for i, (published_at, fire_at) in enumerate(rows)
            ],
        )
    assert retention.purge(db, batch=3) == {"outbox": 5, "idempotency_keys": 7}
    assert count(db, idempotency_keys) == 3  # 25 h old keys stay: >= 24 h promised
    with db.connect() as conn:
        left = conn.execute(sa.select(outbox.c.published_at)).scalars().all()
    assert sorted(left, key=lambda v: v or now) == sorted(
        [now - timedelta(hours=1), None], key=lambda v: v or now
    )
    assert retention.purge(db, batch=3) == {"outbox": 0, "idempotency_keys": 0}
