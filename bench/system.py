"""The real processes (``python -m services.api|relay|worker``, started and stopped by PID
through ``tests.support.stack``), each on the run's own database and queue.

- api: ``POST /v1/emails`` closed loop at 1, 8, 32 concurrent clients (req/s, p50/p99);
  open loop at fixed offered rates (latency measured from the intended send instant, so
  queueing counts); ``POST /v1/emails/batch`` of 100 emails from 8 clients (emails/s).
  Clients are threads of the bench process, each on a keep-alive connection of
  ``bench.httpload`` (pre-rendered requests over plain sockets: the load generator shares
  the two cores with the API, so it must cost little CPU); the API runs apart, with
  ``API_WORKERS=2`` (one server process per core).
- relay: 50,000 rows made due in one UPDATE, then 1 or 2 running relays (woken through
  Redis as the API would) until every row is in the queue and flagged published.
- worker: 1 or 2 running worker processes, queue pre-filled with ``DeliveryMessage``s for
  due emails; deliveries/s = messages / (last SMTP arrival - first publish).
- pipeline: api + 1 relay + 2 workers. On-time: 100 emails/s due over a minute (created
  ahead through the batch API); lateness = sink arrival - send_at. Burst: 5,000 and
  20,000 emails (created ahead with emails.create) sharing one send_at.
- scale: the relay's claim transaction with nothing due, on an empty outbox, with
  1,000,000 future rows, and right after a 50,000-row drain while another session holds
  a REPEATABLE READ snapshot open; relay + worker (+ broker) RSS with 100,000 scheduled.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from bench import raw
from bench.common import (
    API_KEY,
    BODY_TEXT,
    MAIL_FROM,
    RABBITMQ_URL,
    REDIS_URL,
    BenchEnv,
    CommitProbe,
    CpuMeter,
    Ticker,
    broker_pid,
    bulk_future_rows,
    children,
    cpu_summary,
    insert_emails,
    latency_summary,
    percentile,
    progress,
    queue_depth,
    rss_kib,
    start_relay,
    start_worker,
    summary,
    wait_until,
)
from bench.httpload import HttpLoad
from services.api.schemas import ADDRESS_CACHE_SIZE
from services.core import outbox
from services.core.broker import (
    blocking_connection,
    declare_topology,
    message_properties,
)
from services.core.db import db_now, transaction
from services.core.delivery import LEAD
from services.core.fastpath import FastPath
from services.core.messages import DeliveryMessage
from tests.support.stack import Process, Stack, running_stack

API_WORKERS = 2  # API_WORKERS for the api section
BURST_LEAD = {5000: 8.0, 20000: 20.0}  # seconds between scheduling and the shared send_at
OPEN_LOOP_THREADS = 64  # an open loop's senders: room for a stall's pile-up at 200/s
ONTIME_LEAD = 15.0  # seconds between the start of scheduling and the first send_at
BURST_CUTOFF = 90.0  # seconds after send_at: a burst still arriving then is cut off


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


# Distinct recipients in the API section: more than the API keeps validated addresses
# (ADDRESS_CACHE_SIZE), so every recipient is validated as a new one would be.
API_RECIPIENTS = 2 * ADDRESS_CACHE_SIZE


def email_body(send_at: datetime, index: int = 0) -> dict[str, Any]:
    return {
        "to": [f"rcpt{index}@example.com"],
        "from": MAIL_FROM,
        "subject": "Benchmark notice",
        "text": BODY_TEXT,
        "send_at": _iso(send_at),
    }


# --- API -----------------------------------------------------------------------------------


def closed_loop(
    load: HttpLoad,
    concurrency: int,
    duration: float,
    requests: Sequence[bytes],
    *,
    expect: int = 201,
) -> tuple[float, list[float], int]:
    """(requests/s, latencies, errors) with ``concurrency`` clients back to back, taking
    the rendered ``requests`` in turn; a status other than ``expect`` is an error."""
    end = time.monotonic() + duration
    turn = itertools.count()
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    errors = [0] * concurrency

    def client_loop(index: int) -> None:
        with load.connection() as conn:
            while time.monotonic() < end:
                request = requests[next(turn) % len(requests)]
                start = time.perf_counter()
                status, _ = conn.request(request)
                if status != expect:
                    errors[index] += 1
                    continue
                latencies[index].append(time.perf_counter() - start)

    started = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(client_loop, range(concurrency)))
    elapsed = time.monotonic() - started
    flat = [x for per in latencies for x in per]
    return len(flat) / elapsed, flat, sum(errors)


def open_loop(
    rate: float, duration: float, send: Callable[[int], bool]
) -> tuple[list[float], int, float]:
    """``send(index)`` fired at ``rate``/s, each from a thread of its own when due
    (``send`` says whether it succeeded); latency from each one's intended instant."""
    count = int(rate * duration)
    start = time.monotonic() + 0.2
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()

    def fire(index: int) -> None:
        due = start + index / rate
        wait = due - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        ok = send(index)
        done = time.monotonic()
        with lock:
            if ok:
                latencies.append(done - due)
            else:
                errors[0] += 1

    with ThreadPoolExecutor(OPEN_LOOP_THREADS) as pool:
        list(pool.map(fire, range(count)))
    achieved = len(latencies) / max(duration, 1e-9)
    return latencies, errors[0], achieved


