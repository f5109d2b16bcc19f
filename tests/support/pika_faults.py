"""Widen one of pika's races so that a test meets it every time.

pika checks a new socket twice: its connector reads SO_ERROR when the TCP connect
completes, then its transport set-up calls ``getpeername()``. A peer that resets the
connection between the two (a broker that is stopping, a proxy with nothing behind it)
makes pika 1.x raise ``ValueError`` instead of a connection error - about one attempt in
two hundred against a peer that accepts and resets at once. ``slow_transport_setup``
delays the set-up; with ``FaultProxy.cut(reset_after=...)`` shorter than that delay, the
real reset from a real peer lands inside the window on every attempt.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from pika.adapters.utils import io_services_utils


def slow_transport_setup(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    original = io_services_utils._AsyncStreamConnector.__init__

    def delayed(self: Any, *args: Any, **kwargs: Any) -> None:
        time.sleep(seconds)
        original(self, *args, **kwargs)

    monkeypatch.setattr(io_services_utils._AsyncStreamConnector, "__init__", delayed)
