"""Worker.handle against real MariaDB, Redis and an aiosmtpd sink, and the worker process
against RabbitMQ. The relay is simulated: ``relay()`` waits for an email's due outbox
row (by the database clock), marks it published and returns its message."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import pika
import pytest
import redis
import sqlalchemy as sa
from pydantic import SecretStr
from sqlalchemy.engine import Engine, make_url

from services.core import emails, outbox
from services.core.broker import (
    connection_parameters,
    dead_letter_queue,
    declare_topology,
    message_properties,
)
from services.core.db import create_db_engine, db_now
from services.core.delivery import LEAD, ClaimStatus, claim_batch
from services.core.fastpath import FastPath
from services.core.messages import DeliveryMessage
from services.core.schema import attempts
from services.core.schema import outbox as outbox_table
from services.core.settings import Settings
from services.worker.__main__ import Consumer, StopFlag
from services.worker.smtp import SmtpSender
from services.worker.worker import Decision, Worker
from tests.support.pika_faults import slow_transport_setup
from tests.support.proxy import FaultProxy
from tests.support.queries import QueryLog
from tests.support.smtp_sink import SmtpSink, free_port

# tests/support/smtp_sink.py passes aiosmtpd's deprecated ``server_kwargs``

OWNER = "o" * 32
T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[2]


def create_email(engine: Engine, **changes: Any) -> str:
    fields: dict[str, Any] = {
        "to": ["Ann <ann@example.com>"],
        "from_addr": "sender@example.com",
        "subject": "Hello",
        "send_at": None,
        "text": "plain body",
    }
    fields.update(changes)
    with engine.begin() as conn:
        return emails.create(conn, OWNER, [emails.NewEmail(**fields)], now=db_now(conn))[0]


def relay(engine: Engine, email_id: str, timeout: float = 10) -> DeliveryMessage:
    """Publish the email's next outbox row a lead before it is due, as the relay would."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with engine.begin() as conn:
            now = db_now(conn)
            row = conn.execute(
                sa.select(outbox_table)
                .where(outbox_table.c.email_id == email_id, outbox_table.c.published_at.is_(None))
                .order_by(outbox_table.c.fire_at)
            ).first()
            if row is not None and row.fire_at - LEAD <= now:
                outbox.mark_published(conn, [row.id], now)
                return DeliveryMessage(email_id, row.version)
        time.sleep(0.02)
    raise AssertionError(f"no outbox row for {email_id} became due")


def email_row(engine: Engine, email_id: str) -> Any:
    with engine.begin() as conn:
        return emails.get(conn, OWNER, email_id)


def attempt_rows(engine: Engine, email_id: str) -> list[Any]:
    with engine.begin() as conn:
        return list(
            conn.execute(
                sa.select(attempts).where(attempts.c.email_id == email_id).order_by("number")
            )
        )


def pending_outbox(engine: Engine, email_id: str) -> list[Any]:
    with engine.begin() as conn:
        return list(
            conn.execute(
                sa.select(outbox_table).where(
                    outbox_table.c.email_id == email_id, outbox_table.c.published_at.is_(None)
                )
            )
        )


WorkerFactory = Callable[..., Worker]


@pytest.fixture
def make_worker(
    settings: Settings, db: Engine, writer_engine: Engine, redis_client: redis.Redis
) -> Iterator[WorkerFactory]:
    """Workers with their own SMTP connection; ``use_redis=False`` runs without the fast path."""
    senders: list[SmtpSender] = []
    fastpaths: list[FastPath] = []
    workers: list[Worker] = []

    def make(use_redis: bool = True, engine: Engine = writer_engine, **changes: Any) -> Worker:
        worker_settings = settings.model_copy(update=changes)
        sender = SmtpSender(worker_settings)
        redis_url = settings.redis_url.get_secret_value() if use_redis else ""
        fastpath = FastPath(redis_url, namespace=settings.email_queue)
        senders.append(sender)
        fastpaths.append(fastpath)
        workers.append(Worker(worker_settings, engine, sender, fastpath))
        return workers[-1]

    yield make
    for worker in workers:
        worker.close()
    for sender in senders:
        sender.close()
    for fastpath in fastpaths:
        fastpath.close()