def api_section(env: BenchEnv, results: dict[str, Any]) -> None:
    section = "api"
    reps, duration = 3, (1.5 if env.quick else 3.0)
    out: dict[str, Any] = results.setdefault("api", {})
    # Two server processes, one per core: how the API would be run on this machine.
    settings = env.settings(env.queue("api"), api_workers=API_WORKERS)
    future = datetime.now(UTC) + timedelta(days=1)
    bodies = [email_body(future, index) for index in range(API_RECIPIENTS)]
    with running_stack(settings, env.workdir) as stack:
        api = stack.start_api()
        load = HttpLoad(stack.api_url, API_KEY)
        create = [load.render_post("/v1/emails", body) for body in bodies]
        closed_loop(load, 8, 1.0, create)  # warm-up
        servers = {"api": [api.pid, *children(api.pid)]}
        for concurrency in (1, 8, 32):
            rates, p50s, p99s, errs = [], [], [], 0
            cpu: list[dict[str, float]] = []
            for rep in range(reps):
                progress(section, f"POST /v1/emails, {concurrency} clients, run {rep + 1}/{reps}")
                with CpuMeter(env, servers) as meter:
                    rate, lat, errors = closed_loop(load, concurrency, duration, create)
                cpu.append(meter.per_item_us(rate * duration))
                rates.append(rate)
                p50s.append(percentile(lat, 50) * 1000)
                p99s.append(percentile(lat, 99) * 1000)
                errs += errors
            out[f"create_c{concurrency}"] = {
                "req_per_s": summary(rates),
                "p50_ms": summary(p50s),
                "p99_ms": summary(p99s),
                "errors": errs,
                "cpu": cpu_summary(cpu),
            }
        # The floor under every figure above: the same server processes answering
        # GET /healthz (HTTP, routing, JSON out; no body, no thread hand-off, no MySQL).
        healthz = [load.render_get("/healthz")]
        for concurrency in (1, 8):
            rates, p50s, cpu = [], [], []
            for rep in range(reps):
                progress(section, f"GET /healthz, {concurrency} clients, run {rep + 1}/{reps}")
                with CpuMeter(env, servers) as meter:
                    rate, lat, _errors = closed_loop(
                        load, concurrency, duration, healthz, expect=200
                    )
                cpu.append(meter.per_item_us(rate * duration))
                rates.append(rate)
                p50s.append(percentile(lat, 50) * 1000)
            out[f"healthz_c{concurrency}"] = {
                "req_per_s": summary(rates),
                "p50_ms": summary(p50s),
                "cpu": cpu_summary(cpu),
            }

        def post(index: int) -> bool:
            with load.connection() as conn:
                status, _ = conn.request(create[index % len(create)])
            return status == 201

        out.update(_open_loops(env, post, reps=reps, duration=duration))
        out["batch100_c8"] = _batch(env, load, servers, bodies, reps=reps, duration=duration)
        out["api_workers"] = API_WORKERS
        out["api_rss_kib"] = rss_kib(api.pid) + sum(rss_kib(kid) for kid in children(api.pid))
        load.close()
        stack.stop_all()
    env.truncate()


