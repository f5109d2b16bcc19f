"""Raw limits of the parts, with the drivers the services use, on the same tables, the
same quorum queue arguments, the same message body and the same SMTP sink.

- MySQL: ``emails.create`` (email row + outbox row) per transaction through SQLAlchemy +
  PyMySQL, from 1 and 8 clients, and 100 emails per transaction from 8 clients. One
  client = one OS process (spawned once, reused across runs), so the figure is the
  database's ceiling with this driver, not one Python process's GIL.
- RabbitMQ: persistent publishes of a ``DeliveryMessage`` to a quorum queue declared with
  ``services.core.broker.queue_arguments``: waiting for each confirm (BlockingConnection)
  and with ~1000 confirms outstanding (SelectConnection); consume + ack with the
  worker's prefetch (50).
- SMTP: smtplib to the bench's aiosmtpd sink, the worker's message shape, over one reused
  connection per client process, 1 and 2 connections (the worker counts measured). The
  sink offers PIPELINING, so the client pipelines as the worker does (MAIL, RCPT and DATA
  in one write, then the message and its "." in one more): the same two round trips.
- SMTP + record: the same, each send then recorded (the email's UPDATE, its attempt
  INSERT, COMMIT) before the next is sent - the least a worker does under FAULTS' rule.
- The plainest correct outbox relay (``outbox_floor_client``), run by the relay section
  on its burn-down rows.
"""

from __future__ import annotations

import multiprocessing
import re
import smtplib
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from email import policy
from email.message import EmailMessage
from email.utils import format_datetime
from typing import Any

import pika
from pika.spec import Basic

from bench.common import (
    OWNER,
    RABBITMQ_URL,
    BenchEnv,
    CpuMeter,
    cpu_summary,
    new_email,
    progress,
    queue_depth,
    summary,
)
from services.core import emails
from services.core.broker import (
    blocking_connection,
    connection_parameters,
    declare_topology,
    message_properties,
)
from services.core.db import create_db_engine
from services.core.ids import new_id
from services.core.messages import DeliveryMessage
from services.core.schema import db_time

SECTION = "raw"
REPS = 3  # runs of each measurement


def _seconds(env: BenchEnv) -> float:
    """How long each run of a rate measurement lasts."""
    return 1.0 if env.quick else 2.0


# --- helpers run in client processes ------------------------------------------------------


def _warm() -> None:
    time.sleep(0.3)


def _mysql_client(url: str, per_tx: int, start_at: float, end_at: float) -> tuple[int, float]:
    engine = create_db_engine(url, pool_size=1)
    items = [new_email(datetime.now(UTC) + timedelta(days=1), i) for i in range(per_tx)]
    with engine.connect() as conn:  # connect before the clock starts
        conn.exec_driver_sql("SELECT 1")
    done = 0
    while time.monotonic() < start_at:
        time.sleep(0.001)
    cpu = time.process_time()
    while time.monotonic() < end_at:
        with engine.begin() as conn:
            emails.create(conn, OWNER, items, datetime.now(UTC))
        done += per_tx
    cpu = time.process_time() - cpu
    engine.dispose()
    return done, cpu


@contextmanager
def mysql_transactions(url: str, connections: int) -> Iterator[Callable[[int], bool]]:
    """A function making one raw transaction per call - the email and outbox rows of
    ``_mysql_client``'s, as ``emails.create`` writes them - from any thread, on up to
    ``connections`` connections at once: the API's open loop's raw counterpart."""
    engine = create_db_engine(url, pool_size=connections)
    items = [new_email(datetime.now(UTC) + timedelta(days=1), i) for i in range(100)]

    def transaction(index: int) -> bool:
        with engine.begin() as conn:
            emails.create(conn, OWNER, [items[index % len(items)]], datetime.now(UTC))
        return True

    try:
        yield transaction
    finally:
        engine.dispose()


_ID_SLOT = "00000000-0000-7000-8000-000000000000"  # same length as a real id


_LINE_START_DOT = re.compile(rb"(?m)^\.")  # dot-stuffing (RFC 5321 4.5.2), as smtplib does


