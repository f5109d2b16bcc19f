"""Relay faults (FAULTS.md, "Relay"): crashes between confirm and commit, repeated
kill -9, several relays side by side."""

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