def _open_loops(
    env: BenchEnv, post: Callable[[int], bool], *, reps: int, duration: float
) -> dict[str, Any]:
    """Creates at 50, 100 and 200 req/s, each run followed by the same rate of raw
    transactions (those of the raw section) in the state the database is in then: a stall
    of MariaDB's own - a redo-log checkpoint's page flushing after the closed loops'
    writes holds every commit for up to ~0.5 s with this machine's small buffer pool and
    redo log - shows in both p99s, and is not the API's."""
    out: dict[str, Any] = {}
    with raw.mysql_transactions(env.database_url, OPEN_LOOP_THREADS) as raw_tx:
        for rate in (50, 100, 200):
            p50s, p99s, raw_p50s, raw_p99s, achieved, errs = [], [], [], [], [], 0
            for rep in range(reps):
                progress("api", f"open loop {rate} req/s, run {rep + 1}/{reps}")
                lat, errors, got = open_loop(rate, duration, post)
                p50s.append(percentile(lat, 50) * 1000)
                p99s.append(percentile(lat, 99) * 1000)
                achieved.append(got)
                errs += errors
                raw_lat, _errors, _got = open_loop(rate, duration, raw_tx)
                raw_p50s.append(percentile(raw_lat, 50) * 1000)
                raw_p99s.append(percentile(raw_lat, 99) * 1000)
            out[f"open_{rate}"] = {
                "offered_per_s": rate,
                "achieved_per_s": summary(achieved),
                "p50_ms": summary(p50s),
                "p99_ms": summary(p99s),
                "errors": errs,
                "raw_tx_p50_ms": summary(raw_p50s),
                "raw_tx_p99_ms": summary(raw_p99s),
            }
    return out


def _batch(
    env: BenchEnv,
    load: HttpLoad,
    servers: Mapping[str, Sequence[int]],
    bodies: Sequence[dict[str, Any]],
    *,
    reps: int,
    duration: float,
) -> dict[str, Any]:
    """``POST /v1/emails/batch`` of 100 emails from 8 clients: emails/s and CPU per email."""
    batch = [
        load.render_post("/v1/emails/batch", {"emails": bodies[start : start + 100]})
        for start in range(0, len(bodies), 100)
    ]
    rates, cpu = [], []
    for rep in range(reps):
        progress("api", f"POST /v1/emails/batch (100 each), 8 clients, run {rep + 1}/{reps}")
        with CpuMeter(env, servers) as meter:
            rate, _lat, _errors = closed_loop(load, 8, duration, batch)
        cpu.append(meter.per_item_us(rate * 100 * duration))
        rates.append(rate * 100)
    return {"emails_per_s": summary(rates), "cpu": cpu_summary(cpu)}


# --- relay burn-down -------------------------------------------------------------------------


def relay_section(env: BenchEnv, results: dict[str, Any]) -> None:
    section = "relay"
    rows = 10_000 if env.quick else 50_000
    reps = 3
    out: dict[str, Any] = results.setdefault("relay", {"rows": rows})
    queue = env.queue("relay")
    settings = env.settings(queue)
    fastpath = FastPath(REDIS_URL, namespace=queue)
    connection = blocking_connection(RABBITMQ_URL)
    channel = connection.channel()
    declare_topology(channel, queue)
    try:
        out["floor"] = _outbox_floor(env, channel, queue, rows, reps)
        for relays in (1, 2):
            with running_stack(settings, env.workdir) as stack:
                procs = [start_relay(stack) for _ in range(relays)]
                runs, to_queue, cpu = [], [], []
                for rep in range(reps):
                    env.truncate()
                    channel.queue_purge(queue)
                    progress(section, f"{relays} relay(s): scheduling {rows} rows, run {rep + 1}")
                    _make_due(env, rows, settle=1.0)  # the relays idle meanwhile
                    meter = CpuMeter(env, {"relay": [p.pid for p in procs]})
                    meter.start()
                    t0 = time.monotonic()
                    fastpath.notify_due()
                    progress(section, f"{relays} relay(s): {rows} rows due, draining")
                    # pika is not thread-safe: only this thread asks; the ticker reads `seen`
                    seen = [0]

                    def in_queue(seen: list[int] = seen) -> bool:
                        seen[0] = queue_depth(channel, queue)
                        return seen[0] >= rows

                    with Ticker(section, lambda seen=seen: f"{seen[0]} in the queue"):  # type: ignore[misc]
                        wait_until(in_queue, 300, 0.02)
                        queued = time.monotonic()
                        wait_until(lambda: _unpublished(env) == 0, 120, 0.05)
                    done = time.monotonic()
                    meter.stop()
                    cpu.append(meter.per_item_us(rows))
                    runs.append(rows / (done - t0))
                    to_queue.append(rows / (queued - t0))
                    progress(section, f"{relays} relay(s): {runs[-1]:.0f} rows/s")
                out[f"relays_{relays}"] = {
                    "rows_per_s": summary(runs),
                    "rows_per_s_until_in_queue": summary(to_queue),
                    "relay_rss_kib": [rss_kib(p.pid) for p in procs],
                    "cpu": cpu_summary(cpu),
                }
                stack.stop_all()
    finally:
        channel.queue_purge(queue)
        connection.close()
        fastpath.close()
    env.truncate()


