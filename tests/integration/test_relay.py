"""The relay against real MariaDB and RabbitMQ: due rows published once, on time, only
after the broker confirmed them; nothing marked published when the broker is away."""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import timedelta

import pika
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from services.core import emails, outbox
from services.core.broker import connection_parameters
from services.core.db import db_now
from services.core.delivery import LEAD
from services.core.messages import DeliveryMessage
from services.core.schema import emails as emails_table
from services.core.schema import outbox as outbox_table
from services.core.settings import Settings
from services.relay.publisher import Publisher
from services.relay.relay import Relay
from tests.support.pika_faults import slow_transport_setup
from tests.support.proxy import FaultProxy

OWNER = "o" * 32
CLOSED_PORT_URL = "amqp://guest:guest@127.0.0.1:1/%2F"


def schedule(engine: Engine, count: int, *, delay: float | None = None) -> list[str]:
    """``count`` emails due ``delay`` seconds from now on the DB clock (None: due now)."""
    ids: list[str] = []
    for start in range(0, count, 1000):
        with engine.begin() as conn:
            now = db_now(conn)
            send_at = None if delay is None else now + timedelta(seconds=delay)
            item = emails.NewEmail(
                to=["a@example.com"], from_addr="me@example.com", subject="s", send_at=send_at
            )
            ids += emails.create(conn, OWNER, [item] * min(1000, count - start), now)
    return ids


def outbox_rows(engine: Engine) -> list[sa.Row[tuple[object, ...]]]:
    with engine.connect() as conn:
        return list(conn.execute(sa.select(outbox_table)))


def published_count(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                sa.select(sa.func.count()).where(outbox_table.c.published_at.is_not(None))
            ).scalar_one()
        )


def run_until(relay: Relay, done: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "relay did not finish in time"
        relay.run_once()
        time.sleep(0.02)


def drain_queue(url: str, queue: str) -> list[DeliveryMessage]:
    """Every message in the queue, consumed until half a second passes without one."""
    connection = pika.BlockingConnection(connection_parameters(url))
    messages: list[DeliveryMessage] = []
    try:
        channel = connection.channel()
        channel.basic_qos(prefetch_count=1000)
        for method, _props, body in channel.consume(queue, auto_ack=True, inactivity_timeout=0.5):
            if method is None:
                break
            messages.append(DeliveryMessage.decode(body))
        channel.cancel()
    finally:
        connection.close()
    return messages


@pytest.fixture
def start_relay(settings: Settings, db: Engine) -> Iterator[Callable[..., Relay]]:
    relays: list[Relay] = []

    def start(
        url: str | None = None, *, wait: bool = True, relay_settings: Settings | None = None
    ) -> Relay:
        publisher = Publisher(url or settings.rabbitmq_url.get_secret_value(), settings.email_queue)
        publisher.start()
        if wait:
            assert publisher.wait_ready(10), "publisher did not connect"
        relay = Relay(db, publisher, relay_settings or settings)
        relays.append(relay)
        return relay

    yield start
    for relay in relays:
        relay.close(timeout=2)


def test_publishes_due_rows_once_and_leaves_future_ones(
    settings: Settings, db: Engine, start_relay: Callable[..., Relay]
) -> None:
    due = schedule(db, 20)
    future = schedule(db, 5, delay=3600)
    relay = start_relay()

    run_until(relay, lambda: published_count(db) == 20)
    relay.run_once()

    messages = drain_queue(settings.rabbitmq_url.get_secret_value(), settings.email_queue)
    assert sorted(m.email_id for m in messages) == sorted(due)
    assert {m.version for m in messages} == {1}
    with db.connect() as conn:
        status = dict(conn.execute(sa.select(emails_table.c.id, emails_table.c.status)).all())
    assert {status[i] for i in due} == {"queued"}
    assert {status[i] for i in future} == {"pending"}
    for row in outbox_rows(db):
        if row.email_id in future:
            assert row.published_at is None
            assert row.claimed_by is None
        else:
            assert row.published_at is not None
            assert row.publish_attempts == 1


def test_messages_arrive_a_lead_before_send_at_never_earlier(
    settings: Settings, db: Engine, start_relay: Callable[..., Relay]
) -> None:
    relay = start_relay()  # declares the queue, so the consumer can start first
    url, queue = settings.rabbitmq_url.get_secret_value(), settings.email_queue
    arrivals: list[tuple[str, float]] = []
    consuming = threading.Event()
    stop = threading.Event()

    def consume() -> None:
        connection = pika.BlockingConnection(connection_parameters(url))
        channel = connection.channel()
        consuming.set()
        for method, _props, body in channel.consume(queue, auto_ack=True, inactivity_timeout=0.05):
            if method is not None:
                arrivals.append((DeliveryMessage.decode(body).email_id, time.time()))
            if stop.is_set():
                break
        channel.cancel()
        connection.close()

    consumer = threading.Thread(target=consume)
    consumer.start()
    assert consuming.wait(5)
    ids = [i for step in range(8) for i in schedule(db, 5, delay=0.8 + 0.05 * step)]
    run_until(relay, lambda: published_count(db) == len(ids), timeout=10)
    time.sleep(0.2)
    stop.set()
    consumer.join(5)

    with db.connect() as conn:
        before = time.time()
        clock = db_now(conn)
        after = time.time()
        send_at = dict(conn.execute(sa.select(emails_table.c.id, emails_table.c.send_at)).all())
    assert sorted(i for i, _ in arrivals) == sorted(ids)
    # The DB clock at arrival is at least clock + (arrival - after): a lower bound.
    lateness = [
        (clock + timedelta(seconds=arrived - after) - send_at[i]).total_seconds()
        for i, arrived in arrivals
    ]
    print(f"lateness ms: min {min(lateness) * 1000:.2f} max {max(lateness) * 1000:.2f}")
    lead = LEAD.total_seconds()
    assert min(lateness) >= -lead - (after - before), "a message came more than a lead early"
    assert statistics.median(lateness) < 0, "published at send_at, not a lead before it"


def test_two_relays_publish_each_row_exactly_once(
    settings: Settings, db: Engine, start_relay: Callable[..., Relay]
) -> None:
    ids = schedule(db, 2000)
    relays = [start_relay(), start_relay()]
    errors: list[BaseException] = []

    def drive(relay: Relay) -> None:
        try:
            run_until(relay, lambda: published_count(db) == len(ids))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=drive, args=(r,)) for r in relays]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors
    for relay in relays:
        relay.run_once()

    messages = drain_queue(settings.rabbitmq_url.get_secret_value(), settings.email_queue)
    assert Counter(m.email_id for m in messages) == Counter(ids)
    claimers = Counter(row.claimed_by for row in outbox_rows(db))
    print(f"rows per relay: {dict(claimers)}")
    assert {row.publish_attempts for row in outbox_rows(db)} == {1}


