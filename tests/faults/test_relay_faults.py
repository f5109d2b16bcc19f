"""Relay faults (FAULTS.md, "Relay"): crashes between confirm and commit, repeated
kill -9, several relays side by side, and the email queue deleted under a running relay
(what the ``mandatory`` flag is for)."""

from __future__ import annotations

import signal
import time
from datetime import UTC, datetime, timedelta

import pika
from sqlalchemy.engine import Engine

from services.core.broker import connection_parameters
from tests.conftest import API_KEY
from tests.faults.ledger import Ledger, scaled, settle
from tests.faults.scenario import bodies, quiesce, unpublished, wait_until
from tests.support.smtp_sink import SmtpSink
from tests.support.stack import Stack


def queued_messages(stack: Stack) -> int:
    url = stack.settings.rabbitmq_url.get_secret_value()
    connection = pika.BlockingConnection(connection_parameters(url))
    try:
        declared = connection.channel().queue_declare(stack.settings.email_queue, passive=True)
        return int(declared.method.message_count)
    finally:
        connection.close()


def delete_queue(stack: Stack) -> None:
    url = stack.settings.rabbitmq_url.get_secret_value()
    connection = pika.BlockingConnection(connection_parameters(url))
    try:
        connection.channel().queue_delete(stack.settings.email_queue)
    finally:
        connection.close()


def test_queue_deleted_under_a_running_relay_loses_nothing(
    stack: Stack, db: Engine, smtp_sink: SmtpSink
) -> None:
    """Publishes to a queue that is gone come back as returns (``mandatory``), never as
    confirms of messages that went nowhere; the relay declares the queue again and the
    rows are published on their next attempt."""
    n = scaled(500)
    stack.start_api()
    relay = stack.start("relay")
    wait_until(lambda: "rabbitmq connected" in relay.log(), 30, "relay connected")
    ledger = Ledger()
    send_at = datetime.now(UTC) + timedelta(seconds=3)
    ledger.submit(stack.client(API_KEY), bodies(n, send_at), batch=100)
    delete_queue(stack)  # no worker: nothing consumes, nothing declares it again but the relay
    assert datetime.now(UTC) < send_at, "the queue must be gone before the rows are due"
    wait_until(lambda: unpublished(db) == 0, 60, "every row published after the redeclare")
    assert queued_messages(stack) == n  # each row confirmed into the queue exactly once
    assert "returned by rabbitmq: NO_ROUTE" in relay.log()  # released, not taken as sent
    assert "declaring the queues again" in relay.log()
    stack.start("worker")
    quiesce(stack, ledger, db)
    settle("email queue deleted under the relay", ledger, db, smtp_sink).assert_guarantees()


def test_several_relays_publish_each_row_exactly_once(
    stack: Stack, db: Engine, smtp_sink: SmtpSink
) -> None:
    n = scaled(2000)
    stack.start_api()
    ledger = Ledger()
    ledger.submit(
        stack.client(API_KEY), bodies(n, datetime.now(UTC) + timedelta(seconds=2)), batch=100
    )
    for _ in range(3):
        stack.start("relay")
    wait_until(lambda: unpublished(db) == 0, 60, "every outbox row published")
    time.sleep(0.5)  # a duplicate publish would land by now
    assert queued_messages(stack) == n  # no worker yet: the queue holds every publish
    stack.start("worker")
    quiesce(stack, ledger, db)
    settle("3 relays, no fault", ledger, db, smtp_sink).assert_guarantees()


def test_relay_killed_after_confirm_before_commit_loses_and_duplicates_nothing(
    stack: Stack, db: Engine, smtp_sink: SmtpSink
) -> None:
    n = scaled(500)
    stack.start_api()
    stack.start("worker")
    ledger = Ledger()
    ledger.submit(stack.client(API_KEY), bodies(n, datetime.now(UTC)), batch=100)
    doomed = stack.start("relay", crash="after-confirm 1")
    assert doomed.popen.wait(30) == -signal.SIGKILL
    assert "crash hook: SIGKILL at mark_published" in doomed.log()
    assert unpublished(db) > 0  # confirmed by the broker, never recorded
    stack.start("relay")  # picks the rows up again once their lease ends
    quiesce(stack, ledger, db)
    settle("relay killed after confirm, before commit", ledger, db, smtp_sink).assert_guarantees()


def test_relay_killed_every_few_seconds_during_a_drain(
    stack: Stack, db: Engine, smtp_sink: SmtpSink
) -> None:
    n = scaled(3000)
    stack.start_api()
    stack.start("worker")
    ledger = Ledger()
    ledger.submit(
        stack.client(API_KEY), bodies(n, datetime.now(UTC) + timedelta(seconds=1)), batch=200
    )
    lease = stack.settings.lease_seconds
    poll = stack.settings.relay_poll_interval
    for _ in range(4):
        relay = stack.start("relay")
        time.sleep(1.5)
        relay.signal(signal.SIGKILL)
        relay.popen.wait(10)
    stack.start("relay")
    # no row stays claimed longer than its lease plus one poll (and the claim lookahead)
    wait_until(lambda: unpublished(db) == 0, lease + 4 * poll + 30, "every row published")
    quiesce(stack, ledger, db)
    settle("relay kill -9 every 1.5 s", ledger, db, smtp_sink).assert_guarantees()
