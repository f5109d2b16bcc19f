"""Fault scenarios: the real processes, a fault injected, the ledger settled.

Every test here is ``slow``; ``FAULT_SCALE`` multiplies the email counts (`make faults`).
No test stops a shared service: broker faults run on a private RabbitMQ node
(``tests/support/rabbit_node.py``), database and SMTP faults behind a proxy the test owns.
"""

from __future__ import annotations

import pytest

from tests.faults.ledger import FIGURES


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
