"""The engine returns pooled connections clean, without a rollback after every commit.

``create_db_engine`` turns off the pool's rollback-on-return (a round trip after every
unit of work) because SQLAlchemy's ``Connection`` ends each transaction it began; it
rolls back only a connection an error left in doubt. These tests hold both halves
against the server's own view: InnoDB's transaction list and the session's counters.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from services.core.db import (
    KeptConnection,
    create_db_engine,
    is_unavailable,
    transaction,
    unit_of_work,
)
from services.core.schema import attempts


@pytest.fixture
def one_connection(database_url: str, db: Engine) -> Iterator[Engine]:
    """An engine whose pool holds exactly one connection, so every checkout is the same."""
    engine = create_db_engine(database_url, pool_size=1)
    engine.pool._max_overflow = 0  # type: ignore[attr-defined]
    yield engine
    engine.dispose()


def _session(conn: Connection) -> tuple[int, int]:
    """(CONNECTION_ID(), this session's ROLLBACK count so far)."""
    conn_id = conn.execute(sa.text("SELECT CONNECTION_ID()")).scalar_one()
    rollbacks = conn.execute(sa.text("SHOW SESSION STATUS LIKE 'Com_rollback'")).one()[1]
    return int(conn_id), int(rollbacks)


def _open_transactions(db: Engine, conn_id: int) -> int:
    # InnoDB answers INFORMATION_SCHEMA.INNODB_TRX from a cache it refreshes only when
    # more than 0.1 s have passed since the last read.
    time.sleep(0.15)
    with db.connect() as conn:
        return int(
            conn.execute(
                sa.text(
                    "SELECT COUNT(*) FROM information_schema.innodb_trx"
                    " WHERE trx_mysql_thread_id = :id"
                ),
                {"id": conn_id},
            ).scalar_one()
        )


def _attempt(email_id: str) -> dict[str, object]:
    return {
        "email_id": email_id,
        "number": 1,
        "started_at": sa.func.utc_timestamp(),
        "finished_at": sa.func.utc_timestamp(),
        "outcome": "sent",
    }


def _rows(db: Engine) -> int:
    with db.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(attempts)).scalar_one())


def test_a_committed_unit_of_work_returns_its_connection_without_a_rollback(
    one_connection: Engine, db: Engine
) -> None:
    with one_connection.connect() as conn:
        conn_id, before = _session(conn)
    for n in range(3):
        with unit_of_work(one_connection) as conn:
            conn.execute(attempts.insert().values(**_attempt(f"committed-{n}")))
    with one_connection.connect() as conn:
        same_id, after = _session(conn)
    assert same_id == conn_id  # the same pooled connection all along
    # The only ROLLBACK is the one closing the first read-only checkout.
    assert after - before == 1
    assert _rows(db) == 3
    assert _open_transactions(db, conn_id) == 0


def test_a_connection_closed_mid_transaction_comes_back_rolled_back(
    one_connection: Engine, db: Engine
) -> None:
    with one_connection.connect() as conn:
        conn_id, _ = _session(conn)
        conn.execute(attempts.insert().values(**_attempt("never-committed")))
        assert _open_transactions(db, conn_id) == 1
    assert _open_transactions(db, conn_id) == 0
    assert _rows(db) == 0


def test_an_error_inside_a_unit_of_work_leaves_nothing_open(
    one_connection: Engine, db: Engine
) -> None:
    with one_connection.connect() as conn:
        conn_id, _ = _session(conn)

    def insert_twice() -> None:
        with unit_of_work(one_connection) as conn:
            conn.execute(attempts.insert().values(**_attempt("twice")))
            conn.execute(attempts.insert().values(**_attempt("twice")))  # (email_id, number)

    with pytest.raises(sa.exc.IntegrityError):
        insert_twice()
    assert _open_transactions(db, conn_id) == 0
    assert _rows(db) == 0
    with unit_of_work(one_connection) as conn:  # and the connection is fit for the next one
        conn.execute(attempts.insert().values(**_attempt("after")))
    assert _rows(db) == 1


def test_a_connection_an_error_left_in_doubt_is_rolled_back_on_return(
    one_connection: Engine, db: Engine
) -> None:
    """A failed statement whose caller swallows the error and closes the connection: the
    ``Connection`` rolls back, and the pool, told of the error, rolls back once more."""
    with one_connection.connect() as conn:
        conn_id, before = _session(conn)
        conn.execute(attempts.insert().values(**_attempt("doubt")))
        with pytest.raises(sa.exc.IntegrityError):
            conn.execute(attempts.insert().values(**_attempt("doubt")))
    with one_connection.connect() as conn:
        same_id, after = _session(conn)
    assert same_id == conn_id
    assert after - before == 2
    assert _open_transactions(db, conn_id) == 0
    assert _rows(db) == 0


# --- KeptConnection: one connection for a run of units of work ---------------------------


def test_a_kept_connection_serves_each_unit_of_work_until_released(
    one_connection: Engine, db: Engine
) -> None:
    kept = KeptConnection(one_connection)
    ids = set()
    for n in range(3):
        with kept.unit_of_work() as conn:
            ids.add(_session(conn)[0])
            conn.execute(attempts.insert().values(**_attempt(f"kept-{n}")))
            assert one_connection.pool.checkedout() == 1  # type: ignore[attr-defined]
        assert one_connection.pool.checkedout() == 1  # type: ignore[attr-defined]
    (conn_id,) = ids
    assert _rows(db) == 3  # each unit committed as it ended
    assert _open_transactions(db, conn_id) == 0
    kept.release()
    assert one_connection.pool.checkedout() == 0  # type: ignore[attr-defined]
    kept.release()  # twice is harmless


def test_a_kept_connection_is_dropped_after_an_error_and_replaced(
    one_connection: Engine, db: Engine
) -> None:
    """A unit of work that fails rolls back and gives its connection up; the next one
    runs on a fresh connection - also when the server killed the old one meanwhile."""
    kept = KeptConnection(one_connection)
    seen: list[int] = []

    def insert_twice(conn: Connection) -> None:
        seen.append(_session(conn)[0])
        conn.execute(attempts.insert().values(**_attempt("twice")))
        conn.execute(attempts.insert().values(**_attempt("twice")))

    with pytest.raises(sa.exc.IntegrityError):
        transaction(kept, insert_twice)
    (conn_id,) = seen
    assert one_connection.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert _rows(db) == 0
    assert _open_transactions(db, conn_id) == 0

    with kept.unit_of_work() as conn:
        conn_id, _ = _session(conn)
    with db.connect() as admin:
        admin.execute(sa.text(f"KILL CONNECTION {conn_id}"))
    with pytest.raises(sa.exc.OperationalError) as failed:
        transaction(kept, lambda conn: conn.execute(attempts.insert().values(**_attempt("x"))))
    assert is_unavailable(failed.value)
    assert transaction(kept, lambda conn: _session(conn)[0]) != conn_id
    with kept.unit_of_work() as conn:
        conn.execute(attempts.insert().values(**_attempt("after")))
    kept.release()
    assert _rows(db) == 1