def smtp_message(index: int, email_id: str | None = None) -> EmailMessage:
    """The shape the worker sends: the same headers and a body of the same size."""
    email_id = email_id or new_id()
    message = EmailMessage()
    message["From"] = "bench@example.com"
    message["To"] = f"rcpt{index % 1000}@example.com"
    message["Subject"] = "Benchmark notice"
    message["Date"] = format_datetime(datetime.now(UTC))
    message["Message-ID"] = f"<{email_id}@example.com>"
    message["X-Email-Id"] = email_id
    message.set_content("Hello from the emailsched benchmark. " * 6)
    return message


def _smtp_client(host: str, port: int, start_at: float, end_at: float) -> tuple[int, float]:
    """smtplib alone: the messages are rendered before the clock starts (each send only
    swaps in a fresh id), so the limit holds no composition cost - the worker's does."""
    template = smtp_message(0, email_id=_ID_SLOT).as_bytes(policy=policy.SMTP)
    conn = smtplib.SMTP(host, port, timeout=30)
    conn.ehlo()
    pipelined = conn.has_extn("pipelining")
    done = 0
    while time.monotonic() < start_at:
        time.sleep(0.001)
    cpu = time.process_time()
    while time.monotonic() < end_at:
        data = template.replace(_ID_SLOT.encode(), new_id().encode())
        if pipelined:
            _send_pipelined(conn, "bench@example.com", "rcpt0@example.com", data)
        else:
            conn.sendmail("bench@example.com", ["rcpt0@example.com"], data)
        done += 1
    cpu = time.process_time() - cpu
    conn.quit()
    return done, cpu


# The least a worker must write per email under FAULTS' rule (one extra copy per crash
# at most): the acceptance, committed before the next message is accepted - the email's
# new status and its attempt row (``GET /v1/emails/{id}/attempts``), plainly: two
# statements and a COMMIT, no claim, no broker, no composing.
_FLOOR_RECORD = (
    "UPDATE emails SET status = 'sent', version = version + 1, attempts = attempts + 1,"
    " sent_at = %(now)s, updated_at = %(now)s WHERE id = %(id)s"
)
_FLOOR_ATTEMPT = (
    "INSERT INTO attempts (email_id, number, started_at, finished_at, outcome, smtp_code)"
    " VALUES (%(id)s, %(number)s, %(now)s, %(now)s, 'sent', 250)"
)
_FLOOR_ROWS = 2000  # emails per client, updated in turn (a row again after a lap)
_floor_emails: list[str] = []  # this client process's, made by its first (warm-up) run
_floor_sent = [0]  # sends recorded by this process so far: the attempt numbers go on


def _smtp_recorded_client(
    url: str, host: str, port: int, start_at: float, end_at: float
) -> tuple[int, float]:
    """``_smtp_client``, each send then recorded in a transaction of its own before the
    next: the floor the delivery guarantee sets, with nothing of ours in it. The first
    run in a process makes its emails (``_client_runs`` gives it an untimed warm-up)."""
    engine = create_db_engine(url, pool_size=1)
    if not _floor_emails:
        with engine.begin() as conn:
            now = datetime.now(UTC)
            for start in range(0, _FLOOR_ROWS, 100):
                items = [new_email(now, start + i) for i in range(100)]
                _floor_emails.extend(emails.create(conn, OWNER, items, now))
    template = smtp_message(0, email_id=_ID_SLOT).as_bytes(policy=policy.SMTP)
    smtp = smtplib.SMTP(host, port, timeout=30)
    smtp.ehlo()
    done = 0
    with engine.connect() as conn:
        while time.monotonic() < start_at:
            time.sleep(0.001)
        cpu = time.process_time()
        while time.monotonic() < end_at:
            sent = _floor_sent[0]
            email_id = _floor_emails[sent % _FLOOR_ROWS]
            data = template.replace(_ID_SLOT.encode(), email_id.encode())
            _send_pipelined(smtp, "bench@example.com", "rcpt0@example.com", data)
            bound = {
                "id": email_id,
                "number": sent // _FLOOR_ROWS + 1,
                "now": db_time(datetime.now(UTC)),
            }
            conn.exec_driver_sql(_FLOOR_RECORD, bound)
            conn.exec_driver_sql(_FLOOR_ATTEMPT, bound)
            conn.commit()
            _floor_sent[0] += 1
            done += 1
        cpu = time.process_time() - cpu
    smtp.quit()
    engine.dispose()
    return done, cpu


