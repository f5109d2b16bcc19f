"""Where the tests' MySQL, RabbitMQ and Redis come from - decided here and only here.

1. ``TEST_DATABASE_URL`` (a server URL without database), ``TEST_RABBITMQ_URL``,
   ``TEST_REDIS_URL`` from the environment (`.ci/run` and `make test` set them);
2. else, when a Docker engine answers, testcontainers (mysql:8, rabbitmq:3, redis:7);
3. else the machine's own services on loopback, if they answer.

Under ``CI=true`` a service that cannot be reached fails the run; elsewhere the tests
that need it are skipped with the reason.
"""

from __future__ import annotations

import contextlib
import os
import socket
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import pytest

LOOPBACK = {
    "database": "mysql+pymysql://root@127.0.0.1:3306",
    "rabbitmq": "amqp://guest:guest@127.0.0.1:5672/%2F",
    "redis": "redis://127.0.0.1:6379/0",
}


@dataclass(frozen=True)
class ServiceUrls:
    database: str  # server URL; each run creates its own database on it
    rabbitmq: str
    redis: str


def _answers(url: str) -> bool:
    parts = urlsplit(url.replace("mysql+pymysql", "mysql"))
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 0), 2):
            return True
    except OSError:
        return False


def _docker_available() -> bool:
    """A Docker engine answers ``/_ping`` on its socket (or ``DOCKER_HOST`` is set)."""
    if os.environ.get("DOCKER_HOST"):
        return True
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(2)
            sock.connect("/var/run/docker.sock")
            sock.sendall(b"GET /_ping HTTP/1.0\r\n\r\n")
            reply = sock.recv(64)
    except OSError:
        return False
    return reply.startswith(b"HTTP/1.") and b" 200 " in reply


@contextlib.contextmanager
def _containers() -> Iterator[ServiceUrls]:
    with warnings.catch_warnings():  # their own deprecations, not ours to fix
        warnings.simplefilter("ignore", DeprecationWarning)
        from testcontainers.community.mysql import MySqlContainer  # noqa: PLC0415
        from testcontainers.community.rabbitmq import RabbitMqContainer  # noqa: PLC0415
        from testcontainers.community.redis import RedisContainer  # noqa: PLC0415

    with (
        MySqlContainer("mysql:8.4", username="root", password="test") as mysql,
        RabbitMqContainer("rabbitmq:3.13") as rabbit,
        RedisContainer("redis:7") as redis,
    ):
        host = mysql.get_container_host_ip()
        yield ServiceUrls(
            database=f"mysql+pymysql://root:test@{host}:{mysql.get_exposed_port(3306)}",
            rabbitmq=(
                f"amqp://guest:guest@{rabbit.get_container_host_ip()}:"
                f"{rabbit.get_exposed_port(5672)}/%2F"
            ),
            redis=f"redis://{redis.get_container_host_ip()}:{redis.get_exposed_port(6379)}/0",
        )


@contextlib.contextmanager
def resolve() -> Iterator[ServiceUrls]:
    given = {name: os.environ.get(f"TEST_{name.upper()}_URL") for name in LOOPBACK}
    if any(given.values()):
        urls = {name: given[name] or LOOPBACK[name] for name in LOOPBACK}
    elif _docker_available():
        with _containers() as found:
            yield found
        return
    else:
        urls = dict(LOOPBACK)
    missing = [f"{name} at {url}" for name, url in urls.items() if not _answers(url)]
    if missing:
        message = "services not reachable: " + ", ".join(missing)
        if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    yield ServiceUrls(**urls)
