"""What every fault scenario does around its fault: make email bodies, wait for things,
let the system quiesce. (The ledger itself is in ``ledger.py``.)"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from services.core.schema import outbox
from tests.faults.ledger import Ledger, iso, wait_quiescent
from tests.support.stack import Stack


def bodies(
    n: int, send_at: datetime, *, prefix: str = "user", spread_seconds: float = 0.0
) -> list[dict[str, Any]]:
    """``n`` email bodies to ``<prefix><i>@example.com``, due at ``send_at`` (or spread
    evenly over ``spread_seconds`` from it)."""
    step = spread_seconds / max(1, n - 1)
    return [
        {
            "to": [f"{prefix}{i}@example.com"],
            "subject": "ledger",
            "text": "x",
            "send_at": iso(send_at + timedelta(seconds=i * step)),
        }
        for i in range(n)
    ]


def wait_until(check: Callable[[], Any], timeout: float, what: str) -> float:
    """Poll ``check`` until true; returns the seconds it took."""
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < timeout, f"timed out after {timeout:.0f}s: {what}"
        time.sleep(0.1)
    return time.monotonic() - start


def quiesce(stack: Stack, ledger: Ledger, db: Engine, timeout: float = 120) -> None:
    """Until every accepted email is terminal and the queue is empty: ``timeout`` seconds,
    plus one per 50 emails accepted (a drain this slow is still a drain, not a hang)."""
    wait_quiescent(
        ledger,
        db,
        stack.settings.rabbitmq_url.get_secret_value(),
        stack.settings.email_queue,
        timeout=timeout + len(ledger.accepted) / 50,
    )


def unpublished(engine: Engine) -> int:
    """Outbox rows not yet published."""
    with engine.connect() as conn:
        return int(
            conn.execute(
                sa.select(sa.func.count()).where(outbox.c.published_at.is_(None))
            ).scalar_one()
        )
