"""Fault scenarios: the real processes, a fault injected, the ledger settled.

Every test here is ``slow``; ``FAULT_SCALE`` multiplies the email counts (`make faults`).
Shared services that a test stops are started again in a ``finally``.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator

import pika
import pytest

from services.core.broker import connection_parameters
from tests.faults.ledger import FIGURES
from tests.services import ServiceUrls


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/faults/" in str(item.path):
            item.add_marker(pytest.mark.slow)
            item.add_marker(pytest.mark.faults)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not FIGURES:
        return
    terminalreporter.section("delivery ledger")
    terminalreporter.write_line(
        "| scenario | emails | lost | dup | unexpected | early | terminal | lateness p50"
        " | p99 | max |"
    )
    terminalreporter.write_line(
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    )
    for figures in FIGURES:
        terminalreporter.write_line(figures.row())


class Broker:
    """The shared RabbitMQ node, stopped and started by a test (always restored)."""

    def __init__(self, url: str) -> None:
        self.url = url

    def stop_app(self) -> None:
        subprocess.run(["rabbitmqctl", "stop_app"], check=True, capture_output=True, timeout=60)

    def start_app(self) -> None:
        subprocess.run(["rabbitmqctl", "start_app"], check=True, capture_output=True, timeout=120)
        self.wait_ready()

    def ensure_running(self) -> None:
        """start_app if the node lives (stopped app or not), else boot the node again."""
        started = subprocess.run(
            ["rabbitmqctl", "start_app"], check=False, capture_output=True, timeout=120
        )
        if started.returncode != 0:
            subprocess.run(["rabbitmq-server", "-detached"], check=False, timeout=60)
        self.wait_ready(timeout=180)

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                pika.BlockingConnection(connection_parameters(self.url)).close()
                return
            except pika.exceptions.AMQPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)


@pytest.fixture
def broker(service_urls: ServiceUrls) -> Iterator[Broker]:
    broker = Broker(service_urls.rabbitmq)
    try:
        yield broker
    finally:  # whatever the test did, leave the shared broker running
        broker.ensure_running()
