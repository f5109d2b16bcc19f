"""``Idempotency-Key``: the first request with a key creates, every repeat replays.

Durable and race-free through MySQL alone: the key's row is inserted FIRST in the same
transaction that creates the emails. A concurrent request with the same key blocks on
the primary key until the first one ends; if it committed, the second gets a duplicate
key error (1062) and replays; if it rolled back, the second simply proceeds. A lock
wait that times out (1205) means the first request is still running: 409. A cheap
read-only lookup comes first, so an ordinary replay writes nothing.

Rows are scoped per owner (API key fingerprint) and stored as hashes: the key itself
and the request body are never kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine, Row
from sqlalchemy.exc import DBAPIError

from services.core import emails
from services.core.db import error_code, unit_of_work
from services.core.errors import IdempotencyInFlight, IdempotencyMismatch
from services.core.schema import idempotency_keys

log = logging.getLogger(__name__)

DUPLICATE_KEY = 1062
LOCK_WAIT_TIMEOUT = 1205
DEADLOCK = 1213
_DEADLOCK_ATTEMPTS = 3


@dataclass(frozen=True, slots=True)
class Scope:
    """One idempotent request: whose, which key, and a hash of what was asked."""

    owner: str
    key_hash: str
    request_hash: str

    @classmethod
    def of(cls, owner: str, key: str, route: str, request: Any) -> Scope:
        """``request`` is the validated body as JSON data; ``route`` tells single from batch."""
        canonical = json.dumps(
            {"route": route, "request": request},
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
        )
        return cls(
            owner=owner,
            key_hash=hashlib.sha256(key.encode()).hexdigest(),
            request_hash=hashlib.sha256(canonical.encode()).hexdigest(),
        )


@dataclass(frozen=True, slots=True)
class Outcome:
    rows: Sequence[Mapping[str, Any]]  # emails' columns, as just written or read back
    replayed: bool


def create_once(
    engine: Engine,
    scope: Scope,
    now: datetime,
    work: Callable[[Connection], list[dict[str, Any]]],
) -> Outcome:
    """Run ``work`` (which creates emails and returns them as written) at most once per key.

    Returns the created emails, or on a repeat the emails of the first request as they
    are now. Raises ``IdempotencyMismatch`` for the same key with another request and
    ``IdempotencyInFlight`` while the first request has not finished.
    """
    with engine.connect() as conn:
        stored = _lookup(conn, scope)
        if stored is not None:
            return _replay(conn, scope, stored)
    for attempt in range(1, _DEADLOCK_ATTEMPTS + 1):
        try:
            with unit_of_work(engine) as conn:
                conn.execute(
                    idempotency_keys.insert().values(
                        owner=scope.owner,
                        key_hash=scope.key_hash,
                        request_hash=scope.request_hash,
                        email_ids=[],
                        created_at=now,
                    )
                )
                created = work(conn)
                ids = [row["id"] for row in created]
                conn.execute(idempotency_keys.update().where(*_row_of(scope)).values(email_ids=ids))
                return Outcome(created, replayed=False)
        except DBAPIError as exc:
            code = error_code(exc)
            if code == LOCK_WAIT_TIMEOUT:
                raise IdempotencyInFlight(
                    "a request with this Idempotency-Key is in flight"
                ) from None
            if code == DEADLOCK and attempt < _DEADLOCK_ATTEMPTS:
                # Waiters on a key whose first request rolled back can deadlock each other.
                continue
            if code != DUPLICATE_KEY:
                raise
        with engine.connect() as conn:
            stored = _lookup(conn, scope)
            if stored is not None:
                return _replay(conn, scope, stored)
    # The first request committed, then its row vanished (purged): rare; ask to retry.
    raise IdempotencyInFlight("the Idempotency-Key changed hands meanwhile; retry")


def _row_of(scope: Scope) -> tuple[sa.ColumnElement[bool], ...]:
    return (
        idempotency_keys.c.owner == scope.owner,
        idempotency_keys.c.key_hash == scope.key_hash,
    )


def _lookup(conn: Connection, scope: Scope) -> Row[Any] | None:
    return conn.execute(sa.select(idempotency_keys).where(*_row_of(scope))).first()


def _replay(conn: Connection, scope: Scope, stored: Row[Any]) -> Outcome:
    if stored.request_hash != scope.request_hash:
        raise IdempotencyMismatch("this Idempotency-Key was used with a different request")
    ids: Sequence[str] = stored.email_ids
    return Outcome(
        [dict(r._mapping) for r in emails.get_many(conn, scope.owner, ids)], replayed=True
    )
