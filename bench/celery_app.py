"""The peer: a Celery 5 app whose one task sends an email with smtplib, as a Celery user
would write it (one SMTP connection kept per worker process, reopened when it drops).

Configured from the environment so that the bench process (the producer) and the
``celery worker`` subprocess agree: ``BENCH_CELERY_BROKER``, ``BENCH_CELERY_QUEUE``,
``BENCH_SMTP_HOST``, ``BENCH_SMTP_PORT``. The queue is a classic durable queue of the
run's own (Celery's default kind; its ETA handling predates quorum queues).
"""

from __future__ import annotations

import os
import smtplib
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime

from celery import Celery  # type: ignore[import-untyped]

QUEUE = os.environ.get("BENCH_CELERY_QUEUE", "celery_bench")
app = Celery(
    "bench_peer",
    broker=os.environ.get("BENCH_CELERY_BROKER", "amqp://guest:guest@127.0.0.1:5672//"),
)
app.conf.update(
    task_default_queue=QUEUE,
    task_default_exchange=QUEUE,
    task_default_routing_key=QUEUE,
    task_ignore_result=True,
    worker_enable_remote_control=False,  # no pidbox queues left behind
    worker_send_task_events=False,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)

_smtp: smtplib.SMTP | None = None


def _connection() -> smtplib.SMTP:
    global _smtp  # noqa: PLW0603
    if _smtp is None:
        _smtp = smtplib.SMTP(
            os.environ.get("BENCH_SMTP_HOST", "127.0.0.1"),
            int(os.environ.get("BENCH_SMTP_PORT", "1025")),
            timeout=30,
        )
        _smtp.ehlo()
    return _smtp


# The message matches bench.raw.smtp_message on purpose but is built here, per task as an
# application would; importing the bench (pika, SQLAlchemy, our services) would inflate
# the peer's memory figures.
@app.task(name="bench.send_email", ignore_result=True)  # type: ignore[untyped-decorator]
def send_email(email_id: str, index: int) -> None:
    global _smtp  # noqa: PLW0603
    message = EmailMessage()
    message["From"] = "bench@example.com"
    message["To"] = f"rcpt{index % 1000}@example.com"
    message["Subject"] = "Benchmark notice"
    message["Date"] = format_datetime(datetime.now(UTC))
    message["Message-ID"] = f"<{email_id}@example.com>"
    message["X-Email-Id"] = email_id
    message.set_content("Hello from the emailsched benchmark. " * 6)
    for attempt in range(2):
        try:
            _connection().send_message(message, "bench@example.com", [str(message["To"])])
            return
        except (smtplib.SMTPServerDisconnected, OSError):
            _smtp = None
            if attempt:
                raise
