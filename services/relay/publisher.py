"""Publishing outbox rows to RabbitMQ, on time, with publisher confirms.

Why a SelectConnection in a thread of its own: ``BlockingConnection.basic_publish`` waits
for each confirm (about 1,700 msg/s here) while asynchronous confirms with thousands
outstanding reach about 31,000 msg/s. pika is not thread-safe, so every piece of state
below belongs to the I/O-loop thread; other threads only call ``add_callback_threadsafe``
(through ``submit`` and ``stop``), read ``ready``/``room`` and drain ``results``.

A row handed over comes with a ``time.monotonic()`` deadline and is published at it,
never before: rows sharing a deadline share one timer. Each row ends as exactly one
``Result``: confirmed (broker ack), or failed with a reason (nack, returned as
unroutable, no confirm in time, connection lost, stopping). Only a confirmed row may be
marked published. Publishes are ``mandatory``: if the queue is deleted under a running
relay, the broker returns them instead of confirming messages that reached nowhere, and
the first return makes the relay declare its queues again.

Nothing here waits forever on a broker that stopped answering. A publish without a
confirm after ``confirm_timeout`` fails its rows and drops the connection (the graceful
close is cut short after ``CLOSE_GRACE_SECONDS``: a hung broker never answers it); a
connection blocked by a resource alarm is given up after the same time; heartbeats catch
a peer that vanished without a word. The confirm timeout defaults to half the claim
lease (``confirm_timeout_for``), so a row is failed and handed back before its lease
ends and another relay may take it.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pika
import pika.exceptions
from pika.adapters.select_connection import IOLoop
from pika.spec import Basic

from services.core.broker import (
    RECONNECT_FIRST_SECONDS,
    RECONNECT_MAX_SECONDS,
    RECONNECT_QUIET_SECONDS,
    connection_parameters,
    message_properties,
    queue_declarations,
    reset_during_setup,
)
from services.core.messages import DeliveryMessage
from services.core.outbox import OutboxRow
from services.core.settings import mask_url

log = logging.getLogger(__name__)

WATCHDOG_SECONDS = 0.5
CONFIRM_TIMEOUT_MAX_SECONDS = 15.0
CONFIRM_TIMEOUT_MIN_SECONDS = 1.0
CLOSE_GRACE_SECONDS = 2.0
NO_ROUTE = 312  # AMQP reply code of a mandatory publish that reached no queue


def confirm_timeout_for(lease_seconds: float) -> float:
    """Half the claim lease, within [1 s, 15 s]: rows whose publish is stuck are handed
    back while this relay still holds their lease."""
    return max(CONFIRM_TIMEOUT_MIN_SECONDS, min(CONFIRM_TIMEOUT_MAX_SECONDS, lease_seconds / 2))


@dataclass(frozen=True, slots=True)
class Result:
    """What became of one handed-over row: ``error is None`` means the broker confirmed it."""

    row: OutboxRow
    error: str | None = None


@dataclass(frozen=True, slots=True)
class _Sent:
    row: OutboxRow
    message_id: str
    at: float  # monotonic time of basic_publish, for the confirm timeout


class Publisher:
    """Owns one RabbitMQ connection (reconnected with capped back-off) and its I/O thread.

    ``submit`` hands rows over; ``results`` gives back their outcomes. At most
    ``max_in_flight`` rows are held at once (waiting for their deadline or for a
    confirm): ``room`` says how many more may be submitted.
    """

    def __init__(
        self,
        url: str,
        queue_name: str,
        *,
        max_in_flight: int = 5000,
        confirm_timeout: float = 15.0,
    ) -> None:
        self._params = connection_parameters(url)
        # pika's default (None) waits forever through a resource alarm; the shared default
        # (30 s) is longer than a relay should hold rows it cannot publish.
        self._params.blocked_connection_timeout = confirm_timeout
        self._where = mask_url(url)
        self._queue = queue_name
        self._max_in_flight = max_in_flight
        self._confirm_timeout = confirm_timeout
        self._results: queue.SimpleQueue[Result] = queue.SimpleQueue()
        self._count_lock = threading.Lock()
        self._in_flight = 0
        self._ready = threading.Event()
        self._closing = threading.Event()  # set once the I/O loop is on its way out
        self._ioloop = IOLoop()
        self._thread = threading.Thread(target=self._run, name="relay-publisher", daemon=True)
        # State below is touched by the I/O-loop thread only.
        self._connection: pika.SelectConnection | None = None
        self._channel: Any = None
        self._stopping = False
        self._reconnect_delay = RECONNECT_FIRST_SECONDS
        self._reconnect_timer: Any = None
        self._waiting: dict[float, list[OutboxRow]] = {}  # deadline -> rows
        self._timers: dict[float, Any] = {}  # deadline -> pika timer
        self._outstanding: OrderedDict[int, _Sent] = OrderedDict()  # delivery tag -> sent
        self._tags_by_message: dict[str, deque[int]] = {}
        self._returned: dict[int, str] = {}  # delivery tag -> why the broker returned it
        self._redeclaring = False  # a queue vanished under us: declaring it again
        self._next_tag = 0
        self._down_since: float | None = None  # first failed attempt of this outage
        self._last_warning = 0.0

    # --- the surface other threads use -------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        """False once the I/O-loop thread has ended (stopped, or killed by a bug)."""
        return self._thread.is_alive()

    @property
    def ready(self) -> bool:
        """Connected, confirms on, topology declared, not blocked by a resource alarm."""
        return self._ready.is_set()

    def wait_ready(self, timeout: float) -> bool:
        return self._ready.wait(timeout)

    @property
    def room(self) -> int:
        with self._count_lock:
            return max(0, self._max_in_flight - self._in_flight)

    def submit(self, rows: Sequence[tuple[OutboxRow, float]]) -> None:
        """Publish each row at its monotonic deadline (or at once if it has passed)."""
        if not rows:
            return
        with self._count_lock:
            self._in_flight += len(rows)
        if not self._thread.is_alive() or self._stopping:
            for row, _ in rows:
                self._finish(row, "publisher stopped")
            return
        batch = list(rows)
        self._ioloop.add_callback_threadsafe(lambda: self._schedule(batch))

    def results(self, timeout: float = 0.0) -> list[Result]:
        """Every outcome so far; waits up to ``timeout`` for the first one."""
        found: list[Result] = []
        try:
            found.append(
                self._results.get(timeout=timeout) if timeout > 0 else self._results.get_nowait()
            )
            while True:
                found.append(self._results.get_nowait())
        except queue.Empty:
            pass
        return found

    def stop(self, timeout: float = 10.0) -> None:
        """Fail rows not yet published, wait (bounded) for outstanding confirms, close.

        Outcomes of every row stay readable through ``results`` afterwards.
        """
        if not self._thread.is_alive():
            return
        self._ioloop.add_callback_threadsafe(self._begin_stop)
        if not self._closing.wait(timeout):
            self._ioloop.add_callback_threadsafe(self._close)
        self._thread.join(timeout=5.0)
        if self._thread.is_alive():
            log.warning("rabbitmq publisher thread did not stop within 5 s")

    # --- I/O-loop thread ------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._connect()
            while True:
                try:
                    self._ioloop.start()
                    break
                except ValueError as exc:
                    connection = self._connection
                    if connection is None or connection.is_open or not reset_during_setup(exc):
                        raise
                    # pika raised out of its loop and will not report this attempt: count
                    # it as failed here (a late report from it is ignored) and go on.
                    error = pika.exceptions.AMQPConnectionError(exc)
                    self._on_connection_error(connection, error)
        finally:
            self._ioloop.close()

    def _finish(self, row: OutboxRow, error: str | None) -> None:
        self._results.put(Result(row, error))
        with self._count_lock:
            self._in_flight -= 1

    def _connect(self) -> None:
        self._reconnect_timer = None
        self._connection = pika.SelectConnection(
            self._params,
            on_open_callback=self._on_connection_open,
            on_open_error_callback=self._on_connection_error,
            on_close_callback=self._on_connection_closed,
            custom_ioloop=self._ioloop,
        )

    def _on_connection_open(self, connection: pika.SelectConnection) -> None:
        connection.add_on_connection_blocked_callback(self._on_blocked)
        connection.add_on_connection_unblocked_callback(self._on_unblocked)
        connection.channel(on_open_callback=self._on_channel_open)

    def _on_channel_open(self, channel: Any) -> None:
        self._channel = channel
        self._next_tag = 0
        self._redeclaring = False
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_return_callback(self._on_return)
        channel.confirm_delivery(
            ack_nack_callback=self._on_confirm,
            callback=lambda _frame: self._declare(channel, 0, self._on_ready),
        )

    def _declare(self, channel: Any, index: int, then: Callable[[Any], None]) -> None:
        """Declare the queues one after the other, then call ``then(channel)``."""
        declarations = queue_declarations(self._queue)
        if index == len(declarations):
            then(channel)
            return
        name, arguments = declarations[index]
        channel.queue_declare(
            name,
            durable=True,
            arguments=arguments,
            callback=lambda _frame: self._declare(channel, index + 1, then),
        )

    def _redeclare(self, why: str) -> None:
        """The queue was deleted under a running relay: the broker returns every publish
        (the rows go back to the outbox with back-off). Declare the topology again on this
        channel so the next attempts route; until then keep failing the returned rows."""
        channel = self._channel
        if self._redeclaring or channel is None or not channel.is_open or self._stopping:
            return
        self._redeclaring = True
        log.warning(
            "rabbitmq returned a publish to %s (%s); declaring the queues again",
            self._queue,
            why,
        )
        self._declare(channel, 0, self._on_redeclared)

    def _on_redeclared(self, channel: Any) -> None:
        if channel is self._channel:
            self._redeclaring = False
            log.info("rabbitmq queues declared again; publishing to %s", self._queue)

    def _on_ready(self, channel: Any) -> None:
        if channel is not self._channel or self._stopping:
            return
        if self._down_since is None:
            log.info("rabbitmq connected at %s, publishing to %s", self._where, self._queue)
        else:
            log.info(
                "rabbitmq connected at %s, publishing to %s (was unavailable for %.1f s)",
                self._where,
                self._queue,
                time.monotonic() - self._down_since,
            )
        self._down_since = None
        self._reconnect_delay = RECONNECT_FIRST_SECONDS
        self._ready.set()
        self._ioloop.call_later(WATCHDOG_SECONDS, lambda: self._watchdog(channel))

    def _on_connection_error(self, connection: Any, error: BaseException) -> None:
        if connection is not self._connection:
            return
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = now
        if now - self._last_warning >= RECONNECT_QUIET_SECONDS:
            self._last_warning = now
            log.warning(
                "rabbitmq connection to %s failed (unavailable for %.0f s; retrying every "
                "%.1f s at most, nothing claimed meanwhile): %r",
                self._where,
                now - self._down_since,
                RECONNECT_MAX_SECONDS,
                error,
            )
        self._after_disconnect()

    def _on_connection_closed(self, connection: Any, reason: BaseException) -> None:
        if connection is not self._connection:
            return
        if not self._stopping:
            log.warning("rabbitmq connection lost: %r", reason)
            self._down_since = time.monotonic()
            self._last_warning = 0.0
        self._after_disconnect()

    def _on_channel_closed(self, channel: Any, reason: BaseException) -> None:
        """A channel error (a failed declare, say) ends the connection: start afresh."""
        if channel is not self._channel:
            return
        self._ready.clear()
        self._channel = None
        connection = self._connection
        if connection is not None and connection.is_open:
            log.warning("rabbitmq channel closed: %r", reason)
            self._close_connection(connection)

    def _close_connection(self, connection: Any) -> None:
        """Close gracefully, but a hung or blocking broker never answers: after
        ``CLOSE_GRACE_SECONDS`` drop the socket (pika's own way to end a blocked or
        heartbeat-dead connection), which reports the close as usual."""
        if not (connection.is_closing or connection.is_closed):
            connection.close()

        def abort() -> None:
            if self._connection is None or self._connection is not connection:
                return  # closed (and perhaps replaced) meanwhile
            if not connection.is_closed:
                log.warning(
                    "rabbitmq did not close the connection within %.0f s; dropping it",
                    CLOSE_GRACE_SECONDS,
                )
                connection._terminate_stream(TimeoutError("rabbitmq did not answer the close"))

        self._ioloop.call_later(CLOSE_GRACE_SECONDS, abort)

    def _after_disconnect(self) -> None:
        self._ready.clear()
        self._channel = None
        self._connection = None
        self._fail_waiting("rabbitmq connection lost")
        self._fail_outstanding("rabbitmq connection lost")
        if self._stopping:
            self._closing.set()
            self._ioloop.stop()
            return
        delay = self._reconnect_delay
        self._reconnect_delay = min(delay * 2, RECONNECT_MAX_SECONDS)
        self._reconnect_timer = self._ioloop.call_later(delay, self._connect)

    def _on_blocked(self, _connection: Any, _frame: Any) -> None:
        log.warning("rabbitmq blocked this connection (resource alarm); no new claims")
        self._ready.clear()

    def _on_unblocked(self, _connection: Any, _frame: Any) -> None:
        log.info("rabbitmq unblocked this connection")
        if self._channel is not None and self._channel.is_open and not self._stopping:
            self._ready.set()

    def _schedule(self, rows: list[tuple[OutboxRow, float]]) -> None:
        now = time.monotonic()
        due: list[OutboxRow] = []
        for row, deadline in rows:
            if deadline <= now:
                due.append(row)
                continue
            # Rounded up to the millisecond: rows of one instant share a timer, none early.
            key = math.ceil(deadline * 1000) / 1000
            if key not in self._waiting:
                self._waiting[key] = []
                self._timers[key] = self._ioloop.call_later(key - now, self._timer(key))
            self._waiting[key].append(row)
        self._publish(due)

    def _timer(self, key: float) -> Callable[[], None]:
        def fire() -> None:
            remaining = key - time.monotonic()
            if remaining > 0:  # never early, whatever the timer's rounding
                self._timers[key] = self._ioloop.call_later(remaining, fire)
                return
            self._timers.pop(key, None)
            self._publish(self._waiting.pop(key, []))

        return fire

    def _publish(self, rows: list[OutboxRow]) -> None:
        channel = self._channel
        for index, row in enumerate(rows):
            if not self._ready.is_set() or channel is None:
                for unpublished in rows[index:]:
                    self._finish(unpublished, "rabbitmq not connected")
                return
            message = DeliveryMessage(row.email_id, row.version)
            channel.basic_publish(
                exchange="",
                routing_key=self._queue,
                body=message.encode(),
                properties=message_properties(message.message_id),
                mandatory=True,
            )
            self._next_tag += 1
            self._outstanding[self._next_tag] = _Sent(row, message.message_id, time.monotonic())
            self._tags_by_message.setdefault(message.message_id, deque()).append(self._next_tag)

    def _on_return(self, _channel: Any, method: Any, properties: Any, _body: bytes) -> None:
        """An unroutable message: its ack follows, but it reached no queue."""
        tags = self._tags_by_message.get(properties.message_id)
        if tags:
            self._returned[tags.popleft()] = f"returned by rabbitmq: {method.reply_text}"
        if method.reply_code == NO_ROUTE:
            self._redeclare(method.reply_text)

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        acked = isinstance(method, Basic.Ack)
        tag = method.delivery_tag
        if method.multiple:
            while self._outstanding and next(iter(self._outstanding)) <= tag:
                self._settle(*self._outstanding.popitem(last=False), acked=acked)
        elif tag in self._outstanding:
            self._settle(tag, self._outstanding.pop(tag), acked=acked)
        if self._stopping and not self._outstanding:
            self._close()

    def _settle(self, tag: int, sent: _Sent, *, acked: bool) -> None:
        tags = self._tags_by_message.get(sent.message_id)
        if tags is not None:
            if tags and tags[0] == tag:
                tags.popleft()
            elif tag in tags:
                tags.remove(tag)
            if not tags:
                del self._tags_by_message[sent.message_id]
        returned = self._returned.pop(tag, None)
        if returned is not None:
            self._finish(sent.row, returned)
        else:
            self._finish(sent.row, None if acked else "nacked by rabbitmq")

    def _watchdog(self, channel: Any) -> None:
        """No confirm within the timeout: the broker is hung; fail and reconnect."""
        if channel is not self._channel:
            return
        if self._outstanding:
            oldest = next(iter(self._outstanding.values()))
            if time.monotonic() - oldest.at > self._confirm_timeout:
                log.warning(
                    "no publisher confirm within %.1f s; reconnecting", self._confirm_timeout
                )
                self._fail_outstanding("no publisher confirm in time")
                self._on_channel_closed(channel, TimeoutError("confirm timeout"))
                return
        self._ioloop.call_later(WATCHDOG_SECONDS, lambda: self._watchdog(channel))

    def _fail_waiting(self, error: str) -> None:
        for timer in self._timers.values():
            self._ioloop.remove_timeout(timer)
        self._timers.clear()
        for rows in self._waiting.values():
            for row in rows:
                self._finish(row, error)
        self._waiting.clear()

    def _fail_outstanding(self, error: str) -> None:
        while self._outstanding:
            _, sent = self._outstanding.popitem(last=False)
            self._finish(sent.row, error)
        self._tags_by_message.clear()
        self._returned.clear()

    def _begin_stop(self) -> None:
        """Hand back what is not published yet; close once every confirm is in."""
        self._stopping = True
        self._ready.clear()
        self._fail_waiting("relay stopped before publishing")
        if not self._outstanding:
            self._close()

    def _close(self) -> None:
        """Close the connection (failing what is unconfirmed) and end the I/O loop."""
        self._stopping = True
        self._ready.clear()
        self._closing.set()
        if self._reconnect_timer is not None:
            self._ioloop.remove_timeout(self._reconnect_timer)
            self._reconnect_timer = None
        connection = self._connection
        if connection is None:
            self._ioloop.stop()
        elif not connection.is_closed:
            self._close_connection(connection)
