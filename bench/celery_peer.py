"""Celery 5 on the same RabbitMQ, the same SMTP sink, the same N and due times.

Tasks are scheduled with ``apply_async(eta=...)`` from the bench process; one
``celery worker -P prefork -c 2`` (two processes, like the two emailsched workers of the
pipeline) runs as a subprocess, started and stopped by PID. Measured: on-time lateness at
100/s over a minute, bursts of 5,000 and 20,000 sharing one ETA, and the worker's RSS
(main process + pool children) with 100,000 ETA tasks held vs none. Its queue and
exchange are deleted at the end.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pika
import pika.exceptions

from bench.common import (
    RABBITMQ_URL,
    ROOT,
    RUN_ID,
    BenchEnv,
    Ticker,
    children,
    progress,
    rss_kib,
    wait_until,
)
from bench.system import (
    BURST_CUTOFF,
    BURST_LEAD,
    ONTIME_LEAD,
    arrivals,
    burst_stats,
    count_arrived,
    lateness,
)
from services.core.broker import blocking_connection
from services.core.ids import new_id

SECTION = "celery"


class CeleryWorker:
    def __init__(self, env: BenchEnv, queue: str, name: str) -> None:
        self.queue = queue
        self.log_path = env.workdir / f"celery-{name}.log"
        environ = {
            **os.environ,
            "BENCH_CELERY_BROKER": RABBITMQ_URL,
            "BENCH_CELERY_QUEUE": queue,
            "BENCH_SMTP_HOST": env.smtp.host,
            "BENCH_SMTP_PORT": str(env.smtp.port),
        }
        with self.log_path.open("wb") as out:
            self.popen = subprocess.Popen(  # noqa: S603
                [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    "bench.celery_app",
                    "worker",
                    "-P",
                    "prefork",
                    "-c",
                    "2",
                    "-Q",
                    queue,
                    "-n",
                    f"bench-{RUN_ID}-{name}@%h",
                    "--without-gossip",
                    "--without-mingle",
                    "--without-heartbeat",
                    "-l",
                    "WARNING",
                ],
                cwd=ROOT,
                env=environ,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def wait_ready(self, timeout: float = 60) -> None:
        """Until the worker consumes from its queue (which it declares itself)."""

        def consuming() -> bool:
            if self.popen.poll() is not None:
                raise RuntimeError(f"celery worker exited:\n{self.log_path.read_text()[-3000:]}")
            connection, channel = _channel()
            try:
                frame = channel.queue_declare(self.queue, passive=True)
                return int(frame.method.consumer_count) > 0
            except pika.exceptions.ChannelClosedByBroker:
                return False  # not declared yet
            finally:
                if connection.is_open:
                    connection.close()

        with _quiet("pika.channel"):  # it logs each expected 404 as a WARNING
            ready = wait_until(consuming, timeout, 0.3)
        if not ready:
            raise RuntimeError(f"celery worker not consuming:\n{self.log_path.read_text()[-3000:]}")

    def rss(self) -> dict[str, int]:
        kids = children(self.pid)
        main = rss_kib(self.pid)
        return {"main_kib": main, "total_kib": main + sum(rss_kib(k) for k in kids)}

    def stop(self, timeout: float = 60) -> None:
        kids = children(self.pid)
        if self.popen.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        for kid in kids:  # pool children of this worker only, if any outlived it
            with contextlib.suppress(ProcessLookupError):
                os.kill(kid, signal.SIGKILL)


def _channel() -> tuple[pika.BlockingConnection, Any]:
    connection = blocking_connection(RABBITMQ_URL)
    return connection, connection.channel()


def run(env: BenchEnv, results: dict[str, Any]) -> None:
    queue = f"celery_bench_{RUN_ID}"
    os.environ["BENCH_CELERY_BROKER"] = RABBITMQ_URL
    os.environ["BENCH_CELERY_QUEUE"] = queue
    from bench.celery_app import app, send_email  # noqa: PLC0415

    out: dict[str, Any] = results.setdefault("celery", {})
    out["setup"] = "celery worker -P prefork -c 2, classic durable queue, apply_async(eta=...)"
    seconds = 20 if env.quick else 60
    try:
        worker = CeleryWorker(env, queue, "pipeline")
        try:
            worker.wait_ready()
            out["ontime"] = _ontime(env, send_email, seconds)
            for n in (5000, 20000) if not env.quick else (2000, 5000):
                out[f"burst_{n}"] = _burst(env, send_email, n)
        finally:
            worker.stop()
        _on_fresh_channel(lambda ch: ch.queue_purge(queue))

        scheduled = 20_000 if env.quick else 100_000
        worker = CeleryWorker(env, queue, "rss")
        try:
            worker.wait_ready()
            time.sleep(5)
            before = worker.rss()
            progress(SECTION, f"RSS with nothing scheduled {before}; scheduling {scheduled} ETAs")
            start = datetime.now(UTC) + timedelta(minutes=10)
            t0 = time.monotonic()
            seen = [-1]  # pika is not thread-safe: only this thread asks; the ticker reads

            def drained() -> bool:
                seen[0] = _depth(queue)
                return seen[0] == 0

            with Ticker(SECTION, lambda: f"queue holds {seen[0]} ready (-1: still publishing)"):
                for i in range(scheduled):
                    send_email.apply_async(
                        args=(new_id(), i), eta=start + timedelta(seconds=i * 3600 / scheduled)
                    )
                published = time.monotonic() - t0
                # Celery 5 raises its prefetch one ETA task at a time: on this machine it
                # took in a few thousand of the 100,000 in five minutes. Give it one, and
                # report what it holds rather than wait for all of them.
                wait_until(drained, 60, 0.5)
            time.sleep(5)
            after = worker.rss()
            held = scheduled - max(0, _depth(queue))
            progress(SECTION, f"RSS with {held} of {scheduled} ETA tasks taken in {after}")
            out["rss"] = {
                "scheduled": scheduled,
                "held_by_worker": held,
                "none": before,
                "scheduled_kib": after,
                "apply_async_per_s": scheduled / published,
            }
        finally:
            worker.stop()
            _on_fresh_channel(lambda ch: ch.queue_purge(queue))
    finally:
        _on_fresh_channel(lambda ch: (ch.queue_delete(queue), ch.exchange_delete(queue)))
        app.close()


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """Only errors from this logger meanwhile."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _depth(queue: str) -> int:
    return int(
        _on_fresh_channel(lambda ch: ch.queue_declare(queue, passive=True).method.message_count)
    )