def _send_pipelined(conn: smtplib.SMTP, sender: str, rcpt: str, data: bytes) -> None:
    """One message in two round trips (RFC 2920); ``data`` is CRLF-terminated lines, as
    ``smtp_message`` renders them."""
    conn.send(f"MAIL FROM:<{sender}> size={len(data)}\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n")
    codes = [conn.getreply()[0] for _ in range(3)]
    if codes != [250, 250, 354]:
        raise RuntimeError(f"the sink refused the envelope: {codes}")
    conn.send(_LINE_START_DOT.sub(b"..", data) + b".\r\n")
    code, reply = conn.getreply()
    if code != 250:
        raise RuntimeError(f"the sink refused the message: {code} {reply!r}")


def run_clients(
    pool: ProcessPoolExecutor,
    clients: int,
    duration: float,
    target: Callable[..., tuple[int, float]],
    *args: Any,
    cpu: list[dict[str, float]],
    env: BenchEnv,
) -> float:
    """``clients`` processes run ``target`` for ``duration`` seconds; the summed rate/s.
    Appends to ``cpu`` where the CPU went per item meanwhile (the clients' own as
    ``client``)."""
    start_at = time.monotonic() + 1.0
    futures = [pool.submit(target, *args, start_at, start_at + duration) for _ in range(clients)]
    meter = CpuMeter(env)
    time.sleep(max(0.0, start_at - time.monotonic()))
    meter.start()
    time.sleep(max(0.0, start_at + duration - time.monotonic()))
    meter.stop()
    results = [f.result() for f in futures]
    done = sum(count for count, _ in results)
    meter.seconds["client"] = sum(seconds for _, seconds in results)
    cpu.append(meter.per_item_us(done))
    return done / duration


def spawn_pool(size: int) -> ProcessPoolExecutor:
    pool = ProcessPoolExecutor(size, mp_context=multiprocessing.get_context("spawn"))
    for f in [pool.submit(_warm) for _ in range(size)]:
        f.result()
    return pool


# --- RabbitMQ ------------------------------------------------------------------------------


def publish_confirm_each(queue: str, duration: float) -> float:
    connection = blocking_connection(RABBITMQ_URL)
    try:
        channel = connection.channel()
        declare_topology(channel, queue)
        channel.confirm_delivery()
        done = 0
        start = time.monotonic()
        end = start + duration
        while time.monotonic() < end:
            message = DeliveryMessage(new_id(), 1)
            channel.basic_publish(
                "", queue, message.encode(), message_properties(message.message_id), mandatory=True
            )
            done += 1
        rate = done / (time.monotonic() - start)
        channel.queue_purge(queue)
        return rate
    finally:
        connection.close()


def publish_windowed(queue: str, total: int, window: int = 1000) -> float:
    """Publish ``total`` messages keeping up to ``window`` confirms outstanding."""
    state: dict[str, Any] = {"sent": 0, "acked": 0, "start": 0.0, "end": 0.0}
    connection: pika.SelectConnection | None = None
    messages = [DeliveryMessage(new_id(), 1) for _ in range(total)]

    def pump(channel: Any) -> None:
        while state["sent"] < total and state["sent"] - state["acked"] < window:
            message = messages[state["sent"]]
            channel.basic_publish(
                "", queue, message.encode(), message_properties(message.message_id), mandatory=True
            )
            state["sent"] += 1

    def on_confirm(frame: Any) -> None:
        method = frame.method
        if not isinstance(method, Basic.Ack):
            raise RuntimeError("nacked")
        state["acked"] = method.delivery_tag if method.multiple else state["acked"] + 1
        if state["acked"] >= total:
            state["end"] = time.monotonic()
            if connection is not None:
                connection.close()
            return
        pump(channel_ref[0])

    channel_ref: list[Any] = []

    def on_declared(_frame: Any) -> None:
        state["start"] = time.monotonic()
        pump(channel_ref[0])

    def on_channel(channel: Any) -> None:
        channel_ref.append(channel)
        channel.confirm_delivery(
            ack_nack_callback=on_confirm,
            callback=lambda _f: channel.queue_declare(
                queue,
                durable=True,
                arguments=_queue_args(queue),
                callback=on_declared,
            ),
        )

    def on_open(conn: Any) -> None:
        conn.channel(on_open_callback=on_channel)

    connection = pika.SelectConnection(
        connection_parameters(RABBITMQ_URL),
        on_open_callback=on_open,
        on_close_callback=lambda _c, _r: connection.ioloop.stop() if connection else None,
    )
    connection.ioloop.start()
    return float(total / (state["end"] - state["start"]))


