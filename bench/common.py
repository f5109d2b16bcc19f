"""What every bench section shares: the run's names, settings, timing, stats, progress,
database/queue helpers and the real processes (``tests.support.stack``)."""

from __future__ import annotations

import os
import secrets
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from services.api.deps import fingerprint
from services.core import emails
from services.core.broker import blocking_connection, dead_letter_queue
from services.core.db import create_db_engine
from services.core.emails import NewEmail
from services.core.migrate import migrate
from services.core.schema import metadata
from services.core.settings import Settings
from services.worker.compose import ADDRESS_CACHE_SIZE
from tests.support.smtp_sink import SmtpSink
from tests.support.stack import Process, Stack

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
RUN_ID = secrets.token_hex(4)
API_KEY = "bench-" + secrets.token_hex(16)
OWNER = fingerprint(API_KEY)
MAIL_FROM = "bench@example.com"
BODY_TEXT = "Hello from the emailsched benchmark. " * 6  # ~220 bytes, like a short notice

SERVER_URL = os.environ.get("BENCH_DATABASE_URL", "mysql+pymysql://root@127.0.0.1:3306")
RABBITMQ_URL = os.environ.get("BENCH_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")

_START = time.monotonic()


def progress(section: str, message: str) -> None:
    """One progress line on stderr: elapsed time, section, what is happening."""
    elapsed = time.monotonic() - _START
    sys.stderr.write(
        f"[bench {int(elapsed) // 60:02d}:{int(elapsed) % 60:02d}] {section}: {message}\n"
    )
    sys.stderr.flush()


# --- statistics -------------------------------------------------------------------------


