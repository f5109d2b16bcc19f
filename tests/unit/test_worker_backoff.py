"""The retry schedule: doubling from the base, capped, equal jitter in [d/2, d]."""

from __future__ import annotations

import pytest

from services.worker.backoff import retry_delay


@pytest.mark.parametrize(
    ("attempt", "full"), [(1, 30.0), (2, 60.0), (3, 120.0), (4, 240.0), (8, 3600.0), (500, 3600.0)]
)
def test_doubles_then_caps(attempt: int, full: float) -> None:
    assert retry_delay(attempt, 30, 3600, rand=lambda: 1.0) == full
    assert retry_delay(attempt, 30, 3600, rand=lambda: 0.0) == full / 2


def test_jitter_stays_within_half_and_full_delay() -> None:
    delays = [retry_delay(3, 30, 3600) for _ in range(500)]
    assert all(60.0 <= d <= 120.0 for d in delays)
    assert len(set(delays)) > 400  # spread out, not one value


def test_zero_base_means_immediate_retry() -> None:
    assert retry_delay(5, 0, 3600) == 0.0


def test_attempt_numbers_start_at_one() -> None:
    with pytest.raises(ValueError, match="start at 1"):
        retry_delay(0, 30, 3600)
