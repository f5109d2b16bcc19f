"""The relay's back-off after a failed publish: doubling from 0.5 s, capped at 30 s."""

from __future__ import annotations

from services.relay.relay import RETRY_MAX_SECONDS, new_relay_id, retry_delay


def test_retry_delay_doubles_then_caps() -> None:
    assert [retry_delay(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 4.0, 8.0]
    assert retry_delay(0) == 0.5  # never claimed by us (attempts unknown): the first step
    assert retry_delay(7) == RETRY_MAX_SECONDS
    assert retry_delay(10_000) == RETRY_MAX_SECONDS


def test_relay_ids_fit_the_claimed_by_column_and_differ() -> None:
    ids = {new_relay_id() for _ in range(100)}
    assert len(ids) == 100
    assert max(len(i) for i in ids) <= 64