def summary(values: Sequence[float]) -> dict[str, Any]:
    """Median with min/max of the runs, and the runs themselves."""
    vals = [float(v) for v in values]
    if not vals:
        return {"median": None, "min": None, "max": None, "runs": []}
    return {
        "median": statistics.median(vals),
        "min": min(vals),
        "max": max(vals),
        "runs": vals,
    }


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sample."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def latency_summary(seconds: Sequence[float]) -> dict[str, Any]:
    """p50/p99/max in milliseconds of one sample."""
    if not seconds:
        return {"n": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    return {
        "n": len(seconds),
        "p50_ms": percentile(seconds, 50) * 1000,
        "p99_ms": percentile(seconds, 99) * 1000,
        "max_ms": max(seconds) * 1000,
    }


# --- the run's own database, queues and settings ----------------------------------------


@dataclass
class BenchEnv:
    quick: bool
    workdir: Path
    db_name: str = field(default_factory=lambda: f"emailsched_bench_{RUN_ID}")
    queues: list[str] = field(default_factory=list)
    sink: SmtpSink | None = None
    _engine: Engine | None = None

    @property
    def database_url(self) -> str:
        return f"{SERVER_URL}/{self.db_name}"

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = create_db_engine(self.database_url, pool_size=8)
        return self._engine

    def setup(self) -> None:
        migrate(self.database_url)
        # The sink offers PIPELINING, as Postfix and the large providers do: the worker
        # then sends MAIL, RCPT and DATA in one write, and so does the raw SMTP client.
        self.sink = SmtpSink(pipelining=True)
        self.sink.__enter__()

    def queue(self, purpose: str) -> str:
        name = f"emails_bench_{RUN_ID}_{purpose}"
        self.queues.append(name)
        return name

    @property
    def smtp(self) -> SmtpSink:
        if self.sink is None:
            raise RuntimeError("BenchEnv.setup() has not run")
        return self.sink

    def settings(self, queue: str, **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "database_url": self.database_url,
            "rabbitmq_url": RABBITMQ_URL,
            "redis_url": REDIS_URL,
            "email_queue": queue,
            "smtp_host": self.smtp.host,
            "smtp_port": self.smtp.port,
            "mail_from": MAIL_FROM,
            "api_keys": API_KEY,
        }
        values.update(overrides)
        return Settings(_env_file=None, **values)

    def truncate(self) -> None:
        with self.engine.begin() as conn:
            for table in reversed(metadata.sorted_tables):
                conn.execute(sa.text(f"TRUNCATE TABLE `{table.name}`"))

    def teardown(self) -> None:
        if self.sink is not None:
            self.sink.__exit__(None, None, None)
        if self._engine is not None:
            self._engine.dispose()
        server = create_db_engine(SERVER_URL + "/")
        with server.begin() as conn:
            conn.execute(sa.text(f"DROP DATABASE IF EXISTS `{self.db_name}`"))
        server.dispose()
        delete_queues(self.queues)
        clear_redis(self.queues)


def delete_queues(names: Iterable[str]) -> None:
    connection = blocking_connection(RABBITMQ_URL)
    try:
        channel = connection.channel()
        for name in names:
            for queue in (name, dead_letter_queue(name)):
                channel.queue_delete(queue)
    finally:
        connection.close()


def clear_redis(namespaces: Iterable[str]) -> None:
    import redis  # noqa: PLC0415

    client = redis.Redis.from_url(REDIS_URL)
    try:
        for name in namespaces:
            keys = list(client.scan_iter(f"emailsched:{name}:*"))
            if keys:
                client.delete(*keys)
    finally:
        client.close()


def queue_depth(channel: Any, name: str) -> int:
    """Messages ready in ``name`` (a passive declare)."""
    return int(channel.queue_declare(name, passive=True).method.message_count)


# --- emails ------------------------------------------------------------------------------


# More recipients than a worker keeps parsed addresses, taken in turn across calls (a
# worker bench's runs would otherwise send to the same 3,000 again, all kept parsed after
# the first), so every recipient costs a worker what a new one would (the sender's From
# repeats, as it does in real traffic).
RECIPIENTS = 2 * ADDRESS_CACHE_SIZE
_recipient_turn = 0


def new_email(send_at: datetime | None, index: int = 0) -> NewEmail:
    return NewEmail(
        to=[f"rcpt{index % RECIPIENTS}@example.com"],
        from_addr=MAIL_FROM,
        subject="Benchmark notice",
        send_at=send_at,
        text=BODY_TEXT,
    )


def insert_emails(
    engine: Engine,
    send_ats: Sequence[datetime],
    *,
    per_tx: int = 1000,
    threads: int = 4,
) -> list[str]:
    """Schedule emails straight into MySQL with ``emails.create`` in big transactions."""
    global _recipient_turn
    first, _recipient_turn = _recipient_turn, _recipient_turn + len(send_ats)
    chunks = [send_ats[i : i + per_tx] for i in range(0, len(send_ats), per_tx)]

    def work(start: int, chunk: Sequence[datetime]) -> list[str]:
        now = datetime.now(UTC)
        rows = [new_email(s, start + i) for i, s in enumerate(chunk)]
        with engine.begin() as conn:
            return emails.create(conn, OWNER, rows, now)

    with ThreadPoolExecutor(threads) as pool:
        starts = range(first, first + len(send_ats), per_tx)
        return [email_id for ids in pool.map(work, starts, chunks) for email_id in ids]


def bulk_future_rows(engine: Engine, count: int, start: datetime, spread: timedelta) -> None:
    """``count`` scheduled emails + outbox rows with INSERT ... SELECT from MariaDB's
    sequence engine (setup speed only: the same columns ``emails.create`` writes)."""
    step_us = max(1, int(spread.total_seconds() * 1_000_000 / count))
    base = start.astimezone(UTC).replace(tzinfo=None).isoformat(sep=" ")
    chunk = 250_000
    for offset in range(0, count, chunk):
        n = min(chunk, count - offset)
        lo, hi = offset + 1, offset + n
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO emails (id, owner, status, version, send_at, due_at, from_addr,"  # noqa: S608 (only integers formatted in)
                    " to_addrs, cc_addrs, bcc_addrs, subject, text_body, headers, metadata,"
                    " message_id, attempts, created_at, updated_at)"
                    " SELECT CONCAT('bulk-', :run, '-', LPAD(seq, 20, '0')), :owner, 'pending', 1,"
                    " TIMESTAMPADD(MICROSECOND, seq * :step, :base),"
                    " TIMESTAMPADD(MICROSECOND, seq * :step, :base), :sender,"
                    " '[\"rcpt@example.com\"]', '[]', '[]', 'Benchmark notice', :body, '{}', '{}',"
                    " CONCAT('<bulk-', seq, '@example.com>'), 0, UTC_TIMESTAMP(6), UTC_TIMESTAMP(6)"
                    f" FROM seq_{lo}_to_{hi}"
                ),
                {
                    "run": RUN_ID,
                    "owner": OWNER,
                    "step": step_us,
                    "base": base,
                    "sender": MAIL_FROM,
                    "body": BODY_TEXT,
                },
            )
            conn.execute(
                sa.text(
                    "INSERT INTO outbox (email_id, version, fire_at, available_at)"  # noqa: S608 (only integers formatted in)
                    " SELECT CONCAT('bulk-', :run, '-', LPAD(seq, 20, '0')), 1,"
                    " TIMESTAMPADD(MICROSECOND, seq * :step, :base),"
                    " TIMESTAMPADD(MICROSECOND, seq * :step, :base)"
                    f" FROM seq_{lo}_to_{hi}"
                ),
                {"run": RUN_ID, "step": step_us, "base": base},
            )


