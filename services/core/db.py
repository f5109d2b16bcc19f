"""Engine, unit of work and database clock.

A unit of work is one transaction: ``with unit_of_work(engine) as conn`` commits when the
block ends normally and rolls back otherwise. Functions that take a ``Connection`` never
commit; whoever opened the unit of work decides. Deadlocks and lock-wait timeouts are
normal events under ``SKIP LOCKED`` claiming: ``transaction`` retries them outside.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, TypeVar

import sqlalchemy as sa
from pymysql.constants import CLIENT, COMMAND
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.engine.url import make_url
from sqlalchemy.exc import DBAPIError, OperationalError, SQLAlchemyError
from sqlalchemy.pool import PoolResetState

log = logging.getLogger(__name__)

T = TypeVar("T")
# One statement of driver SQL and its parameters: ``%(name)s`` placeholders and a mapping,
# or ``%s`` and a sequence.
Statement = tuple[str, Mapping[str, Any] | Sequence[Any]]

# MySQL/MariaDB error codes that mean "try again": deadlock, lock wait timeout,
# and the client-side "server gone / cannot connect" family.
RETRYABLE_CODES = frozenset({1205, 1213})
CONNECTION_CODES = frozenset({2003, 2006, 2013, 2014, 2055, 1927, 1053, 1077, 1040})


def create_db_engine(
    url: str,
    *,
    pool_size: int = 5,
    statement_timeout: int = 30,
    pre_ping: bool = True,
    multi_statements: bool = False,
) -> Engine:
    """An engine for MySQL 8 / MariaDB: UTC session, READ COMMITTED, bounded timeouts.

    READ COMMITTED because concurrent ``SKIP LOCKED`` claimers deadlock under REPEATABLE
    READ's gap locks; nothing here relies on repeatable snapshots. ``pre_ping`` costs a
    round trip per checkout; the relay and the worker, which retry any transaction that
    meets a dead connection anyway, go without it. ``multi_statements`` lets one query
    hold several statements, which ``KeptConnection.commit`` needs; only the worker's
    engine and the API's group-commit writer have it (elsewhere a query is one
    statement, whatever its text).
    """
    # SQLAlchemy's MySQL dialects always ask for FOUND_ROWS (an UPDATE's rowcount counts
    # the rows it matched); a client_flag given here replaces theirs, so it says so too.
    flags = {"client_flag": CLIENT.FOUND_ROWS | CLIENT.MULTI_STATEMENTS} if multi_statements else {}
    engine = sa.create_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=pre_ping,
        pool_recycle=1800,
        pool_timeout=10,
        pool_reset_on_return=None,  # see _reset_after_errors
        isolation_level="READ COMMITTED",
        connect_args={
            "connect_timeout": 5,
            "read_timeout": statement_timeout,
            "write_timeout": statement_timeout,
            "init_command": "SET time_zone = '+00:00', innodb_lock_wait_timeout = 10",
            "charset": "utf8mb4",
            **flags,
        },
    )
    _reset_after_errors(engine)
    return engine


def _reset_after_errors(engine: Engine) -> None:
    """Roll a pooled connection back on its return only when an error left it in doubt.

    SQLAlchemy's ``Connection`` ends every transaction it began - commit, or rollback on
    close - so a connection that saw no error comes back clean, and the pool's default
    rollback-on-return is one more round trip after every unit of work (a fifth of a
    worker's record transaction). The code here never uses raw DBAPI connections.
    """

    @sa.event.listens_for(engine, "handle_error")
    def _in_doubt(context: sa.engine.ExceptionContext) -> None:
        if context.connection is not None and not context.connection.invalidated:
            context.connection.info["in_doubt"] = True

    @sa.event.listens_for(engine, "reset")
    def _reset(dbapi_connection: Any, record: Any, state: PoolResetState) -> None:
        if record.info.pop("in_doubt", False) and not state.terminate_only:
            dbapi_connection.rollback()


@contextmanager
def unit_of_work(engine: Engine) -> Iterator[Connection]:
    """One transaction: committed if the block returns, rolled back if it raises."""
    with engine.begin() as conn:
        yield conn


class KeptConnection:
    """One connection kept for a run of short transactions - a worker's records, one per
    email sent - each sent together with its COMMIT: one round trip per transaction
    instead of one per statement and one more for the COMMIT. The engine must have been
    made with ``multi_statements``. ``release`` gives the connection back to the pool; an
    error drops it (the server rolls back what ran of the transaction), so the next
    transaction starts on a fresh connection. So does one after ``max_idle`` seconds
    without any: a connection kept idle may have been closed by the server
    (``wait_timeout``) or by a firewall, and the pool checks one it hands out (pre-ping)
    or recycles it. Not for concurrent use: one thread at a time.
    """

    def __init__(self, engine: Engine, *, max_idle: float = 30.0) -> None:
        self._engine = engine
        self._max_idle = max_idle
        self._conn: Connection | None = None
        self._used = 0.0  # time.monotonic() of the last transaction
        self._unread = False  # a transaction was sent and its answers not read yet

    def commit(
        self, statements: Sequence[Statement], *, attempts: int = 5, rowcount_of: int = 0
    ) -> int:
        """Run ``statements`` - each its driver SQL (``%s`` or ``%(name)s`` placeholders;
        one statement, or several separated by ``;`` that share the parameters) and its
        parameters - and COMMIT, in one round trip; the rowcount of the statement at
        ``rowcount_of`` (counted across the texts: the first is 0).
        Deadlocks and lock-wait timeouts are retried, as by ``transaction``; other errors
        are raised as SQLAlchemy raises them (``is_unavailable`` reads them the same way).
        All of it goes in one packet: keep it well under the server's
        ``max_allowed_packet`` (16 MB by default on MariaDB, 64 MB on MySQL 8)."""

        def once() -> int:
            return self._send(statements, rowcount_of)()

        return _retrying(once, attempts)

    def send(
        self, statements: Sequence[Statement], *, attempts: int = 5, rowcount_of: int = 0
    ) -> Sent:
        """``commit`` in two halves: the query goes out now, and ``Sent.rowcount`` reads
        the answers - so that the caller's thread can do other work while the server runs
        it (the worker begins the next email's SMTP transaction), without a second thread.
        Until then this connection takes nothing else."""
        return Sent(self, statements, attempts, rowcount_of)

    def _send(self, statements: Sequence[Statement], rowcount_of: int) -> Callable[[], int]:
        """Send the transaction; the function that reads its answers (the rowcount of
        the statement at ``rowcount_of``). Errors of either come as SQLAlchemy's."""
        now = time.monotonic()
        if self._conn is not None and (self._unread or now - self._used > self._max_idle):
            self.release()
        self._used = now
        if self._conn is None:
            self._conn = self._engine.connect()  # (its errors come as SQLAlchemy's)
        conn = self._conn
        # Straight to the driver: SQLAlchemy would begin a transaction of its own and end
        # it with a COMMIT of its own, a second round trip. It never begins one here.
        dbapi_conn: Any = conn.connection.dbapi_connection  # PyMySQL's
        script = ""
        try:
            cursor = conn.connection.cursor()
            script = ";".join([*(cursor.mogrify(sql, args) for sql, args in statements), "COMMIT"])
            cursor.close()
            # PyMySQL's ``query`` is this send and then ``next_result``'s read: split, so
            # that the caller may do something else in between.
            dbapi_conn._execute_command(COMMAND.COM_QUERY, script)
        except BaseException as exc:
            raise self._dropped(exc, conn, script) from exc
        self._unread = True

        def read() -> int:
            try:
                rowcounts = [dbapi_conn.next_result()]  # each statement's answer in turn
                while dbapi_conn._result.has_next:  # (an error stops the rest)
                    rowcounts.append(dbapi_conn.next_result())
            except BaseException as exc:
                raise self._dropped(exc, conn, script) from exc
            self._unread = False
            return int(rowcounts[rowcount_of])

        return read

    def _dropped(self, exc: BaseException, conn: Connection, script: str) -> BaseException:
        """After an error ``conn`` goes, with whatever is left unread on it; the error
        to raise - SQLAlchemy's for a driver error, as ``Connection.execute`` would."""
        if self._conn is conn:
            self._conn, self._unread = None, False
        dialect = self._engine.dialect
        error = exc if isinstance(exc, dialect.loaded_dbapi.Error) else None
        dbapi_conn = None if conn.invalidated or conn.closed else conn.connection.dbapi_connection
        lost = error is not None and dialect.is_disconnect(error, dbapi_conn, None)
        with contextlib.suppress(SQLAlchemyError):
            conn.invalidate(error)
            conn.close()
        if error is None:
            return exc
        return DBAPIError.instance(
            script[:2000],
            None,
            error,
            dialect.loaded_dbapi.Error,
            connection_invalidated=lost,
            dialect=dialect,
        )

    def release(self) -> None:
        """Give the connection back to the pool - or drop it, when a transaction sent on
        it was never read (its answers would meet the pool's next user)."""
        conn, self._conn = self._conn, None
        unread, self._unread = self._unread, False
        if conn is not None:
            with contextlib.suppress(SQLAlchemyError):  # a dead one: the pool drops it
                if unread:
                    conn.invalidate()
                conn.close()


class Sent:
    """A transaction ``KeptConnection.send`` sent: ``rowcount`` reads its answers, once."""

    def __init__(
        self,
        kept: KeptConnection,
        statements: Sequence[Statement],
        attempts: int,
        rowcount_of: int,
    ) -> None:
        self._kept = kept
        self._statements = statements
        self._attempts = attempts
        self._rowcount_of = rowcount_of
        self._error: SQLAlchemyError | None = None
        self._read: Callable[[], int] | None = None
        self._taken = False
        try:
            self._read = kept._send(statements, rowcount_of)
        except SQLAlchemyError as exc:  # (a pool timeout too) raised by rowcount
            self._error = exc

    def rowcount(self) -> int:
        """The rowcount ``KeptConnection.commit`` returns; a deadlock or lock-wait
        timeout is retried as there: the transaction is sent again, for the rest of the
        tries. Once only."""
        if self._taken:
            raise RuntimeError("a sent transaction is read once")
        self._taken = True
        tries = 0

        def once() -> int:
            nonlocal tries
            tries += 1
            if tries > 1:
                return self._kept._send(self._statements, self._rowcount_of)()
            if self._read is None:
                raise self._error or RuntimeError("nothing was sent")
            return self._read()

        return _retrying(once, self._attempts)


def transaction(engine: Engine, work: Callable[[Connection], T], *, attempts: int = 5) -> T:
    """Run ``work`` in a unit of work, retrying deadlocks and lock-wait timeouts."""

    def once() -> T:
        with unit_of_work(engine) as conn:
            return work(conn)

    return _retrying(once, attempts)


def _retrying(run: Callable[[], T], attempts: int) -> T:
    for attempt in range(1, attempts + 1):
        try:
            return run()
        except DBAPIError as exc:
            if error_code(exc) not in RETRYABLE_CODES or attempt == attempts:
                raise
            log.info(
                "transaction retried after MySQL error %s (attempt %d)", error_code(exc), attempt
            )
            time.sleep(0.01 * attempt)
    raise AssertionError("unreachable")


def error_code(exc: BaseException) -> int | None:
    """The MySQL error number behind a SQLAlchemy/PyMySQL exception, if any."""
    orig = getattr(exc, "orig", exc)
    args = getattr(orig, "args", ())
    if args and isinstance(args[0], int):
        return args[0]
    return None


def is_unavailable(exc: BaseException) -> bool:
    """True when the database cannot be reached (as opposed to a bad statement)."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, OperationalError):
        code = error_code(exc)
        return code is None or code in CONNECTION_CODES or code in RETRYABLE_CODES
    return isinstance(exc, sa.exc.TimeoutError)  # pool exhausted while MySQL hangs


def db_now(conn: Connection) -> datetime:
    """The database clock in UTC: the one clock every process agrees on."""
    value = conn.exec_driver_sql("SELECT UTC_TIMESTAMP(6)").scalar_one()
    if not isinstance(value, datetime):
        raise RuntimeError(f"UTC_TIMESTAMP(6) returned {value!r}")
    return value.replace(tzinfo=UTC)


def database_name(url: str) -> str:
    name = make_url(url).database
    if not name:
        raise ValueError("DATABASE_URL names no database")
    return name


def check_durability(engine: Engine) -> None:
    """Say loudly when MySQL would not keep a committed 201 through a crash."""
    with engine.connect() as conn:
        flush = conn.execute(sa.text("SELECT @@innodb_flush_log_at_trx_commit")).scalar()
        log_bin = conn.execute(sa.text("SELECT @@log_bin")).scalar()
        sync_binlog = conn.execute(sa.text("SELECT @@sync_binlog")).scalar()
    if str(flush) != "1":
        log.warning(
            "innodb_flush_log_at_trx_commit=%s: a crash can lose accepted emails; set it to 1",
            flush,
        )
    if str(log_bin) == "1" and str(sync_binlog) != "1":
        log.warning(
            "binary log on with sync_binlog=%s: set sync_binlog=1 for durability", sync_binlog
        )
