"""Worker faults (FAULTS.md, "Worker and SMTP"): kill -9 during a drain, a crash between
the SMTP 250 and the commit, poison messages, one message handed to two workers at once.

Every scenario runs the real api, relay and worker processes and settles the ledger.
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from datetime import UTC, datetime, timedelta

import pika
import pytest
import redis
import sqlalchemy as sa
from pydantic import SecretStr
from sqlalchemy.engine import Engine

from services.core.broker import connection_parameters, declare_topology, message_properties
from services.core.messages import DeliveryMessage
from services.core.schema import attempts, emails
from services.worker.__main__ import BATCH_MAX
from tests.conftest import API_KEY
from tests.faults.ledger import Ledger, scaled, settle
from tests.faults.scenario import bodies, quiesce, wait_until
from tests.support.smtp_sink import SmtpSink
from tests.support.stack import Stack

LOST_WORKER = "worker lost during delivery%"


def lost_worker_attempts(db: Engine) -> Counter[str]:
    """email id -> attempts recorded as "worker lost during delivery; outcome unknown"."""
    with db.connect() as conn:
        rows = conn.execute(
            sa.select(attempts.c.email_id).where(attempts.c.error.like(LOST_WORKER))
        )
        return Counter(r.email_id for r in rows)


def statuses(db: Engine) -> Counter[str]:
    with db.connect() as conn:
        return Counter(
            r.status
            for r in conn.execute(sa.select(emails.c.status).where(emails.c.status.is_not(None)))
        )


def publish_raw(stack: Stack, bodies_: list[bytes]) -> None:
    """Straight into the email queue through the default exchange, as a relay would."""
    connection = pika.BlockingConnection(
        connection_parameters(stack.settings.rabbitmq_url.get_secret_value())
    )
    try:
        channel = connection.channel()
        declare_topology(channel, stack.settings.email_queue)
        channel.confirm_delivery()
        for i, body in enumerate(bodies_):
            channel.basic_publish(
                "",
                stack.settings.email_queue,
                body,
                message_properties(f"test-{i}"),
                mandatory=True,
            )
    finally:
        connection.close()


def queue_depth(stack: Stack, queue: str) -> int:
    connection = pika.BlockingConnection(
        connection_parameters(stack.settings.rabbitmq_url.get_secret_value())
    )
    try:
        return int(connection.channel().queue_declare(queue, passive=True).method.message_count)
    finally:
        connection.close()


# --- 1. kill -9 during a drain --------------------------------------------------------


def test_worker_killed_during_a_drain_loses_nothing(
    stack: Stack, db: Engine, smtp_sink: SmtpSink
) -> None:
    n, kills = scaled(1500), 3
    stack.start_api()
    stack.start("relay")
    ledger = Ledger()
    ledger.submit(
        stack.client(API_KEY), bodies(n, datetime.now(UTC) + timedelta(seconds=1)), batch=100
    )
    assert len(ledger.accepted) == n
    step = max(1, n // (kills + 2))
    for _ in range(kills):
        before = len(smtp_sink.received)
        worker = stack.start("worker", WORKER_PREFETCH="50")
        # mid-drain: this worker has delivered some and holds up to 50 unacked messages
        wait_until(lambda b=before: len(smtp_sink.received) >= b + step, 60, "a partial drain")
        worker.signal(signal.SIGKILL)
        assert worker.popen.wait(10) == -signal.SIGKILL
    stack.start("worker", WORKER_PREFETCH="50")
    quiesce(stack, ledger, db)
    figures = settle("worker kill -9 x3 during a drain (prefetch 50)", ledger, db, smtp_sink)
    figures.assert_guarantees(max_dup=kills)

    # A kill interrupts at most the batch the worker had claimed: each of those shows a
    # "worker lost" attempt (outcome unknown), and only such an email may have reached
    # the server twice - at most one per kill, the one past its 250 and not yet recorded.
    lost = lost_worker_attempts(db)
    assert len(lost) <= kills * BATCH_MAX, lost
    dups = {i: len(d) - 1 for i, d in smtp_sink.by_email_id().items() if len(d) > 1}
    assert set(dups) <= set(lost), (dups, lost)
    assert sum(dups.values()) <= kills
    assert statuses(db) == Counter({"sent": n})
    print(f"kills={kills} interrupted={len(lost)} duplicated={len(dups)}")


# --- 2. crash between the 250 and the commit ------------------------------------------


def test_crash_after_250_before_commit_sends_one_extra_copy_per_crash(
    stack: Stack, db: Engine, smtp_sink: SmtpSink
) -> None:
    n, injections = scaled(600), 3
    stack.start_api()
    stack.start("relay")
    ledger = Ledger()
    ledger.submit(stack.client(API_KEY), bodies(n, datetime.now(UTC)), batch=100)
    for _ in range(injections):
        doomed = stack.start("worker", crash="after-250 40", WORKER_PREFETCH="20")
        assert doomed.popen.wait(60) == -signal.SIGKILL, doomed.log()
        assert "crash hook: SIGKILL at send_record call 40" in doomed.log()
    stack.start("worker", WORKER_PREFETCH="20")
    quiesce(stack, ledger, db)
    figures = settle("worker SIGKILL after 250, before commit x3", ledger, db, smtp_sink)
    figures.assert_guarantees(max_dup=injections)
    assert figures.dup == injections  # exactly one extra copy per injection

    # Emails with an interrupted attempt: the one in flight at each crash (sent twice)
    # and any batch-mates it had claimed but not tried yet (sent once). The database
    # cannot tell the two apart, so both show the attempt as "outcome unknown".
    lost = lost_worker_attempts(db)
    client = stack.client(API_KEY)
    deliveries = smtp_sink.by_email_id()
    extra = {email_id: len(deliveries[email_id]) - 1 for email_id in lost}
    assert sum(extra.values()) == injections, (extra, lost)
    for email_id, interrupted in lost.items():
        copies = deliveries[email_id]
        assert extra[email_id] <= interrupted  # at most one extra copy per crash on it
        resource = client.get(f"/v1/emails/{email_id}").json()
        assert {c.message_id for c in copies} == {resource["message_id"]}  # same Message-ID
        assert resource["status"] == "sent"
        items = client.get(f"/v1/emails/{email_id}/attempts").json()["items"]
        assert [a["outcome"] for a in items] == ["transient_error"] * interrupted + ["sent"]
        assert items[0]["error"].startswith("worker lost during delivery")
        assert [a["number"] for a in items] == list(range(1, interrupted + 2))
    assert statuses(db) == Counter({"sent": n})


# --- 7. poison messages ---------------------------------------------------------------


POISON = [
    b"\xff\xfe\x00 not even utf-8",
    b"not json at all",
    b"[1, 2, 3]",
    b'{"email_id": 42, "version": 1}',
    b'{"email_id": "0190c0de-0000-7000-8000-000000000000"}',
    b'{"email_id": "0190c0de-0000-7000-8000-000000000000", "version": 0}',
    b'{"email_id": "0190c0de-0000-7000-8000-000000000001", "version": 1}',  # unknown id
    b'{"email_id": "0190c0de-0000-7000-8000-000000000002", "version": 7}',  # unknown id
    b'{"email_id": "' + b"x" * 37 + b'", "version": 1}',
    b'{"email_id": "1", "version": true}',
    b'{"email_id": "\\ud800", "version": 1}',  # a lone surrogate: cannot be encoded for Redis/MySQL
    b'{"email_id": "0190C0DE-0000-7000-8000-00000000000G", "version": 1}',
]


def test_poison_messages_are_dead_lettered_once_and_innocents_delivered(
    stack: Stack, db: Engine, smtp_sink: SmtpSink
) -> None:
    n = scaled(400)
    stack.start_api()
    stack.start("relay")
    worker = stack.start("worker")
    ledger = Ledger()
    client = stack.client(API_KEY)
    half = n // 2
    ledger.submit(client, bodies(half, datetime.now(UTC), prefix="a"), batch=50)
    publish_raw(stack, POISON)  # in the middle of the innocent traffic
    ledger.submit(client, bodies(n - half, datetime.now(UTC), prefix="b"), batch=50)
    publish_raw(stack, POISON)
    quiesce(stack, ledger, db)
    dlq = stack.settings.dlq_name
    wait_until(lambda: queue_depth(stack, dlq) >= 2 * len(POISON), 20, "the dead letters")
    time.sleep(2.0)  # a message that loops would come round again by now
    assert queue_depth(stack, dlq) == 2 * len(POISON)
    assert queue_depth(stack, stack.settings.email_queue) == 0
    log = worker.log()
    dead_lettered = log.count("dead-lettering")
    assert dead_lettered == 2 * len(POISON), (dead_lettered, log[-3000:])  # each seen once
    assert "unexpected error" not in log, log[-3000:]
    settle("poison messages among innocents", ledger, db, smtp_sink).assert_guarantees()


# --- 8. one message, two workers ------------------------------------------------------


@pytest.mark.parametrize("redis_mode", ["redis", "no-redis", "redis-flushed"])
def test_same_message_to_two_workers_is_sent_once(
    stack: Stack,
    db: Engine,
    smtp_sink: SmtpSink,
    redis_client: redis.Redis,
    redis_mode: str,
) -> None:
    n = scaled(600)
    if redis_mode == "no-redis":  # every process, the API included, without Redis
        stack.settings = stack.settings.model_copy(update={"redis_url": SecretStr("")})
    stack.start_api()
    workers = [stack.start("worker", WORKER_PREFETCH="10") for _ in range(2)]
    ledger = Ledger()
    ledger.submit(stack.client(API_KEY), bodies(n, datetime.now(UTC)), batch=100)
    # Each message twice, back to back: the broker hands consecutive messages to the two
    # consumers in turn, so both workers hold "deliver email X v1" at the same moment.
    pairs = [DeliveryMessage(i, 1).encode() for i in ledger.accepted for _ in range(2)]
    prefix = f"emailsched:{stack.settings.email_queue}:"
    if redis_mode != "redis-flushed":
        publish_raw(stack, pairs)
    else:
        third = len(pairs) // 3
        for chunk in (pairs[:third], pairs[third : 2 * third]):
            publish_raw(stack, chunk)
            time.sleep(0.5)
            keys = list(redis_client.scan_iter(prefix + "*"))
            if keys:
                redis_client.delete(*keys)  # only this test's namespace, never FLUSHDB
        publish_raw(stack, pairs[2 * third :])  # Redis fills again from here
    stack.start("relay")  # and the relay's own copy of every message on top
    quiesce(stack, ledger, db)
    time.sleep(1.0)
    figures = settle(f"same message to 2 workers ({redis_mode})", ledger, db, smtp_sink)
    figures.assert_guarantees()
    assert smtp_sink.handler.transactions == n  # one SMTP send per email, not just arrival
    with db.connect() as conn:
        tries = Counter(r.attempts for r in conn.execute(sa.select(emails.c.attempts)))
    assert tries == Counter({1: n})
    remembered = sum(1 for _ in redis_client.scan_iter(prefix + "v:*"))
    if redis_mode == "no-redis":
        assert remembered == 0
    else:
        assert remembered > 0
    for worker in workers:
        assert "sent" in worker.log()  # both took part
