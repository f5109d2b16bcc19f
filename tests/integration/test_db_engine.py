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
    Statement,
    create_db_engine,
    is_unavailable,
    unit_of_work,
)
from services.core.schema import attempts
from tests.support.locks import deadlocks, until_a_lock_wait
from tests.support.queries import QueryLog


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


# --- KeptConnection: one connection, a transaction per round trip ------------------------

_ATTEMPT = (
    "INSERT INTO attempts (email_id, number, started_at, finished_at, outcome)"
    " VALUES (%s, 1, UTC_TIMESTAMP(), UTC_TIMESTAMP(), 'sent')"
)


def _two_attempts(first: str, second: str) -> list[Statement]:
    return [(_ATTEMPT, (first,)), (_ATTEMPT, (second,))]


@pytest.fixture
def one_multi(database_url: str, db: Engine) -> Iterator[tuple[Engine, QueryLog]]:
    """A multi-statement engine with one pooled connection, and what it sends MySQL."""
    engine = create_db_engine(database_url, pool_size=1, multi_statements=True)
    engine.pool._max_overflow = 0  # type: ignore[attr-defined]
    with QueryLog(engine) as log:
        yield engine, log
    engine.dispose()


def test_a_kept_connection_commits_each_transaction_in_one_round_trip_until_released(
    one_multi: tuple[Engine, QueryLog], db: Engine
) -> None:
    engine, log = one_multi
    kept = KeptConnection(engine)
    for n in range(3):
        before = len(log.queries)
        assert kept.commit(_two_attempts(f"a-{n}", f"b-{n}")) == 1
        assert len(log.queries) - before == 1  # both statements and the COMMIT: one query
        assert _rows(db) == 2 * (n + 1)  # committed, seen from another connection
    before = len(log.queries)
    assert kept.commit([]) == 0  # nothing to write: the COMMIT alone, harmless
    assert len(log.queries) - before == 1
    (conn_id,) = log.checkouts  # one checkout served them all
    assert _open_transactions(db, conn_id) == 0
    assert engine.pool.checkedout() == 1  # type: ignore[attr-defined]
    kept.release()
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    kept.release()  # twice is harmless


def test_a_kept_connection_is_dropped_after_an_error_and_replaced(
    one_multi: tuple[Engine, QueryLog], db: Engine
) -> None:
    """A transaction whose second statement fails leaves nothing of its first and gives
    its connection up; the next one runs on a fresh connection - also when the server
    killed the old one meanwhile. The errors are SQLAlchemy's, read as everywhere else."""
    engine, log = one_multi
    checkouts = log.checkouts
    kept = KeptConnection(engine)
    with pytest.raises(sa.exc.IntegrityError) as duplicate:
        kept.commit(_two_attempts("twice", "twice"))
    assert not is_unavailable(duplicate.value)
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert _rows(db) == 0
    assert _open_transactions(db, checkouts[-1]) == 0

    assert kept.commit(_two_attempts("a", "b")) == 1
    assert len(set(checkouts)) == 2
    with db.connect() as admin:
        admin.execute(sa.text(f"KILL CONNECTION {checkouts[-1]}"))
    with pytest.raises(sa.exc.OperationalError) as lost:
        kept.commit(_two_attempts("c", "d"))
    assert is_unavailable(lost.value)
    assert kept.commit(_two_attempts("e", "f")) == 1
    assert len(set(checkouts)) == 3
    kept.release()
    assert _rows(db) == 4


def test_an_engine_without_multi_statements_runs_one_statement_a_query(
    one_connection: Engine, db: Engine
) -> None:
    """Only the worker's engine lets a query hold several statements: elsewhere a second
    statement, however it got into the text, is a syntax error and nothing runs."""
    kept = KeptConnection(one_connection)
    with pytest.raises(sa.exc.ProgrammingError):
        kept.commit(_two_attempts("a", "b"))
    kept.release()
    assert _rows(db) == 0


def test_a_kept_connection_idle_too_long_is_given_back_and_a_checked_one_taken(
    one_multi: tuple[Engine, QueryLog], db: Engine
) -> None:
    """The server (``wait_timeout``) or a firewall may close a connection kept idle: one
    idle past ``max_idle`` goes back to the pool, whose pre-ping finds it dead."""
    engine, log = one_multi
    kept = KeptConnection(engine, max_idle=0.2)
    assert kept.commit(_two_attempts("a", "b")) == 1
    with db.connect() as admin:
        admin.execute(sa.text(f"KILL CONNECTION {log.checkouts[-1]}"))
    time.sleep(0.3)
    assert kept.commit(_two_attempts("c", "d")) == 1  # not an error: a fresh connection
    assert len(set(log.checkouts)) == 2
    kept.release()
    assert _rows(db) == 4


def test_a_sent_transaction_commits_while_the_caller_works_and_is_read_after(
    one_multi: tuple[Engine, QueryLog], db: Engine
) -> None:
    """``send`` is ``commit`` in two halves: the server runs and commits the query while
    the caller does something else, and ``rowcount`` then reads the answer - one query,
    on a connection left ready for the next."""
    engine, log = one_multi
    kept = KeptConnection(engine)
    before = len(log.queries)
    sent = kept.send(_two_attempts("a", "b"))
    deadline = time.monotonic() + 5
    while _rows(db) < 2 and time.monotonic() < deadline:  # committed, nothing read yet
        time.sleep(0.01)
    assert _rows(db) == 2
    assert sent.rowcount() == 1
    assert len(log.queries) - before == 1
    assert kept.commit(_two_attempts("c", "d")) == 1
    assert len(set(log.checkouts)) == 1  # the same connection throughout
    kept.release()
    assert _rows(db) == 4