def test_delivers_once_with_headers_and_records(
    db: Engine, smtp_sink: SmtpSink, make_worker: WorkerFactory
) -> None:
    email_id = create_email(
        db,
        cc=["carol@example.com"],
        bcc=["dave@example.com"],
        headers={"X-Campaign": "spring"},
        reply_to="replies@example.com",
    )
    worker = make_worker()
    message = relay(db, email_id)
    assert worker.handle(message.encode()) is Decision.ACK

    [received] = smtp_sink.received
    row = email_row(db, email_id)
    parsed = received.message
    assert received.email_id == email_id
    assert received.message_id == row.message_id == f"<{email_id}@example.com>"
    assert parsed["X-Campaign"] == "spring"
    assert parsed["Reply-To"] == "replies@example.com"
    assert parsed["Bcc"] is None
    assert b"dave@example.com" not in received.raw
    assert received.mail_from == "sender@example.com"
    assert set(received.rcpt_tos) == {"ann@example.com", "carol@example.com", "dave@example.com"}
    assert (row.status, row.attempts, row.last_error) == ("sent", 1, None)
    assert row.sent_at is not None
    assert [(a.number, a.outcome, a.smtp_code) for a in attempt_rows(db, email_id)] == [
        (1, "sent", 250)
    ]
    assert pending_outbox(db, email_id) == []  # the recovery row went with the record

    # the same message again, through Redis and through MySQL: acked, never re-sent
    assert worker.handle(message.encode()) is Decision.ACK
    assert make_worker(use_redis=False).handle(message.encode()) is Decision.ACK
    assert smtp_sink.handler.transactions == 1


def test_emails_claimed_a_lead_early_are_finished_at_their_instant_in_due_order(
    db: Engine, smtp_sink: SmtpSink, make_worker: WorkerFactory
) -> None:
    with db.begin() as conn:
        now = db_now(conn)
    later = create_email(db, send_at=now + timedelta(milliseconds=320))
    sooner = create_email(db, send_at=now + timedelta(milliseconds=300))
    messages = [relay(db, later), relay(db, sooner)]  # both due within the lead now
    worker = make_worker()
    assert worker.handle_batch([m.encode() for m in messages]) == [Decision.ACK] * 2

    rows = {email_id: email_row(db, email_id) for email_id in (later, sooner)}
    assert [r.email_id for r in smtp_sink.received] == [sooner, later]
    for received in smtp_sink.received:
        send_at = rows[received.email_id].send_at
        assert received.arrived_at >= send_at, "the final dot went out before send_at"
        [attempt] = attempt_rows(db, received.email_id)
        assert attempt.started_at == send_at  # an attempt counts from its instant
        assert attempt.finished_at >= send_at
    # the first was begun on the wire well before its instant: only its "." was held
    assert smtp_sink.received[0].mail_at < rows[sooner].send_at