def _make_due(env: BenchEnv, rows: int, settle: float = 0.0) -> None:
    """``rows`` scheduled emails, then (after ``settle`` seconds) all of their outbox rows
    due at once."""
    insert_emails(env.engine, [datetime.now(UTC) + timedelta(days=1)] * rows)
    time.sleep(settle)
    with env.engine.begin() as conn:
        conn.execute(
            sa.text(
                "UPDATE outbox SET fire_at = UTC_TIMESTAMP(6) - INTERVAL 1 SECOND,"
                " available_at = UTC_TIMESTAMP(6) - INTERVAL 1 SECOND"
            )
        )


def _outbox_floor(env: BenchEnv, channel: Any, queue: str, rows: int, reps: int) -> dict[str, Any]:
    """The same burn-down by the plainest correct relay (``raw.outbox_floor_client``, a
    process of its own): what the outbox pattern itself costs here, for comparison."""
    pool = raw.spawn_pool(1)
    runs, cpu = [], []
    try:
        for rep in range(reps):
            env.truncate()
            channel.queue_purge(queue)
            progress("relay", f"plain relay (floor): {rows} rows due, run {rep + 1}/{reps}")
            _make_due(env, rows)
            meter = CpuMeter(env)
            meter.start()
            done, seconds, elapsed = pool.submit(
                raw.outbox_floor_client, env.database_url, queue
            ).result()
            meter.stop()
            if done != rows:
                raise RuntimeError(f"the plain relay published {done} of {rows} rows")
            meter.seconds["client"] = seconds
            cpu.append(meter.per_item_us(done))
            runs.append(done / elapsed)
            progress("relay", f"plain relay (floor): {runs[-1]:.0f} rows/s")
    finally:
        pool.shutdown()
    return {"rows_per_s": summary(runs), "cpu": cpu_summary(cpu)}


def _unpublished(env: BenchEnv) -> int:
    with env.engine.connect() as conn:
        return int(
            conn.execute(sa.text("SELECT COUNT(*) FROM outbox WHERE published_at IS NULL")).scalar()
            or 0
        )


# --- worker ---------------------------------------------------------------------------------


def arrivals(env: BenchEnv, ids: set[str]) -> dict[str, datetime]:
    """First SMTP arrival per email id among ``ids``."""
    found: dict[str, datetime] = {}
    for item in env.smtp.received:
        if item.email_id in ids and item.email_id not in found:
            found[item.email_id] = item.arrived_at
    return found


def count_arrived(env: BenchEnv, ids: set[str]) -> int:
    return sum(1 for item in env.smtp.handler.received if item.email_id in ids)


def wait_deliveries(env: BenchEnv, section: str, wanted: set[str], timeout: float) -> None:
    """Until every email of ``wanted`` reached the sink (or ``timeout``), with progress."""

    def arrived() -> int:
        return count_arrived(env, wanted)

    with Ticker(section, lambda: f"{arrived()}/{len(wanted)} delivered"):
        wait_until(lambda: arrived() >= len(wanted), timeout, 0.05)