def test_a_sent_transactions_error_comes_when_it_is_read(
    one_multi: tuple[Engine, QueryLog], db: Engine
) -> None:
    engine, log = one_multi
    kept = KeptConnection(engine)
    sent = kept.send(_two_attempts("twice", "twice"))  # no error yet: nothing read
    with pytest.raises(sa.exc.IntegrityError) as duplicate:
        sent.rowcount()
    assert not is_unavailable(duplicate.value)
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert _rows(db) == 0
    assert kept.send(_two_attempts("a", "b")).rowcount() == 1  # on a fresh connection
    assert len(set(log.checkouts)) == 2
    kept.release()


def test_a_sent_transaction_left_unread_never_reaches_the_pool(
    one_multi: tuple[Engine, QueryLog], db: Engine
) -> None:
    """Its answers would meet the pool's next user: the connection is dropped instead,
    whether released or replaced by the next transaction."""
    engine, log = one_multi
    kept = KeptConnection(engine)
    kept.send(_two_attempts("a", "b"))
    kept.release()
    with engine.connect() as conn:  # the pool's next user reads its own answer
        assert conn.exec_driver_sql("SELECT 7").scalar() == 7
    kept.send(_two_attempts("c", "d"))  # on the connection that answered 7, given back
    assert kept.commit(_two_attempts("e", "f")) == 1  # not on the unread one
    kept.release()
    first, seven, sent, fresh = log.checkouts
    assert seven == sent
    assert len({first, seven, fresh}) == 3
    with db.connect() as conn:
        conn.exec_driver_sql("SELECT SLEEP(0.2)")  # the dropped ones' queries finish
    assert _rows(db) == 6  # (sent whole, they ran to their COMMIT regardless)


def test_a_transaction_that_could_not_be_sent_fails_when_it_is_read() -> None:
    """The worker sends a record and reads it after its next SMTP exchange: a database it
    cannot reach shows at the read, as SQLAlchemy's error, read as unavailable."""
    engine = create_db_engine(
        "mysql+pymysql://root@127.0.0.1:1/nothing", pre_ping=False, multi_statements=True
    )
    try:
        sent = KeptConnection(engine).send(_two_attempts("a", "b"))  # no error yet
        with pytest.raises(sa.exc.OperationalError) as refused:
            sent.rowcount()
        assert is_unavailable(refused.value)
    finally:
        engine.dispose()


def test_a_pool_without_a_free_connection_shows_when_the_send_is_read(
    one_multi: tuple[Engine, QueryLog],
) -> None:
    """Every connection taken (MySQL hanging, say): the pool's timeout, too, comes at the
    read - where the worker's record retries look for it - not out of the send."""
    engine, _log = one_multi
    engine.pool._timeout = 0.2  # type: ignore[attr-defined]
    with engine.connect():  # the pool's one connection
        sent = KeptConnection(engine).send(_two_attempts("a", "b"))
        with pytest.raises(sa.exc.TimeoutError) as exhausted:
            sent.rowcount()
    assert is_unavailable(exhausted.value)


def test_a_stale_read_leaves_the_kept_connections_next_transaction_alone(
    one_multi: tuple[Engine, QueryLog], db: Engine
) -> None:
    """Read out of turn - after a later send replaced its connection - a sent transaction
    fails on its own dropped connection, not on the one now kept."""
    engine, log = one_multi
    kept = KeptConnection(engine)
    stale = kept.send(_two_attempts("a", "b"))
    fresh = kept.send(_two_attempts("c", "d"))  # the unread one's connection is dropped
    with pytest.raises(Exception):  # noqa: B017, PT011 (whatever a closed socket raises)
        stale.rowcount()
    assert fresh.rowcount() == 1
    kept.release()
    assert len(set(log.checkouts)) == 2


def test_a_sent_transaction_chosen_as_a_deadlocks_victim_is_sent_again(
    one_multi: tuple[Engine, QueryLog], db: Engine
) -> None:
    """As ``commit`` retries a deadlock, so does a sent transaction when it is read."""
    engine, _log = one_multi
    kept = KeptConnection(engine)
    assert kept.commit([(_ATTEMPT, (f"row-{n}",)) for n in range(5)]) == 1
    with db.connect() as conn:
        ids = [row[0] for row in conn.exec_driver_sql("SELECT id FROM attempts ORDER BY id")]
    mark = "UPDATE attempts SET error = %s WHERE id = %s"
    before = deadlocks(db)
    with db.connect() as other:
        other.begin()
        for row_id in (*ids[2:], ids[0]):  # the heavier of the two: not the victim
            other.exec_driver_sql(mark, ("other", row_id))
        sent = kept.send([(mark, ("sent", ids[1])), (mark, ("sent", ids[0]))])
        assert until_a_lock_wait(db)  # the sent one waits for the other's first row
        other.exec_driver_sql(mark, ("other", ids[1]))  # ... which now waits for it
        other.commit()
    assert sent.rowcount() == 1  # rolled back as the victim, sent again, committed
    assert deadlocks(db) == before + 1
    with db.connect() as conn:
        errors = dict(conn.exec_driver_sql("SELECT id, error FROM attempts").all())
    assert (errors[ids[0]], errors[ids[1]], errors[ids[2]]) == ("sent", "sent", "other")
    kept.release()