# The plainest correct relay (``outbox_floor_client``): rows locked by the claim's
# transaction stand for the lease, and are marked published in it once confirmed.
_FLOOR_CLAIM = (
    "SELECT id, email_id, version FROM outbox WHERE due_at <= UTC_TIMESTAMP(6)"
    " ORDER BY due_at LIMIT %(lot)s FOR UPDATE SKIP LOCKED"
)
_FLOOR_MARK = "UPDATE outbox SET published_at = UTC_TIMESTAMP(6) WHERE id IN %(ids)s"
_FLOOR_QUEUED = (
    "UPDATE emails JOIN outbox ON emails.id = outbox.email_id"
    " AND emails.version = outbox.version"
    " SET emails.status = 'queued', emails.updated_at = UTC_TIMESTAMP(6)"
    " WHERE outbox.id IN %(ids)s AND emails.status = 'pending'"
)


def outbox_floor_client(url: str, queue: str, lot: int = 500) -> tuple[int, float, float]:
    """Drain the due outbox rows as the plainest correct relay would: lock a lot (``FOR
    UPDATE SKIP LOCKED``), publish it with every confirm outstanding, mark the rows
    published and their emails queued, commit; then the next lot. No lease write, no
    publishing at an instant, no overlap of database and broker. It holds the lot's row
    locks while publishing, which a production relay should not (a cancel, or a worker
    recording one of those emails, would wait on the broker). Returns (rows, CPU
    seconds, seconds from the first claim to the last commit)."""
    engine = create_db_engine(url, pool_size=1)
    db = engine.connect()
    state: dict[str, Any] = {"done": 0, "ids": [], "acked": 0, "start": 0.0, "end": 0.0}
    connection: pika.SelectConnection | None = None
    channel_ref: list[Any] = []

    def claim() -> None:  # the next lot, or the end
        rows = db.exec_driver_sql(_FLOOR_CLAIM, {"lot": lot}).all()
        if not rows:
            db.commit()
            state["end"] = time.monotonic()
            if connection is not None:
                connection.close()
            return
        state["ids"], state["acked"] = [row.id for row in rows], 0
        for row in rows:
            message = DeliveryMessage(row.email_id, row.version)
            channel_ref[0].basic_publish(
                "", queue, message.encode(), message_properties(message.message_id), mandatory=True
            )

    def on_confirm(frame: Any) -> None:
        method = frame.method
        if not isinstance(method, Basic.Ack):
            raise RuntimeError("nacked")
        # Tags count the channel's publishes: this lot's are done + 1 ... done + len(lot).
        state["acked"] = (
            method.delivery_tag - state["done"] if method.multiple else state["acked"] + 1
        )
        if state["acked"] < len(state["ids"]):
            return
        ids = tuple(state["ids"])
        db.exec_driver_sql(_FLOOR_MARK, {"ids": ids})
        db.exec_driver_sql(_FLOOR_QUEUED, {"ids": ids})
        db.commit()
        state["done"] += len(ids)
        claim()

    def on_channel(channel: Any) -> None:
        channel_ref.append(channel)

        def start(_frame: Any) -> None:
            state["start"] = time.monotonic()
            claim()

        channel.confirm_delivery(ack_nack_callback=on_confirm, callback=start)

    connection = pika.SelectConnection(
        connection_parameters(RABBITMQ_URL),
        on_open_callback=lambda conn: conn.channel(on_open_callback=on_channel),
        on_close_callback=lambda _c, _r: connection.ioloop.stop() if connection else None,
    )
    cpu = time.process_time()
    connection.ioloop.start()
    cpu = time.process_time() - cpu
    db.close()
    engine.dispose()
    return state["done"], cpu, state["end"] - state["start"]


def _queue_args(queue: str) -> dict[str, Any]:
    from services.core.broker import queue_arguments  # noqa: PLC0415

    return queue_arguments(queue)


