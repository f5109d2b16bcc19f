"""``python -m services.worker``: consume delivery messages and hand each to ``Worker``.

The loop owns the broker side only: connect, declare, consume with manual acks, turn the
worker's ``Decision`` into ack / reject (dead-letter) / nack-requeue, and reconnect with
capped backoff when RabbitMQ goes away. When the worker gives a message back because
MySQL is unavailable, the loop stops taking messages until ``SELECT 1`` answers again,
rather than cycling the queue (each requeue counts towards the delivery limit).

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
from types import FrameType

import pika
import pika.exceptions
import sqlalchemy as sa
from pika.adapters.blocking_connection import BlockingChannel
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from services.core.broker import connection_parameters, declare_topology
from services.core.db import create_db_engine
from services.core.fastpath import FastPath
from services.core.logs import configure_logging
from services.core.settings import Settings, mask_url
from services.worker.smtp import SmtpSender
from services.worker.worker import Decision, Worker

log = logging.getLogger("services.worker")

CONSUME_WAKEUP_SECONDS = 0.5
RECONNECT_FIRST, RECONNECT_MAX = 0.5, 30.0
DB_PAUSE_FIRST, DB_PAUSE_MAX = 0.5, 15.0
_BROKER_ERRORS = (pika.exceptions.AMQPError, OSError)


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
        self._reconnect_delay = RECONNECT_FIRST

    def run(self) -> None:
        while not self._stop.requested:
            try:
                self._consume()
            except _BROKER_ERRORS as exc:
                log.warning(
                    "RabbitMQ unavailable (%s: %s); reconnecting in %.1fs",
                    type(exc).__name__,
                    exc,
                    self._reconnect_delay,
                )
                self._stop.sleep(self._reconnect_delay)
                self._reconnect_delay = min(self._reconnect_delay * 2, RECONNECT_MAX)

    def _consume(self) -> None:
        queue = self._settings.email_queue
        connection = pika.BlockingConnection(
            connection_parameters(self._settings.rabbitmq_url.get_secret_value())
        )
        try:
            channel = connection.channel()
            declare_topology(channel, queue)
            channel.basic_qos(prefetch_count=self._settings.worker_prefetch)
            log.info("consuming from %s (prefetch %d)", queue, self._settings.worker_prefetch)
            self._reconnect_delay = RECONNECT_FIRST
            for method, _properties, body in channel.consume(
                queue, inactivity_timeout=CONSUME_WAKEUP_SECONDS
            ):
                if self._stop.requested:
                    break
                if method is not None:
                    self._settle(connection, channel, method.delivery_tag, body)
            log.info("stop requested: returning unacked messages to %s", queue)
        finally:
            with contextlib.suppress(*_BROKER_ERRORS):  # gone already: the broker requeues
                connection.close()

    def _settle(
        self,
        connection: pika.BlockingConnection,
        channel: BlockingChannel,
        tag: int,
        body: bytes,
    ) -> None:
        try:
            decision = self._worker.handle(body)
        except Exception:  # a bug must not kill the consumer; the delivery limit bounds retries
            log.exception("unexpected error handling a message; requeueing it")
            channel.basic_nack(tag, requeue=True)
            return
        if decision is Decision.ACK:
            channel.basic_ack(tag)
        elif decision is Decision.REJECT:
            channel.basic_reject(tag, requeue=False)
        else:
            channel.basic_nack(tag, requeue=True)
            self._wait_for_database(connection)

    def _wait_for_database(self, connection: pika.BlockingConnection) -> None:
        delay = DB_PAUSE_FIRST
        while not self._stop.requested and not _database_answers(self._engine):
            log.warning("database unavailable: consumption paused for %.1fs", delay)
            self._stop.sleep(delay, connection)
            delay = min(delay * 2, DB_PAUSE_MAX)


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

    engine = create_db_engine(settings.database_url.get_secret_value(), pool_size=2)
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
        sender.close()
        fastpath.close()
        engine.dispose()
    log.info("worker stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
