"""Operator tooling against the real RabbitMQ and MySQL: ``emailsched-admin dlq list``
and ``dlq requeue``, and what an operator sees through the API when something is stuck.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pika
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from pika.adapters.blocking_connection import BlockingChannel
from pydantic import SecretStr
from sqlalchemy.engine import Engine

from services.admin import deadletters
from services.api.app import create_app
from services.core import outbox as core_outbox
from services.core.broker import connection_parameters, declare_topology, message_properties
from services.core.messages import DeliveryMessage
from services.core.schema import emails, outbox
from services.core.settings import Settings
from tests.conftest import API_KEY
from tests.support.stack import ROOT, settings_env

AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture
def client(settings: Settings, db: Engine) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture
def channel(settings: Settings) -> Iterator[BlockingChannel]:
    connection = pika.BlockingConnection(
        connection_parameters(settings.rabbitmq_url.get_secret_value())
    )
    channel = connection.channel()
    declare_topology(channel, settings.email_queue)
    yield channel
    connection.close()


def admin(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """The console command as an operator runs it, settings from the environment."""
    env = {**os.environ, **settings_env(settings)}
    return subprocess.run(
        [sys.executable, "-m", "services.admin", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def count(channel: BlockingChannel, queue: str) -> int:
    return int(channel.queue_declare(queue, passive=True).method.message_count)


def wait_count(channel: BlockingChannel, queue: str, expected: int) -> None:
    deadline = time.monotonic() + 10
    while count(channel, queue) != expected:
        assert time.monotonic() < deadline, f"{queue}: {count(channel, queue)} != {expected}"
        channel.connection.sleep(0.1)


def dead_letter(channel: BlockingChannel, queue: str, body: bytes, message_id: str) -> None:
    """Publish to the email queue, take it like a worker would, and reject it."""
    channel.basic_publish("", queue, body, message_properties(message_id), mandatory=True)
    wait_count(channel, queue, 1)
    method, _properties, got = channel.basic_get(queue, auto_ack=False)
    assert method is not None
    assert got == body
    channel.basic_reject(method.delivery_tag, requeue=False)


def test_list_shows_and_requeue_moves_back_after_the_confirm(
    settings: Settings, db: Engine, client: TestClient, channel: BlockingChannel
) -> None:
    queue, dlq = settings.email_queue, settings.dlq_name
    created = client.post(
        "/v1/emails", json={"to": ["a@example.com"], "subject": "s", "text": "x"}, headers=AUTH
    ).json()
    email_id = created["id"]
    with db.begin() as conn:  # as if the relay had published it
        conn.execute(emails.update().where(emails.c.id == email_id).values(status="queued"))
    message = DeliveryMessage(email_id, 1)
    dead_letter(channel, queue, message.encode(), message.message_id)
    dead_letter(channel, queue, b"\x00not json", "poison")
    wait_count(channel, dlq, 2)

    listed = admin(settings, "dlq", "list")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert f"{email_id} v1  rejected x1 from {queue}  email: queued v1 attempts=0" in lines
    assert any(line.startswith("(undecodable)  rejected x1") for line in lines), lines
    assert lines[-1] == f"2 message(s) shown from {dlq}"
    wait_count(channel, dlq, 2)  # looking took nothing away
    # the API tells the same story: the email waits, queued, nothing attempted
    seen = client.get(f"/v1/emails/{email_id}", headers=AUTH).json()
    assert (seen["status"], seen["attempts"]) == ("queued", 0)

    moved = admin(settings, "dlq", "requeue", "--email-id", email_id)
    assert moved.returncode == 0, moved.stderr
    assert moved.stdout.splitlines()[-1] == f"1 message(s) moved from {dlq} to {queue}"
    wait_count(channel, dlq, 1)  # the poison message stays
    wait_count(channel, queue, 1)
    method, properties, body = channel.basic_get(queue, auto_ack=True)
    assert method is not None
    assert DeliveryMessage.decode(body) == message
    assert properties.message_id == message.message_id
    assert properties.delivery_mode == pika.DeliveryMode.Persistent.value

    everything = admin(settings, "dlq", "requeue", "--all")
    assert everything.returncode == 0, everything.stderr
    assert everything.stdout.splitlines()[-1].startswith("1 message(s) moved")
    wait_count(channel, dlq, 0)
    wait_count(channel, queue, 1)


def test_requeue_acks_nothing_the_broker_did_not_confirm(
    settings: Settings, db: Engine, channel: BlockingChannel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy the broker refuses (here: no queue to route it to) leaves the dead letter
    where it is: the ack only ever follows a confirm."""
    orphan = settings.model_copy(update={"email_queue": settings.email_queue + "-orphan"})
    channel.queue_declare(orphan.dlq_name, durable=True, arguments={"x-queue-type": "quorum"})
    try:
        channel.basic_publish("", orphan.dlq_name, DeliveryMessage("e1", 1).encode())
        wait_count(channel, orphan.dlq_name, 1)
        monkeypatch.setattr(deadletters, "declare_topology", lambda _channel, _queue: None)
        with pytest.raises(pika.exceptions.UnroutableError):
            deadletters.requeue(orphan)
        wait_count(channel, orphan.dlq_name, 1)
    finally:
        channel.queue_delete(orphan.dlq_name)


def test_cli_usage_and_an_unreachable_broker(settings: Settings) -> None:
    assert admin(settings, "dlq", "requeue").returncode == 2
    assert admin(settings, "dlq", "requeue", "--all", "--email-id", "x").returncode == 2
    down = settings.model_copy(
        update={"rabbitmq_url": SecretStr("amqp://guest:guest@127.0.0.1:1/%2F")}
    )
    failed = admin(down, "dlq", "list")
    assert failed.returncode == 1
    assert "RabbitMQ unavailable" in failed.stderr
    assert "guest:guest" not in failed.stderr


def test_a_relay_that_cannot_publish_shows_in_the_api(
    settings: Settings, db: Engine, client: TestClient
) -> None:
    created = client.post(
        "/v1/emails", json={"to": ["a@example.com"], "subject": "s", "text": "x"}, headers=AUTH
    ).json()
    with db.begin() as conn:  # what the relay does after a nack / a returned message
        row_id = conn.execute(
            sa.select(outbox.c.id).where(outbox.c.email_id == created["id"])
        ).scalar_one()
        core_outbox.release(
            conn,
            [row_id],
            available_at=datetime.now(UTC) + timedelta(seconds=30),
            error="message returned by the broker: 312 NO_ROUTE",
        )
    seen = client.get(f"/v1/emails/{created['id']}", headers=AUTH).json()
    assert seen["last_error"] is not None
    assert "NO_ROUTE" in seen["last_error"]
