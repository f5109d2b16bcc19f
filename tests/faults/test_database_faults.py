"""Database faults (FAULTS.md, "Database"): MySQL cut off under write load, and while
workers hold deliveries.

The api, relay and worker reach MariaDB/MySQL through a loopback ``FaultProxy`` that the
test owns; ``proxy.cut()`` resets every open connection and refuses new ones, exactly what
a process sees when the database host or the link dies. The shared database itself is
never touched: the test's own ``db`` engine talks to it directly, throughout.
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from pydantic import SecretStr
from sqlalchemy.engine import Engine
from sqlalchemy.engine.url import make_url

from services.core.schema import attempts, emails, outbox
from services.core.settings import Settings
from tests.conftest import API_KEY
from tests.faults.ledger import Ledger, iso, scaled, settle, wait_quiescent
from tests.faults.scenario import wait_until
from tests.support.proxy import FaultProxy
from tests.support.smtp_sink import SmtpSink
from tests.support.stack import Stack, running_stack

# A send whose record did not land: given up (a stop), or lost to the recovery path
# because the database came back only after the lease had ended.
IN_DOUBT = re.compile(
    r"email (\S+) attempt \d+: (?:sent not recorded|lease lost before recording sent)"
)


@contextmanager
def stack_behind_proxy(
    settings: Settings, tmp_path: Path, **overrides: Any
) -> Iterator[tuple[Stack, FaultProxy]]:
    """The real processes with DATABASE_URL pointing at a proxy in front of MySQL."""
    url = make_url(settings.database_url.get_secret_value())
    with FaultProxy(target_port=url.port or 3306, target_host=url.host or "127.0.0.1") as proxy:
        proxied = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
        behind = settings.model_copy(update={"database_url": SecretStr(proxied), **overrides})
        with running_stack(behind, tmp_path) as stack:
            try:
                yield stack, proxy
            finally:
                proxy.restore()  # whatever happened, let the processes stop cleanly
            codes = stack.stop_all()
            assert all(code == 0 for code in codes.values()), (codes, stack.logs()[-5000:])


class Answers:
    """Every API answer seen by a client: status codes, and whether a 503 said when to
    come back (an httpx response hook, so the Ledger's own bookkeeping stays as is)."""

    def __init__(self) -> None:
        self.codes: Counter[int] = Counter()
        self.unavailable_without_retry_after = 0
        self._lock = threading.Lock()

    def hook(self, response: httpx.Response) -> None:
        with self._lock:
            self.codes[response.status_code] += 1
            if response.status_code == 503 and not response.headers.get("Retry-After"):
                self.unavailable_without_retry_after += 1


class Load:
    """Clients posting emails (due at once) in a background thread until stopped."""

    def __init__(self, ledger: Ledger, client: httpx.Client) -> None:
        self._ledger, self._client = ledger, client
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None
        self.sent = 0

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                bodies = [
                    {
                        "to": [f"load{self.sent + i}@example.com"],
                        "subject": "db cut",
                        "text": "x",
                        "send_at": iso(datetime.now(UTC)),
                    }
                    for i in range(40)
                ]
                self._ledger.submit(self._client, bodies, threads=4)
                self.sent += len(bodies)
                time.sleep(0.05)
        except BaseException as exc:  # a 4xx or a bug: surfaced by stop()
            self.error = exc

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)
        assert not self._thread.is_alive(), "the load thread did not stop"
        assert self.error is None, f"load failed: {self.error!r}"


def count_where(engine: Engine, *conditions: Any) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                sa.select(sa.func.count()).select_from(emails).where(*conditions)
            ).scalar_one()
        )


def missing_from_database(engine: Engine, ids: list[str]) -> list[str]:
    """Accepted ids without their email row or without any outbox row."""
    with engine.connect() as conn:
        found = set(
            conn.execute(
                sa.select(emails.c.id)
                .where(emails.c.id.in_(ids))
                .where(sa.exists().where(outbox.c.email_id == emails.c.id))
            ).scalars()
        )
    return [email_id for email_id in ids if email_id not in found]