@pytest.mark.parametrize("mode", ["redis", "no-redis", "redis-flushed"])
def test_same_message_to_two_workers_at_once_is_sent_once(
    *,
    db: Engine,
    smtp_sink: SmtpSink,
    make_worker: WorkerFactory,
    redis_client: redis.Redis,
    settings: Settings,
    mode: str,
) -> None:
    email_id = create_email(db)
    message = relay(db, email_id).encode()
    workers = [make_worker(use_redis=mode != "no-redis") for _ in range(2)]

    def race() -> list[Decision]:
        barrier = threading.Barrier(len(workers))
        decisions: list[Decision] = []

        def run(worker: Worker) -> None:
            barrier.wait()
            decisions.append(worker.handle(message))

        threads = [threading.Thread(target=run, args=(w,)) for w in workers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        return decisions

    assert race() == [Decision.ACK, Decision.ACK]
    if mode == "redis-flushed":
        keys = list(redis_client.scan_iter(f"emailsched:{settings.email_queue}:*"))
        assert keys
        redis_client.delete(*keys)
        assert race() == [Decision.ACK, Decision.ACK]
    assert smtp_sink.handler.transactions == 1
    assert email_row(db, email_id).status == "sent"


def test_transient_twice_then_sent(
    db: Engine, smtp_sink: SmtpSink, make_worker: WorkerFactory, settings: Settings
) -> None:
    smtp_sink.script("ann@example.com", "451 4.3.0 later", "421 4.7.0 busy")
    email_id = create_email(db)
    worker = make_worker()
    for _ in range(3):
        assert worker.handle(relay(db, email_id).encode()) is Decision.ACK

    row = email_row(db, email_id)
    assert (row.status, row.attempts) == ("sent", 3)
    tries = attempt_rows(db, email_id)
    assert [(a.outcome, a.smtp_code) for a in tries] == [
        ("transient_error", 451),
        ("transient_error", 421),
        ("sent", 250),
    ]
    assert "later" in tries[0].error
    # never before the backoff's floor (equal jitter: at least half the full delay)
    for number, (before, after) in enumerate(itertools.pairwise(tries), start=1):
        floor = settings.retry_backoff_seconds * 2 ** (number - 1) / 2
        assert after.started_at - before.finished_at >= timedelta(seconds=floor)
    [received] = smtp_sink.received
    assert received.message_id == row.message_id
    assert smtp_sink.handler.transactions == 3


def test_permanent_error_fails_at_once(
    db: Engine, smtp_sink: SmtpSink, make_worker: WorkerFactory
) -> None:
    smtp_sink.script("ann@example.com", "550 5.1.1 mailbox unavailable")
    email_id = create_email(db)
    assert make_worker().handle(relay(db, email_id).encode()) is Decision.ACK

    row = email_row(db, email_id)
    assert row.status == "failed"
    assert row.attempts == 1
    assert row.last_error.startswith("550")
    assert "mailbox unavailable" in row.last_error
    assert [(a.outcome, a.smtp_code) for a in attempt_rows(db, email_id)] == [
        ("permanent_error", 550)
    ]
    assert smtp_sink.handler.transactions == 1
    assert pending_outbox(db, email_id) == []


def test_attempts_exhausted_fail(
    db: Engine, smtp_sink: SmtpSink, make_worker: WorkerFactory
) -> None:
    smtp_sink.script("ann@example.com", "451 4.3.0 later", "451 4.3.0 later")
    email_id = create_email(db)
    worker = make_worker(max_attempts=2)
    for _ in range(2):
        assert worker.handle(relay(db, email_id).encode()) is Decision.ACK

    row = email_row(db, email_id)
    assert (row.status, row.attempts) == ("failed", 2)
    assert row.last_error.startswith("451")
    assert pending_outbox(db, email_id) == []
    assert smtp_sink.received == []


def test_invalid_row_fails_without_smtp(
    db: Engine, smtp_sink: SmtpSink, make_worker: WorkerFactory
) -> None:
    email_id = create_email(db, headers={"Bcc": "evil@example.com"})
    assert make_worker().handle(relay(db, email_id).encode()) is Decision.ACK
    assert email_row(db, email_id).status == "failed"
    assert smtp_sink.handler.transactions == 0


def test_cancelled_email_is_not_sent(
    db: Engine, smtp_sink: SmtpSink, make_worker: WorkerFactory
) -> None:
    email_id = create_email(db)
    message = relay(db, email_id)
    with db.begin() as conn:
        emails.cancel(conn, OWNER, email_id, db_now(conn))
    assert make_worker().handle(message.encode()) is Decision.ACK
    assert email_row(db, email_id).status == "cancelled"
    assert smtp_sink.handler.transactions == 0


@pytest.mark.parametrize(
    "body",
    [b"not json", b"[1, 2]", b'{"email_id": "x"}', DeliveryMessage("nope", 1).encode()],
)
def test_poison_messages_are_rejected(make_worker: WorkerFactory, body: bytes) -> None:
    assert make_worker().handle(body) is Decision.REJECT


def test_email_left_sending_by_a_dead_worker_comes_back(
    db: Engine, smtp_sink: SmtpSink, make_worker: WorkerFactory, settings: Settings
) -> None:
    email_id = create_email(db)
    message = relay(db, email_id)
    # A worker claims, gets the 250, and dies before recording it.
    with db.begin() as conn:
        (claim,) = claim_batch(
            conn, [message], now=db_now(conn), lease=timedelta(seconds=1), max_attempts=5
        )
    assert claim.status is ClaimStatus.CLAIMED
    assert make_worker().handle(message.encode()) is Decision.ACK  # the lease holds: stale
    assert smtp_sink.handler.transactions == 0

    assert make_worker().handle(relay(db, email_id).encode()) is Decision.ACK
    row = email_row(db, email_id)
    assert (row.status, row.attempts) == ("sent", 2)
    assert [a.outcome for a in attempt_rows(db, email_id)] == ["transient_error", "sent"]
    [received] = smtp_sink.received
    assert received.message_id == row.message_id


def test_smtp_down_is_transient_and_retried(
    db: Engine, smtp_sink: SmtpSink, make_worker: WorkerFactory
) -> None:
    email_id = create_email(db)
    worker = make_worker(smtp_port=free_port())
    assert worker.handle(relay(db, email_id).encode()) is Decision.ACK
    row = email_row(db, email_id)
    assert row.status == "pending"
    assert "SMTP connection failed" in row.last_error
    assert [(a.outcome, a.smtp_code) for a in attempt_rows(db, email_id)] == [
        ("transient_error", None)
    ]
    assert make_worker().handle(relay(db, email_id).encode()) is Decision.ACK
    assert email_row(db, email_id).status == "sent"


def test_database_unavailable_at_claim_requeues(
    db: Engine, smtp_sink: SmtpSink, make_worker: WorkerFactory
) -> None:
    email_id = create_email(db)
    nowhere = create_db_engine(f"mysql+pymysql://root@127.0.0.1:{free_port()}/nowhere")
    try:
        worker = make_worker(use_redis=False, engine=nowhere)
        assert worker.handle(relay(db, email_id).encode()) is Decision.REQUEUE
    finally:
        nowhere.dispose()
    assert smtp_sink.handler.transactions == 0


@pytest.fixture
def db_proxy(database_url: str) -> Iterator[tuple[FaultProxy, Engine]]:
    """A proxy the test can cut between a worker and MySQL, and an engine through it."""
    url = make_url(database_url)
    with FaultProxy(target_port=url.port or 3306) as proxy:
        engine = create_db_engine(
            url.set(port=proxy.port).render_as_string(hide_password=False), multi_statements=True
        )
        try:
            yield proxy, engine
        finally:
            engine.dispose()


class Outage:
    """Cuts MySQL off once the SMTP server has the message (the worker is past its claim
    and will record next), restores it ``restore_after`` seconds later; ``pause`` is the
    wait the worker gets between record retries, noting when each one ended."""

    def __init__(self, proxy: FaultProxy, sink: SmtpSink, restore_after: float) -> None:
        self.proxy, self.sink, self.restore_after = proxy, sink, restore_after
        self.pauses_ended: list[float] = []
        self.data_seen = 0.0
        self.received_during = 0  # messages the SMTP server had accepted by the restore

    def run(self, handle: Callable[[], T]) -> T:
        decisions: list[T] = []
        thread = threading.Thread(target=lambda: decisions.append(handle()))
        thread.start()
        try:
            deadline = time.monotonic() + 10
            while self.sink.handler.transactions == 0 and time.monotonic() < deadline:
                time.sleep(0.005)
            self.data_seen = time.monotonic()
            self.proxy.cut()
            time.sleep(self.restore_after)
            self.received_during = len(self.sink.received)
        finally:
            self.proxy.restore()
            thread.join(30)
        [decision] = decisions
        return decision

    def pause(self, seconds: float) -> bool:
        time.sleep(seconds)
        self.pauses_ended.append(time.monotonic())
        return True


def test_a_record_is_retried_past_the_lease_until_the_database_answers(
    db: Engine, smtp_sink: SmtpSink, make_worker: WorkerFactory, db_proxy: tuple[FaultProxy, Engine]
) -> None:
    """No other worker can take the email up while the database is away, so a record that
    lands after the lease still closes the window without a duplicate."""
    proxy, proxied = db_proxy
    email_id = create_email(db, to=["slow@example.com"])
    smtp_sink.script("slow@example.com", "slow:0.3 250 2.0.0 OK")
    worker = make_worker(use_redis=False, engine=proxied, lease_seconds=1.0)
    outage = Outage(proxy, smtp_sink, restore_after=2.5)  # well past the 1 s lease
    message = relay(db, email_id).encode()
    assert outage.run(lambda: worker.handle(message, pause=outage.pause)) is Decision.ACK
    assert outage.pauses_ended[-2] > outage.data_seen + 1.0  # it did retry past the lease
    row = email_row(db, email_id)
    assert (row.status, row.attempts) == ("sent", 1)
    assert [a.outcome for a in attempt_rows(db, email_id)] == ["sent"]
    assert pending_outbox(db, email_id) == []  # the recovery row went with the record
    assert smtp_sink.handler.transactions == 1


def test_a_database_back_before_the_lease_ends_gets_the_record_in_time(
    db: Engine, smtp_sink: SmtpSink, make_worker: WorkerFactory, db_proxy: tuple[FaultProxy, Engine]
) -> None:
    """Retries double (0.1 s ... 2 s) but one comes just before the lease ends, so the
    recovery path, free to take the email once it has, never races a record that could
    have landed in time. Here the retries after the send fails at ~0.5 s fall at ~0.6,
    0.8, 1.2 and 2.0 s; the next doubling would be 3.6 s, past the 3 s lease."""
    proxy, proxied = db_proxy
    email_id = create_email(db, to=["slow@example.com"])
    smtp_sink.script("slow@example.com", "slow:0.5 250 2.0.0 OK")
    worker = make_worker(use_redis=False, engine=proxied, lease_seconds=3.0)
    outage = Outage(proxy, smtp_sink, restore_after=2.35)
    message = relay(db, email_id).encode()
    assert outage.run(lambda: worker.handle(message, pause=outage.pause)) is Decision.ACK
    # the worker's lease began before its claim, so before the SMTP server saw DATA
    assert outage.pauses_ended[-1] < outage.data_seen + 3.0
    assert (email_row(db, email_id).status, smtp_sink.handler.transactions) == ("sent", 1)


def test_no_send_is_finished_before_the_previous_one_is_recorded(
    db: Engine, smtp_sink: SmtpSink, make_worker: WorkerFactory, db_proxy: tuple[FaultProxy, Engine]
) -> None:
    """The next email's transaction is begun while the previous send's record commits,
    and its final "." waits for that commit: with MySQL gone after the first send, the
    second is thrown away unfinished (the server accepts nothing more while the first is
    unrecorded) and sent again once the first is recorded. Each arrives once, in order."""
    proxy, proxied = db_proxy
    ids = [create_email(db, to=[f"n{i}@example.com"]) for i in range(3)]
    smtp_sink.script("n0@example.com", "slow:0.3 250 2.0.0 OK")
    worker = make_worker(use_redis=False, engine=proxied)
    outage = Outage(proxy, smtp_sink, restore_after=1.0)
    batch = [relay(db, email_id).encode() for email_id in ids]
    decisions = outage.run(lambda: worker.handle_batch(batch, pause=outage.pause))
    assert decisions == [Decision.ACK] * 3
    assert outage.received_during == 1  # only the first, while it could not be recorded
    assert [r.email_id for r in smtp_sink.received] == ids
    assert smtp_sink.handler.transactions == 3  # the aborted one never reached its end
    for email_id in ids:
        assert (email_row(db, email_id).status, email_row(db, email_id).attempts) == ("sent", 1)
        assert pending_outbox(db, email_id) == []  # recovery rows gone with the last record


def test_a_batch_drops_its_recovery_rows_in_one_statement_keeping_retries(
    db: Engine, writer_engine: Engine, smtp_sink: SmtpSink, make_worker: WorkerFactory
) -> None:
    """...and records its emails on one connection, given back to the pool at the end,
    each record with its COMMIT in one query."""
    ids = [create_email(db, to=[f"n{i}@example.com"]) for i in range(5)]
    smtp_sink.script("n2@example.com", "451 4.3.0 later")
    batch = [relay(db, email_id).encode() for email_id in ids]
    worker = make_worker(use_redis=False)
    with QueryLog(writer_engine) as log:
        assert worker.handle_batch(batch) == [Decision.ACK] * 5
    assert len(log.statements("DELETE FROM outbox")) == 1, log.queries
    assert len(log.checkouts) == 2, log.checkouts  # the claim's, the one every record ran on
    # (the pool may hand the claim's connection out again for the records: told apart by
    # what they send, each record with its COMMIT in one query)
    records = [(conn, sql) for conn, sql in log.queries if sql.endswith(";COMMIT")]
    assert len(records) == 5
    assert {conn for conn, _ in records} == {log.checkouts[1]}
    # each record updates its email; the last drops the batch's recovery rows first
    assert [sql.split(" ", 2)[:2] for _, sql in records] == [["UPDATE", "emails"]] * 4 + [
        ["DELETE", "FROM"]
    ]
    assert ";UPDATE emails " in records[-1][1]
    assert writer_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert [email_row(db, email_id).status for email_id in ids] == ["sent"] * 2 + ["pending"] + [
        "sent"
    ] * 2
    assert [pending_outbox(db, email_id) for email_id in ids[:2] + ids[3:]] == [[]] * 4
    [retry] = pending_outbox(db, ids[2])  # the 451's retry, not its recovery row
    assert retry.version == email_row(db, ids[2]).version


def test_a_stop_ends_the_record_retries(
    db: Engine,
    smtp_sink: SmtpSink,
    make_worker: WorkerFactory,
    db_proxy: tuple[FaultProxy, Engine],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A stop request (the pause answers False) gives the message back at once: the email
    stays ``sending``, and its recovery row takes it up when the lease ends."""
    proxy, proxied = db_proxy
    email_id = create_email(db, to=["slow@example.com"])
    smtp_sink.script("slow@example.com", "slow:0.3 250 2.0.0 OK")
    worker = make_worker(use_redis=False, engine=proxied, lease_seconds=30.0)
    message = relay(db, email_id).encode()
    stops: list[float] = []

    def stop_at_once(seconds: float) -> bool:
        stops.append(seconds)
        return False

    with caplog.at_level("WARNING"):
        outage = Outage(proxy, smtp_sink, restore_after=0.5)
        assert outage.run(lambda: worker.handle(message, pause=stop_at_once)) is Decision.REQUEUE
    assert len(stops) == 1
    assert f"email {email_id} attempt 1: sent not recorded; requeueing" in caplog.text
    assert email_row(db, email_id).status == "sending"
    assert [r.version for r in pending_outbox(db, email_id)] == [2]  # the recovery row


def test_lone_dot_lines_arrive_intact_as_one_message(
    db: Engine, smtp_sink: SmtpSink, make_worker: WorkerFactory
) -> None:
    body = "first\n.\nQUIT\n..\n.\r\n.leading\nlast\n"
    email_id = create_email(db, text=body, html="<p>\n.\n</p>")
    assert make_worker().handle(relay(db, email_id).encode()) is Decision.ACK
    [received] = smtp_sink.received
    assert smtp_sink.handler.transactions == 1
    text = received.message.get_payload()[0].get_payload(decode=True).decode()
    assert text.replace("\r\n", "\n") == body.replace("\r\n", "\n")


# --- the process ------------------------------------------------------------------------


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def worker_env(settings: Settings, smtp_sink: SmtpSink, **changes: str) -> dict[str, str]:
    """The environment of a ``python -m services.worker`` for this test's services."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("SMTP_")}
    env.update(
        DATABASE_URL=settings.database_url.get_secret_value(),
        RABBITMQ_URL=settings.rabbitmq_url.get_secret_value(),
        REDIS_URL=settings.redis_url.get_secret_value(),
        EMAIL_QUEUE=settings.email_queue,
        SMTP_HOST=smtp_sink.host,
        SMTP_PORT=str(smtp_sink.port),
        SMTP_TIMEOUT="5",
        LEASE_SECONDS="30",
        WORKER_PREFETCH="10",
    )
    env.update(changes)
    return env


def test_worker_process_delivers_dead_letters_poison_and_stops_on_sigterm(
    db: Engine, smtp_sink: SmtpSink, settings: Settings, tmp_path: Path
) -> None:
    env = worker_env(settings, smtp_sink)
    connection = pika.BlockingConnection(
        connection_parameters(settings.rabbitmq_url.get_secret_value())
    )
    channel = connection.channel()
    declare_topology(channel, settings.email_queue)

    def publish(body: bytes) -> None:
        channel.basic_publish("", settings.email_queue, body, message_properties("test"))

    log_file = tmp_path / "worker.log"
    with log_file.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "services.worker"], cwd=ROOT, env=env, stderr=log
        )
    try:
        first, second = create_email(db), create_email(db)
        publish(relay(db, first).encode())
        wait_for(lambda: first in smtp_sink.by_email_id(), 20, "the first delivery")

        publish(b"not json")
        publish(relay(db, second).encode())
        wait_for(lambda: second in smtp_sink.by_email_id(), 10, "the delivery after the poison")

        def dead_lettered() -> bool:
            method, _, body = channel.basic_get(dead_letter_queue(settings.email_queue), True)
            return method is not None and body == b"not json"

        wait_for(dead_lettered, 10, "the poison message in the dead-letter queue")

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        connection.close()
    assert email_row(db, first).status == email_row(db, second).status == "sent"
    assert smtp_sink.handler.transactions == 2
    log_text = log_file.read_text()
    assert "worker stopped" in log_text
    assert "guest:guest" not in log_text


