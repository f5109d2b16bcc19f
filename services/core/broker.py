"""RabbitMQ: connection parameters and the topology, owned here and nowhere else.

- ``<EMAIL_QUEUE>``: durable quorum queue. RabbitMQ 3.10 sets no delivery limit on
  quorum queues, so we set one; past it, and on every ``reject(requeue=False)``, a
  message is dead-lettered at-least-once (which needs ``x-overflow=reject-publish``).
- ``<EMAIL_QUEUE>.dlq``: durable quorum queue holding what the worker could not process.

Messages go through the default exchange with the queue name as routing key,
persistent, with ``mandatory`` so that a missing queue returns them instead of dropping.
"""

from __future__ import annotations

from typing import Any

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

DELIVERY_LIMIT = 20
HEARTBEAT_SECONDS = 30
BLOCKED_CONNECTION_TIMEOUT = 30.0
# Relay and worker reconnect after 0.25 s, doubling to at most 2 s: a broker back from an
# outage of any length is used again within about 2 s. (A connection attempt to a
# loopback or LAN broker is cheap; the warnings about it are rate-limited instead.)
RECONNECT_FIRST_SECONDS = 0.25
RECONNECT_MAX_SECONDS = 2.0
RECONNECT_QUIET_SECONDS = 30.0  # while the broker stays away, one warning per this long


def connection_parameters(url: str) -> pika.URLParameters:
    """Parameters that never hang: heartbeats, timeouts, and a deadline while blocked.

    pika's default ``blocked_connection_timeout=None`` waits forever through a broker
    resource alarm; we give up after 30 s and reconnect instead.
    """
    params = pika.URLParameters(url)
    params.heartbeat = HEARTBEAT_SECONDS
    params.blocked_connection_timeout = BLOCKED_CONNECTION_TIMEOUT
    params.socket_timeout = 10
    params.stack_timeout = 15
    params.connection_attempts = 1
    params.client_properties = {"connection_name": "emailsched"}
    return params


def reset_during_setup(error: BaseException) -> bool:
    """pika 1.x's one connection failure that is not an AMQPError nor an OSError.

    A peer that resets the TCP connection between connect and pika's transport set-up (a
    broker in the middle of stopping, a proxy or load balancer with no broker behind it)
    makes pika raise ``ValueError("Expected connected socket, but getpeername() failed")``,
    out of ``BlockingConnection()`` or out of a ``SelectConnection``'s I/O loop. It is a
    failed connection attempt like any other, to be retried like any other.
    """
    return isinstance(error, ValueError) and "getpeername() failed" in str(error)


def blocking_connection(url: str) -> pika.BlockingConnection:
    """A connection with ``connection_parameters``; a reset during set-up raises
    ``AMQPConnectionError`` like every other failed attempt."""
    try:
        return pika.BlockingConnection(connection_parameters(url))
    except ValueError as exc:
        if reset_during_setup(exc):
            reason = f"connection reset during set-up: {exc}"
            raise pika.exceptions.AMQPConnectionError(reason) from exc
        raise


def queue_arguments(queue: str) -> dict[str, Any]:
    return {
        "x-queue-type": "quorum",
        "x-delivery-limit": DELIVERY_LIMIT,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": dead_letter_queue(queue),
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


def dead_letter_queue(queue: str) -> str:
    return f"{queue}.dlq"


def declare_topology(channel: BlockingChannel, queue: str) -> None:
    """Idempotent: declaring again with the same arguments is a no-op."""
    for name, arguments in queue_declarations(queue):
        channel.queue_declare(name, durable=True, arguments=arguments)


def message_properties(message_id: str) -> pika.BasicProperties:
    return pika.BasicProperties(
        content_type="application/json",
        delivery_mode=pika.DeliveryMode.Persistent,
        message_id=message_id,
    )


def queue_declarations(queue: str) -> tuple[tuple[str, dict[str, Any]], ...]:
    """``(name, arguments)`` of every durable queue, in declaration order (dead-letter
    queue first), for callers that declare asynchronously (the relay's SelectConnection)."""
    return (
        (dead_letter_queue(queue), {"x-queue-type": "quorum"}),
        (queue, queue_arguments(queue)),
    )