# --- processes ---------------------------------------------------------------------------


def wait_for_log(process: Process, text: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in process.log():
            return
        if not process.alive():
            raise RuntimeError(f"{process.kind} exited:\n{process.log()[-3000:]}")
        time.sleep(0.05)
    raise RuntimeError(
        f"{process.kind} did not log {text!r} in {timeout}s:\n{process.log()[-3000:]}"
    )


def start_relay(stack: Stack) -> Process:
    process = stack.start("relay")
    wait_for_log(process, "rabbitmq connected")
    wait_for_log(process, "relay ")
    return process


def start_worker(stack: Stack) -> Process:
    process = stack.start("worker")
    wait_for_log(process, "consuming from")
    return process


def rss_kib(pid: int) -> int:
    """VmRSS of a process in KiB (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _local_process(names: tuple[str, ...], cmdline_holds: bytes = b"") -> int | None:
    """The pid of a process on this machine whose command name is one of ``names`` (and
    whose command line holds ``cmdline_holds``), to read - never signal - its figures."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() in names and (
                    cmdline_holds in (entry / "cmdline").read_bytes()
                ):
                    return int(entry.name)
            except OSError:
                continue
    return None


def broker_pid() -> int | None:
    """RabbitMQ's beam.smp on this machine (its RSS, its CPU time)."""
    return _local_process(("beam.smp",), b"rabbit")