def test_a_reset_during_connection_setup_is_retried_like_any_failed_attempt(
    db: Engine,
    smtp_sink: SmtpSink,
    settings: Settings,
    make_worker: WorkerFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """pika raises ValueError, not a connection error, when the peer resets between connect
    and transport set-up (tests/support/pika_faults.py). The consumer retries it like any
    failed attempt instead of ending the worker, and consumes once the broker is back."""
    url = settings.rabbitmq_url.get_secret_value()
    port = pika.URLParameters(url).port
    slow_transport_setup(monkeypatch, 0.3)
    with FaultProxy(port) as proxy:
        proxy.cut(reset_after=0.1)
        proxied = SecretStr(url.replace(f":{port}/", f":{proxy.port}/"))
        consumer_settings = settings.model_copy(update={"rabbitmq_url": proxied})
        stop = StopFlag()
        consumer = Consumer(consumer_settings, make_worker(), db, stop)
        errors: list[BaseException] = []

        def consume() -> None:
            try:
                consumer.run()
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=consume)
        thread.start()
        try:
            wait_for(lambda: len(proxy.attempts) >= 2 or errors != [], 10, "a second attempt")
            assert errors == []
            proxy.restore()
            email_id = create_email(db)
            connection = pika.BlockingConnection(connection_parameters(url))
            try:
                channel = connection.channel()
                declare_topology(channel, settings.email_queue)
                body = relay(db, email_id).encode()
                channel.basic_publish("", settings.email_queue, body, message_properties("test"))
            finally:
                connection.close()
            wait_for(lambda: email_id in smtp_sink.by_email_id(), 20, "the delivery")
        finally:
            stop.requested = True
            thread.join(10)
    assert errors == []
    assert not thread.is_alive()