def test_broker_unreachable_marks_nothing_published(
    db: Engine, start_relay: Callable[..., Relay]
) -> None:
    schedule(db, 10)
    relay = start_relay(CLOSED_PORT_URL, wait=False)
    time.sleep(0.3)
    for _ in range(3):
        assert relay.run_once().claimed == 0
    relay.close(timeout=1)
    with db.connect() as conn:
        now = db_now(conn)
    rows = outbox_rows(db)
    assert all(r.published_at is None and r.due_at <= now for r in rows)
    assert {r.publish_attempts for r in rows} == {0}


def test_a_reset_during_connection_setup_is_retried_like_any_failed_attempt(
    settings: Settings,
    db: Engine,
    start_relay: Callable[..., Relay],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """pika raises ValueError out of the publisher's I/O loop when the peer resets between
    connect and transport set-up (tests/support/pika_faults.py); that used to end the
    publisher's thread for good. It is a failed attempt like any other now."""
    url = settings.rabbitmq_url.get_secret_value()
    port = pika.URLParameters(url).port
    slow_transport_setup(monkeypatch, 0.3)
    with FaultProxy(port) as proxy:
        proxy.cut(reset_after=0.1)
        relay = start_relay(url.replace(f":{port}/", f":{proxy.port}/"), wait=False)
        deadline = time.monotonic() + 10
        while len(proxy.attempts) < 3:
            assert time.monotonic() < deadline, f"{len(proxy.attempts)} connection attempts"
            time.sleep(0.05)
        proxy.restore()
        schedule(db, 3)
        run_until(relay, lambda: published_count(db) == 3)


def test_rows_of_a_dead_relay_come_back_after_the_lease(
    settings: Settings, db: Engine, start_relay: Callable[..., Relay]
) -> None:
    ids = schedule(db, 3)
    lease = 1.5
    with db.begin() as conn:
        now = db_now(conn)
        dead = outbox.claim_due(
            conn,
            horizon=now,
            limit=10,
            lease_until=now + timedelta(seconds=lease),
            claimed_by="dead",
        )
    assert len(dead) == 3
    started = time.monotonic()
    relay = start_relay()
    assert relay.run_once().claimed == 0

    run_until(relay, lambda: published_count(db) == 3)
    # The relay claims up to its lookahead early (poll interval + margin).
    assert time.monotonic() - started >= lease - settings.relay_poll_interval - 0.25
    messages = drain_queue(settings.rabbitmq_url.get_secret_value(), settings.email_queue)
    assert sorted(m.email_id for m in messages) == sorted(ids)


def test_returned_message_is_not_marked_published(
    settings: Settings, db: Engine, start_relay: Callable[..., Relay]
) -> None:
    relay = start_relay()
    connection = pika.BlockingConnection(
        connection_parameters(settings.rabbitmq_url.get_secret_value())
    )
    connection.channel().queue_delete(settings.email_queue)
    connection.close()
    schedule(db, 3)

    deadline, failed = time.monotonic() + 10, 0
    while failed < 3:
        assert time.monotonic() < deadline
        failed += relay.run_once().failed
        time.sleep(0.05)

    with db.connect() as conn:
        now = db_now(conn)
    for row in outbox_rows(db):
        assert row.published_at is None
        assert row.claimed_by is None
        assert "returned" in row.last_error
        # Due again after the relay's lookahead plus a back-off, not at once.
        assert row.due_at > now + timedelta(seconds=settings.relay_poll_interval)


def test_burst_of_due_rows_drains_at_full_speed(
    settings: Settings, db: Engine, start_relay: Callable[..., Relay]
) -> None:
    count = 5000
    ids = schedule(db, count)
    relay = start_relay()
    started = time.monotonic()
    run_until(relay, lambda: published_count(db) == count, timeout=30)
    elapsed = time.monotonic() - started
    print(
        f"burst: {count} rows published and recorded in {elapsed:.2f} s = {count / elapsed:,.0f}/s"
    )
    messages = drain_queue(settings.rabbitmq_url.get_secret_value(), settings.email_queue)
    assert Counter(m.email_id for m in messages) == Counter(ids)


def test_process_publishes_and_hands_back_leased_rows_on_sigterm(
    settings: Settings, db: Engine
) -> None:
    [due] = schedule(db, 1)
    [later] = schedule(db, 1, delay=4)  # inside the 5.25 s lookahead: claimed, then held
    env = {
        **os.environ,
        "DATABASE_URL": settings.database_url.get_secret_value(),
        "RABBITMQ_URL": settings.rabbitmq_url.get_secret_value(),
        "REDIS_URL": "",
        "EMAIL_QUEUE": settings.email_queue,
        "RELAY_POLL_INTERVAL": "5",
        "LEASE_SECONDS": "60",
    }
    process = subprocess.Popen([sys.executable, "-m", "services.relay"], env=env)
    try:
        deadline = time.monotonic() + 15
        while not all(r.claimed_by for r in outbox_rows(db)):
            assert time.monotonic() < deadline, "relay process claimed nothing"
            time.sleep(0.05)
        stopped = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
        assert time.monotonic() - stopped < 5
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    rows = {r.email_id: r for r in outbox_rows(db)}
    assert rows[due].published_at is not None  # its confirm was recorded on the way out
    assert rows[later].published_at is None
    assert rows[later].claimed_by is None
    with db.connect() as conn:
        assert rows[later].due_at <= db_now(conn)  # due again now, for another relay
    messages = drain_queue(settings.rabbitmq_url.get_secret_value(), settings.email_queue)
    assert [m.email_id for m in messages] == [due]


def test_claims_start_at_the_window_floor_and_a_full_scan_finds_what_lies_below(
    settings: Settings, db: Engine, start_relay: Callable[..., Relay]
) -> None:
    """After a complete claim the next one starts just before it (purge-lag guard); a row
    that turns up below that floor - here one written with a clock 30 s behind, like a
    claim rolled back by a crashed relay - is still published by the periodic full scan."""
    relay = start_relay()
    relay.run_once()  # a full scan over an empty outbox: the floor is now "now - margin"
    with db.begin() as conn:
        now = db_now(conn)
        [email_id] = emails.create(
            conn,
            OWNER,
            [
                emails.NewEmail(
                    to=["a@example.com"], from_addr="me@example.com", subject="s", send_at=None
                )
            ],
            now - timedelta(seconds=30),
        )
        window = outbox.ScanWindow()
        window.scanned(None, now, complete=True)
        floor = window.floor()
        assert floor is not None
        below = outbox.claim_due(
            conn, horizon=now, limit=10, lease_until=now, claimed_by="probe", floor=floor
        )
        assert below == []  # the floored claim does not see it...
    started = time.monotonic()
    run_until(relay, lambda: published_count(db) == 1, timeout=15)
    # ...the relay publishes it at its next full scan (every 5 s), not at once.
    assert time.monotonic() - started >= 1.0
    [message] = drain_queue(settings.rabbitmq_url.get_secret_value(), settings.email_queue)
    assert message.email_id == email_id
