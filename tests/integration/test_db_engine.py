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

from services.core.db import create_db_engine, unit_of_work
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
