"""``python -m services.worker``: consume delivery messages and hand each to ``Worker``.

The loop owns the broker side only: connect, declare, consume with manual acks, turn the
worker's ``Decision`` into ack / reject (dead-letter) / nack-requeue, and reconnect with
capped backoff when RabbitMQ goes away. When the worker gives a message back because
MySQL is unavailable, the loop stops taking messages until ``SELECT 1`` answers again,
rather than cycling the queue (each requeue counts towards the delivery limit).

A message whose handling raises (a bug, not a decision) is given back a few times, in
case the cause was passing, and then dead-lettered: ``BUG_DELIVERIES`` deliveries in all,
counted by the quorum queue's ``x-delivery-count``, rather than the queue's delivery limit
(20) of crashes.

When an attempt could not even open an SMTP session (server down, silent, TLS or AUTH
misconfigured), that email gets its transient attempt and its retry as usual, and the
loop then stops taking messages until a probe opens a session again (0.5 s doubling to
5 s, heartbeats serviced): an outage costs each waiting email nothing, instead of one
attempt per message per backoff until MAX_ATTEMPTS turns them all ``failed``.

SIGTERM and SIGINT only set a flag. The message in hand is finished - a blocking SMTP
exchange is never cut in the middle - then the connection is closed, which returns every
unacked prefetched message to the queue, and the process exits 0. ``consume`` wakes up
twice a second without a message, so the flag is seen promptly on an idle queue.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType

import pika
import pika.exceptions
import sqlalchemy as sa
from pika.adapters.blocking_connection import BlockingChannel
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from services.core.broker import (
    RECONNECT_FIRST_SECONDS,
    RECONNECT_MAX_SECONDS,
    RECONNECT_QUIET_SECONDS,
    blocking_connection,
    declare_topology,
)
from services.core.db import create_db_engine
from services.core.fastpath import FastPath
from services.core.logs import configure_logging
from services.core.settings import Settings, mask_url
from services.worker.smtp import SmtpSender
from services.worker.worker import Decision, Worker

log = logging.getLogger("services.worker")

CONSUME_WAKEUP_SECONDS = 0.5
DB_PAUSE_FIRST, DB_PAUSE_MAX = 0.5, 15.0
SMTP_PAUSE_FIRST, SMTP_PAUSE_MAX = 0.5, 5.0
BUG_DELIVERIES = 3  # deliveries of a message whose handling raises, before dead-lettering
# Messages handled together: one claim transaction, then one record per send. What a
# batch costs once - the claim transaction, two Redis round trips, one ack - spread over
# 50 emails instead of 10 took one worker from ~600 to ~850 deliveries/s. A worker
# killed mid-batch leaves the batch's other emails to come back when their lease ends.
BATCH_MAX = 50
_BROKER_ERRORS = (pika.exceptions.AMQPError, OSError)


@dataclass(frozen=True, slots=True)
class _Delivery:
    tag: int
    body: bytes
    deliveries: int  # this one included

    @classmethod
    def of(
        cls, method: pika.spec.Basic.Deliver, properties: pika.BasicProperties, body: bytes
    ) -> _Delivery:
        return cls(method.delivery_tag, body, _delivery_count(properties) + 1)


class StopFlag:
    """Set from a signal handler; read by the loop between messages and while waiting."""

    def __init__(self) -> None:
        self.requested = False

    def request(self, signum: int, _frame: FrameType | None) -> None:
        self.requested = True

    def sleep(self, seconds: float, connection: pika.BlockingConnection | None = None) -> None:
        """Sleep in short slices (servicing broker heartbeats if given a connection)."""
        deadline = time.monotonic() + seconds
        while not self.requested and (left := deadline - time.monotonic()) > 0:
            step = min(left, CONSUME_WAKEUP_SECONDS)
            if connection is not None:
                connection.sleep(step)
            else:
                time.sleep(step)


class Consumer:
    def __init__(self, settings: Settings, worker: Worker, engine: Engine, stop: StopFlag):
        self._settings = settings
        self._worker = worker
        self._engine = engine
        self._stop = stop
        self._reconnect_delay = RECONNECT_FIRST_SECONDS
        self._down_since: float | None = None  # first failure of this outage
        self._last_warning = 0.0

    def run(self) -> None:
        while not self._stop.requested:
            try:
                self._consume()
            except _BROKER_ERRORS as exc:
                self._unavailable(exc)
                self._stop.sleep(self._reconnect_delay)
                self._reconnect_delay = min(self._reconnect_delay * 2, RECONNECT_MAX_SECONDS)

    def _unavailable(self, exc: BaseException) -> None:
        """One warning when the broker goes away, then one per RECONNECT_QUIET_SECONDS."""
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = now
        if now - self._last_warning < RECONNECT_QUIET_SECONDS:
            return
        self._last_warning = now
        log.warning(
            "RabbitMQ unavailable for %.0f s (%s: %s); retrying every %.1f s at most",
            now - self._down_since,
            type(exc).__name__,
            exc,
            RECONNECT_MAX_SECONDS,
        )

    def _consume(self) -> None:
        queue = self._settings.email_queue
        connection = blocking_connection(self._settings.rabbitmq_url.get_secret_value())
        try:
            channel = connection.channel()
            declare_topology(channel, queue)
            channel.basic_qos(prefetch_count=self._settings.worker_prefetch)
            if self._down_since is not None:
                log.info("RabbitMQ is back after %.1f s", time.monotonic() - self._down_since)
            log.info("consuming from %s (prefetch %d)", queue, self._settings.worker_prefetch)
            self._reconnect_delay = RECONNECT_FIRST_SECONDS
            self._down_since = None
            self._last_warning = 0.0
            stream = channel.consume(queue, inactivity_timeout=CONSUME_WAKEUP_SECONDS)
            for first in stream:
                if self._stop.requested:
                    break
                if first[0] is None:
                    continue
                batch = [_Delivery.of(*first)]
                # Whatever else pika already holds joins the batch: no waiting for more.
                for _ in range(min(channel.get_waiting_message_count(), BATCH_MAX - 1)):
                    more = next(stream)
                    if more[0] is None:
                        break
                    batch.append(_Delivery.of(*more))
                self._settle(connection, channel, batch)
            if self._stop.requested:
                log.info("stop requested: returning unacked messages to %s", queue)
            else:  # the stream ends when the broker cancels the consumer (queue deleted)
                log.warning("rabbitmq cancelled the consumer of %s; declaring it again", queue)
        finally:
            with contextlib.suppress(*_BROKER_ERRORS):  # gone already: the broker requeues
                connection.close()

    def _settle(
        self,
        connection: pika.BlockingConnection,
        channel: BlockingChannel,
        batch: list[_Delivery],
    ) -> None:
        try:
            decisions = self._worker.handle_batch(
                [d.body for d in batch], pause=self._pause(connection)
            )
        except Exception:  # a bug must not kill the consumer, nor loop the messages
            for delivery in batch:
                if delivery.deliveries >= BUG_DELIVERIES:
                    log.exception(
                        "unexpected error handling a message (delivery %d): dead-lettering it"
                        " to %s",
                        delivery.deliveries,
                        self._settings.dlq_name,
                    )
                    channel.basic_reject(delivery.tag, requeue=False)
                else:
                    log.exception(
                        "unexpected error handling a message (delivery %d of at most %d);"
                        " requeueing",
                        delivery.deliveries,
                        BUG_DELIVERIES,
                    )
                    channel.basic_nack(delivery.tag, requeue=True)
            return
        requeued = False
        if all(decision is Decision.ACK for decision in decisions):
            # Every delivery before this batch is settled already: one frame acks it all.
            channel.basic_ack(batch[-1].tag, multiple=True)
        else:
            for delivery, decision in zip(batch, decisions, strict=True):
                if decision is Decision.ACK:
                    channel.basic_ack(delivery.tag)
                elif decision is Decision.REJECT:
                    channel.basic_reject(delivery.tag, requeue=False)
                else:
                    channel.basic_nack(delivery.tag, requeue=True)
                    requeued = True
        if requeued:
            self._wait_for_database(connection)
        if self._worker.smtp_down:
            self._wait_for_smtp(connection)

    def _pause(self, connection: pika.BlockingConnection) -> Callable[[float], bool]:
        """A wait for inside ``handle`` (record retries while MySQL is away) that keeps
        servicing the broker's heartbeats - once the connection is gone, a plain wait, so
        that the record is still retried (the ack fails and the loop reconnects
        afterwards) - and answers False once a stop is requested."""

        def pause(seconds: float) -> bool:
            try:
                self._stop.sleep(seconds, connection)
            except _BROKER_ERRORS:
                self._stop.sleep(seconds)
            return not self._stop.requested

        return pause

    def _wait_for_database(self, connection: pika.BlockingConnection) -> None:
        delay = DB_PAUSE_FIRST
        while not self._stop.requested and not _database_answers(self._engine):
            log.warning("database unavailable: consumption paused for %.1fs", delay)
            self._stop.sleep(delay, connection)
            delay = min(delay * 2, DB_PAUSE_MAX)

    def _wait_for_smtp(self, connection: pika.BlockingConnection) -> None:
        delay = SMTP_PAUSE_FIRST
        while not self._stop.requested:
            log.warning("SMTP server unavailable: consumption paused for %.1fs", delay)
            self._stop.sleep(delay, connection)
            if self._stop.requested:
                return
            if self._worker.smtp_recovered():
                log.info("SMTP server reachable again: consuming")
                return
            delay = min(delay * 2, SMTP_PAUSE_MAX)


def _delivery_count(properties: pika.BasicProperties | None) -> int:
    """How often the broker delivered this message before (quorum queues count it)."""
    headers = getattr(properties, "headers", None) or {}
    count = headers.get("x-delivery-count", 0)
    return count if isinstance(count, int) and not isinstance(count, bool) else 0


def _database_answers(engine: Engine) -> bool:
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except SQLAlchemyError:
        return False
    return True


def main() -> int:
    settings = Settings()
    configure_logging(settings.log_level)
    stop = StopFlag()
    signal.signal(signal.SIGTERM, stop.request)
    signal.signal(signal.SIGINT, stop.request)

    engine = create_db_engine(
        settings.database_url.get_secret_value(), pool_size=2, pre_ping=False, multi_statements=True
    )
    fastpath = FastPath(settings.redis_url.get_secret_value(), namespace=settings.email_queue)
    sender = SmtpSender(settings)
    worker = Worker(settings, engine, sender, fastpath)
    log.info(
        "worker starting: queue=%s broker=%s smtp=%s:%d security=%s redis=%s",
        settings.email_queue,
        mask_url(settings.rabbitmq_url.get_secret_value()),
        settings.smtp_host,
        settings.smtp_port,
        settings.smtp_security,
        "on" if fastpath.enabled else "off",
    )
    try:
        Consumer(settings, worker, engine, stop).run()
    finally:
        worker.close()
        sender.close()
        fastpath.close()
        engine.dispose()
    log.info("worker stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
