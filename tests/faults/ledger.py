"""The delivery ledger of FAULTS.md: what the API accepted, what the SMTP server got.

    A  ids the API answered 2xx             -> ``Ledger.accepted``
    T  requests that timed out or got a 5xx -> ``Ledger.unknown`` (their client keys)
    D  every message the SMTP server got    -> the sink, keyed by X-Email-Id

Each request carries a client key in ``metadata.k``, so an email created by a request
whose answer was lost can still be told apart from one nobody asked for ("unexpected").
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import uuid4

import httpx
import pika
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from services.core.broker import connection_parameters
from services.core.schema import emails, outbox
from tests.support.smtp_sink import SmtpSink

TERMINAL = ("sent", "failed", "cancelled")
SCALE = float(os.environ.get("FAULT_SCALE", "1"))  # `make faults` runs larger sizes
REPORT = Path(os.environ.get("FAULT_REPORT", ".run/faults-ledger.jsonl"))
FIGURES: list[Figures] = []  # this session's rows, printed at the end by conftest


def scaled(n: int) -> int:
    return max(1, int(n * SCALE))


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


@dataclass
class Ledger:
    accepted: dict[str, str] = field(default_factory=dict)  # email id -> client key
    unknown: set[str] = field(default_factory=set)  # client keys with no known outcome
    api_errors: list[str] = field(default_factory=list)  # 5xx / transport errors seen

    def submit(
        self,
        client: httpx.Client,
        bodies: Iterable[dict[str, Any]],
        *,
        batch: int = 1,
        threads: int = 8,
    ) -> None:
        """POST every body (alone, or ``batch`` at a time), recording A and T."""
        bodies = list(bodies)
        chunks = [bodies[i : i + batch] for i in range(0, len(bodies), batch)]
        with ThreadPoolExecutor(threads) as pool:
            for _ in pool.map(lambda chunk: self._post(client, chunk, batch > 1), chunks):
                pass

    def _post(self, client: httpx.Client, chunk: list[dict[str, Any]], as_batch: bool) -> None:
        keys = [uuid4().hex for _ in chunk]
        for key, body in zip(keys, chunk, strict=True):
            body["metadata"] = {**body.get("metadata", {}), "k": key}
        url, payload = (
            ("/v1/emails/batch", {"emails": chunk}) if as_batch else ("/v1/emails", chunk[0])
        )
        try:
            response = client.post(url, json=payload)
        except httpx.TransportError as exc:
            self.unknown.update(keys)
            self.api_errors.append(type(exc).__name__)
            return
        if response.status_code >= 500:
            self.unknown.update(keys)
            self.api_errors.append(str(response.status_code))
            return
        response.raise_for_status()  # a 4xx here is a bug in the test itself
        items = response.json()["items"] if as_batch else [response.json()]
        for key, item in zip(keys, items, strict=True):
            self.accepted[item["id"]] = key


@dataclass
class Figures:
    scenario: str
    emails: int
    lost: int
    dup: int
    unexpected: int
    early: int
    terminal_pct: float
    api_errors: int
    lateness_p50_ms: float
    lateness_p99_ms: float
    lateness_max_ms: float

    def row(self) -> str:
        return (
            f"| {self.scenario} | {self.emails} | {self.lost} | {self.dup} | {self.unexpected}"
            f" | {self.early} | {self.terminal_pct:.1f} % | {self.lateness_p50_ms:.0f} ms"
            f" | {self.lateness_p99_ms:.0f} ms | {self.lateness_max_ms:.0f} ms |"
        )

    def assert_guarantees(self, *, max_dup: int = 0) -> None:
        assert self.lost == 0, f"lost {self.lost}: {self}"
        assert self.unexpected == 0, f"unexpected {self.unexpected}: {self}"
        assert self.early == 0, f"early {self.early}: {self}"
        assert self.terminal_pct == 100.0, f"not terminal: {self}"
        assert self.dup <= max_dup, f"dup {self.dup} > {max_dup}: {self}"


def wait_quiescent(
    ledger: Ledger, engine: Engine, rabbitmq_url: str, queue: str, timeout: float
) -> None:
    """Until every accepted email is terminal and the queue is empty (then a short grace
    period, so that a late duplicate still has the chance to show up)."""
    ids = list(ledger.accepted)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _open_emails(engine, ids) == 0 and _ready_messages(rabbitmq_url, queue) == 0:
            time.sleep(1.0)
            return
        time.sleep(0.5)
    open_ = _open_emails(engine, ids)
    raise AssertionError(f"not quiescent after {timeout}s: {open_} emails not terminal")


def _open_emails(engine: Engine, ids: list[str]) -> int:
    with engine.connect() as conn:
        terminal = 0
        for start in range(0, len(ids), 5000):
            terminal += conn.execute(
                sa.select(sa.func.count()).where(
                    emails.c.id.in_(ids[start : start + 5000]), emails.c.status.in_(TERMINAL)
                )
            ).scalar_one()
    return len(ids) - terminal


def _ready_messages(rabbitmq_url: str, queue: str) -> int:
    connection = pika.BlockingConnection(connection_parameters(rabbitmq_url))
    try:
        declared = connection.channel().queue_declare(queue, passive=True)
        return int(declared.method.message_count)
    finally:
        connection.close()


def settle(scenario: str, ledger: Ledger, engine: Engine, sink: SmtpSink) -> Figures:
    """Compute the figures of FAULTS.md from the ledger, the database and the sink."""
    with engine.connect() as conn:
        rows = {
            r.id: r
            for r in conn.execute(
                sa.select(emails.c.id, emails.c.status, emails.c.send_at, emails.c.metadata)
            )
        }
        due_left = conn.execute(
            sa.select(sa.func.count()).where(outbox.c.published_at.is_(None))
        ).scalar_one()
    deliveries = sink.by_email_id()
    lost = sum(
        1
        for email_id in ledger.accepted
        if email_id not in deliveries and rows[email_id].status not in ("failed", "cancelled")
    )
    dup = sum(len(d) - 1 for d in deliveries.values())
    unexpected = sum(
        1
        for email_id in deliveries
        if email_id not in ledger.accepted
        and (email_id not in rows or rows[email_id].metadata.get("k") not in ledger.unknown)
    )
    early, lateness = 0, []
    for email_id, arrivals in deliveries.items():
        row = rows.get(email_id)
        if row is None:
            continue
        early += sum(1 for a in arrivals if a.arrived_at < row.send_at)
        if email_id in ledger.accepted:
            lateness.append((arrivals[0].arrived_at - row.send_at).total_seconds() * 1000)
    terminal = sum(1 for e in ledger.accepted if rows[e].status in TERMINAL)
    lateness.sort()
    figures = Figures(
        scenario=scenario,
        emails=len(ledger.accepted),
        lost=lost,
        dup=dup,
        unexpected=unexpected,
        early=early,
        terminal_pct=100.0 * terminal / max(1, len(ledger.accepted)),
        api_errors=len(ledger.api_errors),
        lateness_p50_ms=statistics.median(lateness) if lateness else 0.0,
        lateness_p99_ms=lateness[int(0.99 * (len(lateness) - 1))] if lateness else 0.0,
        lateness_max_ms=lateness[-1] if lateness else 0.0,
    )
    FIGURES.append(figures)
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    with REPORT.open("a") as out:
        out.write(json.dumps({**asdict(figures), "outbox_unpublished_left": due_left}) + "\n")
    return figures