def worker_section(env: BenchEnv, results: dict[str, Any]) -> None:
    section = "worker"
    messages = 500 if env.quick else 3000  # a run of ~7 s: start-up weighs little
    reps = 3
    out: dict[str, Any] = results.setdefault("worker", {"messages": messages})
    queue = env.queue("worker")
    settings = env.settings(queue)
    for workers in (1, 2):
        with running_stack(settings, env.workdir) as stack:
            procs = [start_worker(stack) for _ in range(workers)]
            connection = blocking_connection(RABBITMQ_URL)
            channel = connection.channel()
            runs, cpu = [], []
            for rep in range(reps):
                env.truncate()
                env.smtp.handler.received.clear()
                ids = insert_emails(
                    env.engine, [datetime.now(UTC) - timedelta(seconds=1)] * messages
                )
                wanted = set(ids)
                progress(section, f"{workers} worker(s): {messages} messages, run {rep + 1}/{reps}")
                meter = CpuMeter(env, {"worker": [p.pid for p in procs]})
                meter.start()
                t0 = datetime.now(UTC)
                for email_id in ids:
                    message = DeliveryMessage(email_id, 1)
                    channel.basic_publish(
                        "", queue, message.encode(), message_properties(message.message_id)
                    )
                wait_deliveries(env, section, wanted, 300)
                meter.stop()
                cpu.append(meter.per_item_us(messages))
                last = max(arrivals(env, wanted).values())
                runs.append(messages / (last - t0).total_seconds())
                progress(section, f"{workers} worker(s): {runs[-1]:.0f} deliveries/s")
            out[f"workers_{workers}"] = {
                "deliveries_per_s": summary(runs),
                "worker_rss_kib": [rss_kib(p.pid) for p in procs],
                "cpu": cpu_summary(cpu),
            }
            connection.close()
            stack.stop_all()
    env.truncate()


# --- pipeline: on time and bursts --------------------------------------------------------------


def lateness(send_at: dict[str, datetime], arrived: dict[str, datetime]) -> dict[str, Any]:
    late = [(arrived[i] - send_at[i]).total_seconds() for i in send_at if i in arrived]
    stats = latency_summary(late)
    stats["early"] = sum(1 for x in late if x < 0)
    stats["missing"] = len(send_at) - len(late)
    return stats


def ontime_and_burst(env: BenchEnv, results: dict[str, Any]) -> None:
    out: dict[str, Any] = results.setdefault("pipeline", {})
    queue = env.queue("pipeline")
    settings = env.settings(queue)
    seconds = 20 if env.quick else 60
    with running_stack(settings, env.workdir) as stack:
        stack.start_api()
        start_relay(stack)
        workers = [start_worker(stack) for _ in range(2)]
        out["setup"] = "api + 1 relay + 2 workers, RELAY_POLL_INTERVAL=1.0, WORKER_PREFETCH=50"
        out["ontime"] = ontime(env, stack, seconds)
        for n in (5000, 20000) if not env.quick else (2000, 5000):
            out[f"burst_{n}"] = burst(env, n)
        out["worker_rss_kib"] = [rss_kib(w.pid) for w in workers]
        stack.stop_all()
    env.truncate()


def ontime(env: BenchEnv, stack: Stack, seconds: int) -> dict[str, Any]:
    section = "on-time"
    rate = 100
    total = rate * seconds
    t0 = datetime.now(UTC) + timedelta(seconds=ONTIME_LEAD)
    send_ats = [t0 + timedelta(seconds=i / rate) for i in range(total)]
    client = stack.client(API_KEY)
    ids: dict[str, datetime] = {}
    progress(section, f"scheduling {total} emails through the batch API, due {rate}/s")
    for start in range(0, total, 1000):
        chunk = send_ats[start : start + 1000]
        response = client.post("/v1/emails/batch", json={"emails": [email_body(s) for s in chunk]})
        response.raise_for_status()
        for item, s in zip(response.json()["items"], chunk, strict=True):
            ids[item["id"]] = s
    scheduled_before = (t0 - datetime.now(UTC)).total_seconds()
    progress(section, f"scheduled {scheduled_before:.1f} s before the first send_at")
    wanted = set(ids)
    with (
        CommitProbe(env.engine) as probe,
        Ticker(section, lambda: f"{count_arrived(env, wanted)}/{total} arrived"),
    ):
        wait_until(lambda: count_arrived(env, wanted) >= total, seconds + 60, 0.2)
    got = arrivals(env, wanted)
    stats = lateness(ids, got)
    stats["db_commit"] = probe.summary(t0)
    # The emails over 50 ms late, and how many of them were due while MariaDB held its
    # commits (or just before: a message comes a lead ahead and is claimed then).
    late = [s for i, s in ids.items() if i in got and (got[i] - s).total_seconds() > 0.05]
    stats["late_over_50ms"] = len(late)
    stats["late_over_50ms_in_db_stall"] = sum(
        any(
            at - LEAD - timedelta(seconds=0.05) <= s <= at + timedelta(seconds=took)
            for at, took in probe.stalls
        )
        for s in late
    )
    stats["rate_per_s"] = rate
    stats["seconds"] = seconds
    stats["scheduled_seconds_before_first_send_at"] = scheduled_before
    progress(section, f"p50 {stats['p50_ms']:.1f} ms, p99 {stats['p99_ms']:.1f} ms")
    return stats