def _on_fresh_channel(action: Any) -> Any:
    """Run ``action(channel)`` on a short-lived connection (a long-idle BlockingConnection
    misses its heartbeats and is closed by the broker)."""
    connection, channel = _channel()
    try:
        return action(channel)
    finally:
        if connection.is_open:
            connection.close()


def _ontime(env: BenchEnv, task: Any, seconds: int) -> dict[str, Any]:
    rate = 100
    total = rate * seconds
    t0 = datetime.now(UTC) + timedelta(seconds=ONTIME_LEAD)
    ids = {new_id(): t0 + timedelta(seconds=i / rate) for i in range(total)}
    progress(SECTION, f"on-time: {total} tasks with eta {rate}/s over {seconds} s")
    for i, (email_id, eta) in enumerate(ids.items()):
        task.apply_async(args=(email_id, i), eta=eta)
    scheduled_before = (t0 - datetime.now(UTC)).total_seconds()
    wanted = set(ids)
    with Ticker(SECTION, lambda: f"on-time: {count_arrived(env, wanted)}/{total} arrived"):
        wait_until(lambda: count_arrived(env, wanted) >= total, seconds + 90, 0.2)
    stats = lateness(ids, arrivals(env, wanted))
    stats["scheduled_seconds_before_first_send_at"] = scheduled_before
    progress(SECTION, f"on-time p50 {stats['p50_ms']} ms, p99 {stats['p99_ms']} ms")
    return stats


def _burst(env: BenchEnv, task: Any, n: int) -> dict[str, Any]:
    lead = BURST_LEAD.get(n, 3 + n / 2500)
    eta = datetime.now(UTC) + timedelta(seconds=lead)
    ids = [new_id() for _ in range(n)]
    progress(SECTION, f"burst {n}: apply_async with one eta {lead:.0f} s ahead")
    for i, email_id in enumerate(ids):
        task.apply_async(args=(email_id, i), eta=eta)
    scheduled_by = (datetime.now(UTC) - eta).total_seconds()
    wanted = set(ids)
    with Ticker(SECTION, lambda: f"burst {n}: {count_arrived(env, wanted)}/{n} arrived"):
        wait_until(lambda: count_arrived(env, wanted) >= n, lead + BURST_CUTOFF, 0.1)
    stats = burst_stats(ids, eta, arrivals(env, wanted))
    stats["scheduled_seconds_before_send_at"] = -scheduled_by
    progress(SECTION, f"burst {n}: last arrival {stats['last_after_send_at_s']} s after eta")
    return stats
