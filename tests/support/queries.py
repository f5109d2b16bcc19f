"""What an engine's connections send MySQL, seen from the client: every command each
connection writes (a query, however many statements it holds, or a COMMIT), and the
server's id of each connection checked out.

    with QueryLog(engine) as log:
        ...
    log.queries      # [(connection id, SQL text), ...] in the order they were written
    log.checkouts    # [connection id, ...], one per checkout from the pool

It wraps PyMySQL's one method that writes a command; the server and the driver stay
real. A connection that was checked out before the log began is not seen.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine


class QueryLog:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.queries: list[tuple[int, str]] = []
        self.checkouts: list[int] = []
        self._wrapped: list[Any] = []

    def __enter__(self) -> QueryLog:
        sa.event.listen(self._engine, "checkout", self._checkout)
        return self

    def __exit__(self, *exc: object) -> None:
        sa.event.remove(self._engine, "checkout", self._checkout)
        for dbapi_connection in self._wrapped:
            del dbapi_connection._execute_command  # the class's own again
        self._wrapped.clear()

    def statements(self, prefix: str) -> list[str]:
        """Every statement sent that starts with ``prefix``, one per statement of a query."""
        return [
            statement.strip()
            for _, sql in self.queries
            for statement in sql.split(";")
            if statement.strip().startswith(prefix)
        ]

    def _checkout(self, dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        conn_id = dbapi_connection.thread_id()
        self.checkouts.append(conn_id)
        if dbapi_connection in self._wrapped:
            return
        write = dbapi_connection._execute_command

        def logged(command: int, sql: Any) -> Any:
            text = (
                bytes(sql).decode(errors="replace") if isinstance(sql, bytes | bytearray) else sql
            )
            self.queries.append((conn_id, text))
            return write(command, sql)

        dbapi_connection._execute_command = logged
        self._wrapped.append(dbapi_connection)