def mariadb_pid() -> int | None:
    """The local MySQL/MariaDB server (its CPU time)."""
    return _local_process(("mariadbd", "mysqld"))


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """User + system CPU time of a process (every thread), or of one of its threads;
    0 once it is gone."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    try:
        fields = Path(path).read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


class CpuMeter:
    """Where the CPU went while a measurement ran: the CPU time of each part - our
    processes, MariaDB, RabbitMQ, the sink's thread, the rest of the bench process (the
    load generator) - between ``start`` and ``stop``, or over a ``with`` block. A part on
    another machine (a ``BENCH_*_URL`` elsewhere) is simply not counted."""

    def __init__(self, env: BenchEnv, ours: Mapping[str, Sequence[int]] | None = None) -> None:
        self._me = os.getpid()
        self._parts: dict[str, list[tuple[int, int | None]]] = {
            name: [(pid, None) for pid in pids] for name, pids in (ours or {}).items()
        }
        for name, pid in (("mariadb", mariadb_pid()), ("broker", broker_pid())):
            if pid is not None:
                self._parts[name] = [(pid, None)]
        self._parts["sink"] = [(self._me, env.smtp.native_thread_id)]
        self._started: dict[str, float] = {}
        self.seconds: dict[str, float] = {}

    def _read(self) -> dict[str, float]:
        values = {
            name: sum(cpu_seconds(pid, tid) for pid, tid in where)
            for name, where in self._parts.items()
        }
        values["bench"] = cpu_seconds(self._me) - values["sink"]
        return values

    def start(self) -> None:
        self._started = self._read()

    def stop(self) -> None:
        now = self._read()
        # "bench" is the process less the sink's thread, each counted in 10 ms ticks read
        # a moment apart: when the rest of the process did next to nothing it can come
        # out a tick below zero.
        self.seconds = {name: max(0.0, now[name] - self._started[name]) for name in now}

    def __enter__(self) -> CpuMeter:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def per_item_us(self, items: float) -> dict[str, float]:
        """Microseconds of CPU per item, by part."""
        return {name: s / items * 1e6 for name, s in self.seconds.items()} if items else {}


def cpu_summary(runs: Sequence[dict[str, float]]) -> dict[str, Any]:
    """Per part, the median (min/max) over the runs of CPU us per item; ``total`` sums
    the parts' medians."""
    parts = {name: summary([run[name] for run in runs if name in run]) for name in runs[0]}
    out: dict[str, Any] = {"unit": "us/item", **parts}
    out["total"] = sum(part["median"] for part in parts.values())
    return out


def wait_until(check: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval)
    return check()


class CommitProbe:
    """Commits a one-row UPDATE every 10 ms on a connection of its own, from a thread,
    while a latency measurement runs: MariaDB's own stalls (a redo-log checkpoint's page
    flushing holds every commit at once) in the same seconds, told apart from ours.
    ``stalls``: (start, seconds) of each commit held over ``STALL`` seconds."""

    STALL = 0.05

    def __init__(self, engine: Engine, every: float = 0.01) -> None:
        self._engine, self._every = engine, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._times: list[float] = []
        self.stalls: list[tuple[datetime, float]] = []

    def _run(self) -> None:
        with self._engine.connect() as conn:
            while not self._stop.wait(self._every):
                wall, start = datetime.now(UTC), time.monotonic()
                conn.exec_driver_sql("UPDATE bench_commit_probe SET n = n + 1 WHERE id = 1")
                conn.commit()
                took = time.monotonic() - start
                self._times.append(took)
                if took > self.STALL:
                    self.stalls.append((wall, took))

    def __enter__(self) -> CommitProbe:
        with self._engine.begin() as conn:
            conn.exec_driver_sql(
                "CREATE TABLE IF NOT EXISTS bench_commit_probe (id INT PRIMARY KEY, n BIGINT)"
            )
            conn.exec_driver_sql("REPLACE INTO bench_commit_probe VALUES (1, 0)")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        with self._engine.begin() as conn:
            conn.exec_driver_sql("DROP TABLE IF EXISTS bench_commit_probe")

    def summary(self, origin: datetime) -> dict[str, Any]:
        """Commit latencies, and the stalls as seconds after ``origin`` and milliseconds."""
        return {
            **latency_summary(self._times),
            "stalled_s": sum(took for _, took in self.stalls),
            "stalls": [
                {"at_s": round((at - origin).total_seconds(), 3), "ms": round(took * 1000, 1)}
                for at, took in self.stalls
            ],
        }


class Ticker:
    """Prints a progress line every few seconds from a thread while a long step runs."""

    def __init__(self, section: str, describe: Callable[[], str], every: float = 5.0) -> None:
        self._section, self._describe, self._every = section, describe, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            progress(self._section, self._describe())

    def __enter__(self) -> Ticker:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
