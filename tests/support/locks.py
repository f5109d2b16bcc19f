"""What InnoDB says of its locks, for tests that make transactions meet."""

from __future__ import annotations

import time

from sqlalchemy.engine import Engine


def until_a_lock_wait(engine: Engine, timeout: float = 5.0) -> bool:
    """Whether some transaction waits for a row lock within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            if conn.exec_driver_sql(
                "SELECT COUNT(*) FROM information_schema.innodb_trx WHERE trx_state = 'LOCK WAIT'"
            ).scalar():
                return True
        # InnoDB refreshes what the table shows only when it was not read for 0.1 s
        time.sleep(0.2)
    return False


def deadlocks(engine: Engine) -> int:
    """The server's count of deadlocks so far (all sessions)."""
    with engine.connect() as conn:
        return int(conn.exec_driver_sql("SHOW GLOBAL STATUS LIKE 'Innodb_deadlocks'").one()[1])