def consume_ack(queue: str, prefetch: int = 50) -> float:
    connection = blocking_connection(RABBITMQ_URL)
    try:
        channel = connection.channel()
        total = queue_depth(channel, queue)
        channel.basic_qos(prefetch_count=prefetch)
        done = 0
        start = time.monotonic()
        for method, _props, _body in channel.consume(queue, inactivity_timeout=2):
            if method is None:
                break
            channel.basic_ack(method.delivery_tag)
            done += 1
            if done >= total:
                break
        elapsed = time.monotonic() - start
        channel.cancel()
        return done / elapsed
    finally:
        connection.close()


def _client_runs(
    env: BenchEnv,
    what: str,
    clients: int,
    target: Callable[..., tuple[int, float]],
    *args: Any,
    warm_up: bool = False,
) -> dict[str, Any]:
    """``clients`` processes running ``target`` (see ``run_clients``), three times: the
    summed rate per run and where the CPU went. ``warm_up``: one untimed run first, in
    which each process makes what it needs (every run keeps each process busy till its
    end, so each takes exactly one client)."""
    reps, duration = REPS, _seconds(env)
    pool = spawn_pool(clients)
    runs: list[float] = []
    cpu: list[dict[str, float]] = []
    try:
        if warm_up:
            run_clients(pool, clients, 0.5, target, *args, cpu=[], env=env)
        for rep in range(reps):
            progress(SECTION, f"{what}, run {rep + 1}/{reps}")
            runs.append(run_clients(pool, clients, duration, target, *args, cpu=cpu, env=env))
    finally:
        pool.shutdown()
    return {**summary(runs), "cpu": cpu_summary(cpu)}


def run(env: BenchEnv, results: dict[str, Any]) -> None:
    reps, duration = REPS, _seconds(env)
    raw: dict[str, Any] = results.setdefault("raw", {})

    # MySQL
    for clients, per_tx, key in (
        (1, 1, "mysql_tx_1"),
        (8, 1, "mysql_tx_8"),
        (8, 100, "mysql_100_8"),
    ):
        raw[key] = {
            **_client_runs(
                env,
                f"MySQL insert {clients} client(s), {per_tx}/tx",
                clients,
                _mysql_client,
                env.database_url,
                per_tx,
            ),
            "unit": "emails/s" if per_tx > 1 else "tx/s",
            "clients": clients,
            "per_tx": per_tx,
        }
    env.truncate()

    # RabbitMQ
    queue = env.queue("raw")
    total = 5000 if env.quick else 20000
    measures: tuple[tuple[str, Callable[[], float]], ...] = (
        ("rabbit_confirm_each", lambda: publish_confirm_each(queue, duration)),
        ("rabbit_windowed", lambda: publish_windowed(queue, total)),
    )
    for name, measure in measures:
        runs = []
        cpu = []
        for rep in range(reps):
            progress(SECTION, f"{name} run {rep + 1}/{reps}")
            with CpuMeter(env) as meter:
                runs.append(measure())
            if name == "rabbit_windowed":  # the publisher is the bench process
                cpu.append(meter.per_item_us(total))
                consumed = consume_ack(queue)
                raw.setdefault("_consume", []).append(consumed)
        raw[name] = {**summary(runs), "unit": "msg/s"}
        if cpu:
            raw[name]["cpu"] = cpu_summary(cpu)
    raw["rabbit_consume_ack_prefetch50"] = {**summary(raw.pop("_consume")), "unit": "msg/s"}

    # SMTP, and SMTP with each send recorded before the next (the guarantee's floor)
    sink = (env.smtp.host, env.smtp.port)
    kinds: tuple[tuple[str, str, Callable[..., tuple[int, float]], tuple[Any, ...], bool], ...] = (
        ("smtp_{}conn", "SMTP {} reused connection(s)", _smtp_client, sink, False),
        (
            "smtp_recorded_{}conn",
            "SMTP + record, {} connection(s)",
            _smtp_recorded_client,
            (env.database_url, *sink),
            True,  # each client makes its emails in an untimed first run
        ),
    )
    for key, what, target, args, warm_up in kinds:
        for conns in (1, 2):
            raw[key.format(conns)] = {
                **_client_runs(env, what.format(conns), conns, target, *args, warm_up=warm_up),
                "unit": "msg/s",
                "connections": conns,
            }
    env.truncate()
    env.smtp.handler.received.clear()