def burst(env: BenchEnv, n: int) -> dict[str, Any]:
    section = f"burst {n}"
    lead = BURST_LEAD.get(n, 3 + n / 2500)
    send_at = datetime.now(UTC) + timedelta(seconds=lead)
    progress(section, f"scheduling {n} emails due at one instant, {lead:.0f} s ahead")
    ids = insert_emails(env.engine, [send_at] * n)
    scheduled_by = (datetime.now(UTC) - send_at).total_seconds()
    wanted = set(ids)
    with (
        CommitProbe(env.engine) as probe,
        Ticker(section, lambda: f"{count_arrived(env, wanted)}/{n} arrived"),
    ):
        wait_until(lambda: count_arrived(env, wanted) >= n, lead + BURST_CUTOFF, 0.1)
    stats = burst_stats(ids, send_at, arrivals(env, wanted))
    stats["db_commit"] = probe.summary(send_at)
    stats["scheduled_seconds_before_send_at"] = -scheduled_by
    progress(section, f"last arrival {stats['last_after_send_at_s']} s after send_at")
    return stats


def burst_stats(ids: list[str], send_at: datetime, got: dict[str, datetime]) -> dict[str, Any]:
    """Lateness of a burst; when cut off, the last arrival is at least the cut-off."""
    stats = lateness(dict.fromkeys(ids, send_at), got)
    last = max(got.values()) if got else None
    stats["arrived"] = len(got)
    stats["cut_off"] = len(got) < len(ids)
    if stats["cut_off"]:
        stats["last_after_send_at_s"] = BURST_CUTOFF
        stats["last_is_lower_bound"] = True
        if got:
            first = min(got.values())
            span = (last - first).total_seconds() if last else 0
            stats["rate_per_s"] = len(got) / span if span else None
    else:
        stats["last_after_send_at_s"] = (last - send_at).total_seconds() if last else None
    return stats


# --- scale: empty polls and memory --------------------------------------------------------------


def empty_polls(env: BenchEnv, polls: int, *, full: bool = False) -> list[float]:
    """Seconds per claim transaction that finds nothing due: the relay's own claims,
    floored by its ``ScanWindow`` (a full scan first and every 5 s), or with ``full``
    every claim a full scan of the due index."""
    lookahead, lease = timedelta(seconds=1.25), timedelta(seconds=60)
    window = outbox.ScanWindow()
    times = []
    for _ in range(polls):
        floor = None if full else window.floor()

        def claim(conn: Connection, floor: datetime | None = floor) -> tuple[datetime, int]:
            now = db_now(conn)
            rows = outbox.claim_due(
                conn,
                horizon=now + lookahead,
                limit=500,
                lease_until=now + lease,
                claimed_by="bench",
                floor=floor,
            )
            return now, len(rows)

        start = time.perf_counter()
        now, found = transaction(env.engine, claim)
        times.append(time.perf_counter() - start)
        if found:
            raise RuntimeError("empty poll found due rows")
        window.scanned(floor, now, complete=True)
    return times


