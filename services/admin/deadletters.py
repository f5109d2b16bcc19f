"""The dead-letter queue ``<EMAIL_QUEUE>.dlq``, seen and emptied by an operator.

``list`` reads up to ``limit`` messages without taking them: each is fetched unacked and
handed back when the channel closes (RabbitMQ 3.x counts no delivery limit on the
dead-letter queue, so looking is harmless). For each it shows the email id and version
the message names, why and how often RabbitMQ dead-lettered it (``x-death``), and the
email as MySQL has it now.

``requeue`` moves messages back to ``<EMAIL_QUEUE>``: each is published with publisher
confirms (``mandatory``, persistent) and only acked from the dead-letter queue after the
broker confirmed the copy, so a crash in between leaves at worst two copies, which the
worker's version check turns into one send, never zero. A message for an email that has
since moved on (a newer version, or cancelled) is harmless: the worker drops it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import pika
import sqlalchemy as sa
from pika.adapters.blocking_connection import BlockingChannel
from sqlalchemy.engine import Engine

from services.core.broker import blocking_connection, dead_letter_queue, declare_topology
from services.core.errors import PoisonMessage
from services.core.messages import DeliveryMessage
from services.core.schema import emails
from services.core.settings import Settings


@dataclass(frozen=True, slots=True)
class EmailState:
    status: str
    version: int
    attempts: int
    last_error: str | None
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One message in the dead-letter queue, as far as it can be understood."""

    email_id: str | None  # None: the body names no email (a poison message)
    version: int | None
    reason: str  # x-death reason: rejected, delivery_limit, expired, maxlen, ...
    count: int  # how many times it was dead-lettered for that reason from that queue
    source_queue: str
    body: bytes
    problem: str | None  # why the body could not be decoded
    email: EmailState | None = None  # the email as MySQL has it now

    def line(self) -> str:
        who = f"{self.email_id} v{self.version}" if self.email_id else "(undecodable)"
        death = f"{self.reason} x{self.count} from {self.source_queue or '?'}"
        if self.problem is not None:
            return f"{who}  {death}  {self.problem}: {self.body[:80]!r}"
        if self.email is None:
            return f"{who}  {death}  email: not in the database"
        state = self.email
        error = f"  last_error={state.last_error!r}" if state.last_error else ""
        return (
            f"{who}  {death}  email: {state.status} v{state.version}"
            f" attempts={state.attempts}{error}"
        )


def describe(body: bytes, headers: dict[str, Any] | None) -> DeadLetter:
    """What a dead-lettered message is about, from its body and ``x-death`` header."""
    deaths = (headers or {}).get("x-death") or []
    first = deaths[0] if deaths and isinstance(deaths[0], dict) else {}
    reason = _text(first.get("reason")) or "unknown"
    count = int(first.get("count") or 0)
    source = _text(first.get("queue"))
    try:
        message = DeliveryMessage.decode(body)
    except PoisonMessage as exc:
        return DeadLetter(None, None, reason, count, source, body, str(exc))
    return DeadLetter(message.email_id, message.version, reason, count, source, body, None)


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return "" if value is None else str(value)


def email_states(engine: Engine, ids: list[str]) -> dict[str, EmailState]:
    if not ids:
        return {}
    query = sa.select(
        emails.c.id,
        emails.c.status,
        emails.c.version,
        emails.c.attempts,
        emails.c.last_error,
        emails.c.updated_at,
    ).where(emails.c.id.in_(ids))
    with engine.connect() as conn:
        return {
            row.id: EmailState(
                row.status, row.version, row.attempts, row.last_error, row.updated_at
            )
            for row in conn.execute(query)
        }


@contextmanager
def _channel(settings: Settings) -> Iterator[BlockingChannel]:
    connection = blocking_connection(settings.rabbitmq_url.get_secret_value())
    try:
        channel = connection.channel()
        declare_topology(channel, settings.email_queue)
        yield channel
    finally:
        if connection.is_open:
            connection.close()  # every unacked message goes back to its queue


def _fetch(channel: BlockingChannel, queue: str, limit: int) -> Iterator[tuple[Any, Any, bytes]]:
    """Up to ``limit`` messages, unacked, each at most once (held until the channel closes)."""
    waiting = int(channel.queue_declare(queue, passive=True).method.message_count)
    for _ in range(min(limit, waiting)):
        method, properties, body = channel.basic_get(queue, auto_ack=False)
        if method is None:
            return
        yield method, properties, body


def list_dead_letters(settings: Settings, engine: Engine, limit: int = 100) -> list[DeadLetter]:
    queue = dead_letter_queue(settings.email_queue)
    with _channel(settings) as channel:
        found = [
            describe(body, properties.headers)
            for _m, properties, body in _fetch(channel, queue, limit)
        ]
    states = email_states(engine, [d.email_id for d in found if d.email_id])
    return [replace(d, email=states.get(d.email_id or "")) for d in found]


def requeue(
    settings: Settings, *, email_id: str | None = None, limit: int = 1_000_000
) -> list[DeadLetter]:
    """Move dead letters (all, or those naming ``email_id``) back to the email queue.

    Each is acked from the dead-letter queue only after the broker confirmed its copy.
    """
    source = dead_letter_queue(settings.email_queue)
    moved: list[DeadLetter] = []
    with _channel(settings) as channel:
        channel.confirm_delivery()
        for method, properties, body in _fetch(channel, source, limit):
            letter = describe(body, properties.headers)
            if email_id is not None and letter.email_id != email_id:
                continue  # not acked: returns to the dead-letter queue at the end
            channel.basic_publish(
                exchange="",
                routing_key=settings.email_queue,
                body=body,
                properties=pika.BasicProperties(
                    content_type=properties.content_type,
                    delivery_mode=pika.DeliveryMode.Persistent,
                    message_id=properties.message_id,
                    headers=properties.headers,
                ),
                mandatory=True,
            )  # returns once confirmed; raises (and acks nothing) if nacked or unroutable
            channel.basic_ack(method.delivery_tag)
            moved.append(letter)
    return moved