def test_sigterm_ends_a_record_waiting_for_the_database(
    *,
    db: Engine,
    smtp_sink: SmtpSink,
    settings: Settings,
    tmp_path: Path,
    database_url: str,
    db_proxy: tuple[FaultProxy, Engine],
) -> None:
    """A worker retries a pending record until MySQL answers, but not past a SIGTERM: it
    gives the message back (the email's recovery row brings it back) and exits 0."""
    proxy, _ = db_proxy
    proxied_url = make_url(database_url).set(port=proxy.port)
    env = worker_env(
        settings, smtp_sink, DATABASE_URL=proxied_url.render_as_string(hide_password=False)
    )
    email_id = create_email(db, to=["slow@example.com"])
    smtp_sink.script("slow@example.com", "slow:0.3 250 2.0.0 OK")
    connection = pika.BlockingConnection(
        connection_parameters(settings.rabbitmq_url.get_secret_value())
    )
    channel = connection.channel()
    declare_topology(channel, settings.email_queue)
    log_file = tmp_path / "worker.log"
    with log_file.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "services.worker"], cwd=ROOT, env=env, stderr=log
        )
    try:
        body = relay(db, email_id).encode()
        channel.basic_publish("", settings.email_queue, body, message_properties("test"))
        wait_for(lambda: smtp_sink.handler.transactions == 1, 20, "the send")
        proxy.cut()
        wait_for(
            lambda: "retrying the record until it answers" in log_file.read_text(),
            10,
            "the record retries",
        )
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        proxy.restore()
        if process.poll() is None:
            process.kill()
            process.wait()
        connection.close()
    log_text = log_file.read_text()
    assert f"email {email_id} attempt 1: sent not recorded; requeueing" in log_text
    assert "(stop requested)" in log_text
    assert email_row(db, email_id).status == "sending"  # the recovery path owns it now