def test_mysql_cut_under_write_load(
    settings: Settings, db: Engine, smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    """Every 201 is durable; while MySQL is away the API answers 503 + Retry-After and
    never 500; relay and worker reconnect by themselves; the ledger is clean.

    The lease (20 s) outlasts the cut (6 s), so a worker that sent during the cut records
    it once MySQL is back and nothing is sent twice: dup must be 0 here.
    """
    cut_seconds = 6.0
    with stack_behind_proxy(settings, tmp_path, lease_seconds=20.0) as (stack, proxy):
        stack.start_api()
        stack.start("relay")
        stack.start("worker")
        answers = Answers()
        client = stack.client(API_KEY)
        client.event_hooks["response"].append(answers.hook)
        ledger = Ledger()
        with Load(ledger, client) as load:
            wait_until(lambda: len(ledger.accepted) >= scaled(200), 60, "load before the cut")
            accepted_before = len(ledger.accepted)
            proxy.cut()
            time.sleep(cut_seconds)
            during = dict(answers.codes)
            proxy.restore()
            wait_until(
                lambda: len(ledger.accepted) >= accepted_before + scaled(200),
                60,
                "201s again after the cut",
            )
        assert answers.codes[500] == 0, answers.codes
        assert set(answers.codes) <= {201, 503}, answers.codes
        assert during.get(503, 0) > 0, f"the cut was not seen by the API: {during}"
        assert answers.unavailable_without_retry_after == 0
        assert set(ledger.api_errors) <= {"503"}, Counter(ledger.api_errors)
        assert missing_from_database(db, list(ledger.accepted)) == []
        wait_quiescent(
            ledger,
            db,
            stack.settings.rabbitmq_url.get_secret_value(),
            stack.settings.email_queue,
            timeout=180,
        )
        assert all(p.alive() for p in stack.processes)  # nobody died of the cut
        logs = stack.logs()
        assert "database unavailable" in logs
    figures = settle(f"MySQL cut {cut_seconds:.0f} s under write load", ledger, db, smtp_sink)
    figures.assert_guarantees()
    assert load.sent > len(ledger.accepted)  # some requests did meet the cut


@pytest.mark.parametrize(
    ("cut_seconds", "longer_than_lease"), [(1.5, False), (9.0, True)], ids=["short", "long"]
)
def test_mysql_cut_while_workers_hold_deliveries(
    *,
    settings: Settings,
    db: Engine,
    smtp_sink: SmtpSink,
    tmp_path: Path,
    cut_seconds: float,
    longer_than_lease: bool,
) -> None:
    """Cut MySQL in the middle of a slow drain. A worker that cannot record ``sent`` does
    not ack; the duplicates afterwards are at most the sends it could not record (one per
    worker at most: a worker sends one message at a time), each with the same Message-ID;
    nothing is lost. A worker starts a send only with more than half of its lease (5 s
    here) left and retries the record until the database answers, with one try just
    before the lease ends: a cut over by then costs no duplicate, whenever it starts."""
    workers, n = 2, scaled(120)
    send_time = 0.15
    assert (cut_seconds > settings.lease_seconds) is longer_than_lease
    assert longer_than_lease or send_time + cut_seconds < settings.lease_seconds / 2 - 0.5
    for i in range(n):
        smtp_sink.script(f"held{i}@example.com", f"slow:{send_time} 250 2.0.0 OK")
    with stack_behind_proxy(settings, tmp_path) as (stack, proxy):
        stack.start_api()
        ledger = Ledger()
        bodies = [
            {
                "to": [f"held{i}@example.com"],
                "subject": "held",
                "text": "x",
                "send_at": iso(datetime.now(UTC)),
            }
            for i in range(n)
        ]
        ledger.submit(stack.client(API_KEY), bodies, batch=60)
        assert len(ledger.accepted) == n
        assert not ledger.unknown
        stack.start("relay")
        for _ in range(workers):
            stack.start("worker")
        wait_until(lambda: len(smtp_sink.received) >= n // 4, 60, "the drain to be under way")
        proxy.cut()  # workers are mid-SMTP or about to be
        time.sleep(cut_seconds)
        proxy.restore()
        wait_quiescent(
            ledger,
            db,
            stack.settings.rabbitmq_url.get_secret_value(),
            stack.settings.email_queue,
            timeout=180,
        )
        worker_logs = "".join(p.log() for p in stack.processes if p.kind == "worker")
        in_doubt = IN_DOUBT.findall(worker_logs)
        client = stack.client(API_KEY)
        for email_id in in_doubt:  # what the operator sees of the send in doubt
            seen = client.get(f"/v1/emails/{email_id}").json()
            tried = client.get(f"/v1/emails/{email_id}/attempts").json()["items"]
            assert (seen["status"], seen["attempts"]) == ("sent", 2), seen
            assert [a["outcome"] for a in tried] == ["transient_error", "sent"], tried
            assert tried[0]["error"] == "worker lost during delivery; outcome unknown"
    figures = settle(
        f"MySQL cut {cut_seconds:.1f} s while workers hold deliveries", ledger, db, smtp_sink
    )
    deliveries = smtp_sink.by_email_id()
    duplicated = [email_id for email_id, got in deliveries.items() if len(got) > 1]
    if longer_than_lease:
        # at most one unrecordable send per worker, and each duplicate is one of them
        assert len(in_doubt) <= workers, in_doubt
        assert set(duplicated) <= set(in_doubt), (duplicated, in_doubt)
        figures.assert_guarantees(max_dup=len(in_doubt))
    else:
        assert in_doubt == [], in_doubt  # every record landed before its lease ended
        figures.assert_guarantees(max_dup=0)
    for email_id in duplicated:  # the same message again, for the receiver to drop
        assert len({d.message_id for d in deliveries[email_id]}) == 1
    assert count_where(db, emails.c.status == "sent") == n
    with db.connect() as conn:
        sent_attempts = conn.execute(
            sa.select(sa.func.count()).where(attempts.c.outcome == "sent")
        ).scalar_one()
    assert sent_attempts == n  # each email recorded as sent exactly once