def poll_summary(env: BenchEnv, reps: int, polls: int) -> dict[str, Any]:
    """The relay's empty polls (median, p99) and, for comparison, unfloored full scans."""
    medians, p99s, full = [], [], []
    for _ in range(reps):
        times = empty_polls(env, polls)
        medians.append(percentile(times, 50) * 1000)
        p99s.append(percentile(times, 99) * 1000)
        full.append(percentile(empty_polls(env, max(1, polls // 10), full=True), 50) * 1000)
    return {
        "median_ms": summary(medians),
        "p99_ms": summary(p99s),
        "full_scan_median_ms": summary(full),
        "polls": polls,
    }


def scale_section(env: BenchEnv, results: dict[str, Any]) -> None:  # noqa: PLR0915
    section = "scale"
    out: dict[str, Any] = results.setdefault("scale", {})
    big = 200_000 if env.quick else 1_000_000
    scheduled = 20_000 if env.quick else 100_000
    reps, polls = 3, 200
    env.truncate()

    # memory first, on a small database
    queue = env.queue("scale")
    settings = env.settings(queue)
    with running_stack(settings, env.workdir) as stack:
        relay = start_relay(stack)
        worker = start_worker(stack)
        beam = broker_pid()
        time.sleep(5)

        def rss() -> dict[str, int]:
            found = {"relay": rss_kib(relay.pid), "worker": rss_kib(worker.pid)}
            if beam is not None:
                found["broker"] = rss_kib(beam)
            return found

        before = rss()
        progress(section, f"RSS with nothing scheduled {before}; scheduling {scheduled}")
        bulk_future_rows(
            env.engine, scheduled, datetime.now(UTC) + timedelta(minutes=10), timedelta(hours=1)
        )
        time.sleep(6)
        after = rss()
        progress(section, f"RSS with {scheduled} scheduled {after}")
        out["rss"] = {"scheduled": scheduled, "none_kib": before, "scheduled_kib": after}
        stack.stop_all()
    env.truncate()

    progress(section, "empty polls, empty outbox")
    out["poll_none"] = poll_summary(env, reps, polls)
    progress(section, f"loading {big} future emails")
    started = time.monotonic()
    bulk_future_rows(env.engine, big, datetime.now(UTC) + timedelta(hours=1), timedelta(days=1))
    out["future_rows"] = big
    out["load_seconds"] = time.monotonic() - started
    progress(section, f"empty polls with {big} future rows")
    out["poll_future"] = poll_summary(env, reps, polls)

    # The trap: a drain right after which another session still holds a snapshot.
    drained = 10_000 if env.quick else 50_000
    holder = env.engine.connect()
    try:
        holder.exec_driver_sql("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        holder.exec_driver_sql("START TRANSACTION WITH CONSISTENT SNAPSHOT")
        holder.exec_driver_sql("SELECT COUNT(*) FROM idempotency_keys").all()
        progress(section, f"drain of {drained} rows while a snapshot is held open")
        _drain(env, drained)
        out["poll_future_open_tx"] = poll_summary(env, reps, polls)
        out["drained_rows"] = drained
    finally:
        holder.rollback()
        holder.close()
    time.sleep(5)
    out["poll_future_after_purge"] = poll_summary(env, 1, polls)
    env.truncate()


def _drain(env: BenchEnv, rows: int) -> None:
    """Due rows published the way the relay does it: flagged in groups of 500 ids."""
    with env.engine.begin() as conn:
        start = int(conn.execute(sa.text("SELECT COALESCE(MAX(id), 0) FROM outbox")).scalar() or 0)
    insert_emails(env.engine, [datetime.now(UTC) - timedelta(seconds=5)] * rows)
    now = datetime.now(UTC)
    with env.engine.begin() as conn:
        ids = [
            r[0] for r in conn.execute(sa.text("SELECT id FROM outbox WHERE id > :s"), {"s": start})
        ]
    for i in range(0, len(ids), 500):
        with env.engine.begin() as conn:
            outbox.mark_published(conn, ids[i : i + 500], now)


SECTIONS: dict[str, Callable[[BenchEnv, dict[str, Any]], None]] = {
    "api": api_section,
    "relay": relay_section,
    "worker": worker_section,
    "pipeline": ontime_and_burst,
    "scale": scale_section,
}
__all__ = ["SECTIONS", "Process", "arrivals", "count_arrived", "lateness"]
