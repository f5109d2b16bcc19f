"""Fixtures shared by every test layer. Each run gets its own database, queue names and
Redis key space, and removes them afterwards."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pika
import pytest
import redis
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from services.core.broker import connection_parameters, dead_letter_queue
from services.core.db import KeptConnection, create_db_engine
from services.core.migrate import migrate
from services.core.schema import metadata
from services.core.settings import Settings
from tests import services
from tests.support.smtp_sink import SmtpSink
from tests.support.stack import Stack, running_stack

RUN_ID = secrets.token_hex(4)


@pytest.fixture(scope="session")
def service_urls() -> Iterator[services.ServiceUrls]:
    with services.resolve() as urls:
        yield urls


@pytest.fixture(scope="session")
def database_url(service_urls: services.ServiceUrls) -> Iterator[str]:
    """A fresh database for this run, migrated to head; dropped at the end."""
    name = f"emailsched_test_{RUN_ID}"
    url = f"{service_urls.database}/{name}"
    migrate(url)
    yield url
    server = create_db_engine(service_urls.database + "/")
    with server.begin() as conn:
        conn.execute(sa.text(f"DROP DATABASE IF EXISTS `{name}`"))
    server.dispose()


@pytest.fixture(scope="session")
def engine(database_url: str) -> Iterator[Engine]:
    engine = create_db_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def writer_engine(database_url: str) -> Iterator[Engine]:
    """The run's database as the worker and the API's group commit connect to it: a
    query may hold several statements (``KeptConnection.commit``)."""
    engine = create_db_engine(database_url, multi_statements=True)
    yield engine
    engine.dispose()


@pytest.fixture
def records(writer_engine: Engine) -> Iterator[KeptConnection]:
    """The connection a worker records outcomes on (``delivery.record``)."""
    kept = KeptConnection(writer_engine)
    yield kept
    kept.release()


@pytest.fixture
def db(engine: Engine) -> Engine:
    """The run's database, emptied before the test."""
    with engine.begin() as conn:
        for table in reversed(metadata.sorted_tables):
            conn.execute(table.delete())
    return engine


@pytest.fixture
def queue_name(service_urls: services.ServiceUrls) -> Iterator[str]:
    """A queue (and dead-letter queue) of this test's own, also naming its Redis keys
    (``emailsched:<queue>:*``, whichever process wrote them); all deleted afterwards."""
    name = f"emails_test_{RUN_ID}_{secrets.token_hex(3)}"
    yield name
    connection = pika.BlockingConnection(connection_parameters(service_urls.rabbitmq))
    try:
        channel = connection.channel()
        for queue in (name, dead_letter_queue(name)):
            channel.queue_delete(queue)
    finally:
        connection.close()
    client = redis.Redis.from_url(service_urls.redis)
    try:
        keys = list(client.scan_iter(f"emailsched:{name}:*", count=1000))
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start : start + 1000])
    finally:
        client.close()


@pytest.fixture
def redis_client(service_urls: services.ServiceUrls, queue_name: str) -> Iterator[redis.Redis]:
    """A client of the run's Redis (``queue_name`` deletes this test's keys after it)."""
    client = redis.Redis.from_url(service_urls.redis)
    yield client
    client.close()


@pytest.fixture
def smtp_sink() -> Iterator[SmtpSink]:
    """A sink that offers PIPELINING, as most servers do; test_smtp_sender.py runs the
    sender against servers with and without it."""
    with SmtpSink(pipelining=True) as sink:
        yield sink


API_KEY = "test-key-" + "a" * 24
OTHER_API_KEY = "test-key-" + "b" * 24


@pytest.fixture
def settings(
    service_urls: services.ServiceUrls,
    database_url: str,
    queue_name: str,
    smtp_sink: SmtpSink,
) -> Settings:
    """Settings pointing every process at this test's database, queue and SMTP sink."""
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        database_url=database_url,
        rabbitmq_url=service_urls.rabbitmq,
        redis_url=service_urls.redis,
        email_queue=queue_name,
        smtp_host=smtp_sink.host,
        smtp_port=smtp_sink.port,
        mail_from="scheduler@example.com",
        api_keys=f"{API_KEY},{OTHER_API_KEY}",
        retry_backoff_seconds=0.2,
        retry_backoff_max_seconds=2,
        relay_poll_interval=0.2,
        lease_seconds=5,
        smtp_timeout=5,
    )


@pytest.fixture
def stack(settings: Settings, db: Engine, tmp_path: Path) -> Iterator[Stack]:
    """An empty database and the real processes, started by the test as it needs them."""
    with running_stack(settings, tmp_path) as running:
        yield running
        codes = running.stop_all()
        assert all(code == 0 for code in codes.values()), (codes, running.logs()[-5000:])
