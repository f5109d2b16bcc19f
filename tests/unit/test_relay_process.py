"""The relay process's exit code: 0 after a signal, 1 when its publisher thread died."""

from __future__ import annotations

import signal

import pytest

from services.relay.__main__ import wait_for_stop
from services.relay.publisher import Publisher

CLOSED_PORT_URL = "amqp://guest:guest@127.0.0.1:1/%2F"


def test_a_signal_stops_the_relay_with_exit_0() -> None:
    publisher = Publisher(CLOSED_PORT_URL, "q")
    publisher.start()
    try:
        assert wait_for_stop([signal.SIGTERM], publisher) == 0
    finally:
        publisher.stop(timeout=2)


@pytest.mark.timeout(10)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_publisher_thread_killed_by_a_bug_stops_the_relay_with_exit_1(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An exception out of one of its callbacks ends the I/O-loop thread (only pika's reset
    during set-up is retried there); the relay must not go on claiming rows it cannot
    publish, but exit so that it is restarted."""
    publisher = Publisher(CLOSED_PORT_URL, "q")

    def bug() -> None:
        raise ValueError("a bug in a callback")

    # Queued before the loop starts, it runs before the first connection attempt opens a
    # socket (one left open by the dead loop would warn in whichever test runs next).
    publisher._ioloop.add_callback_threadsafe(bug)
    publisher.start()
    assert wait_for_stop([], publisher) == 1
    assert not publisher.alive
    assert "publisher thread ended unexpectedly" in caplog.text
