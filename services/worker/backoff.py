"""How long to wait before the next delivery attempt: capped exponential, equal jitter.

``delay = min(cap, base * 2**(attempt - 1))``, then a uniformly random point in
``[delay / 2, delay]`` ("equal jitter"). Half the delay is a guaranteed floor, so a retry
never comes much sooner than the documented schedule, and the random half spreads a
burst of failures (one SMTP outage failing thousands of emails at once) so they do not
all come back in the same second.
"""

from __future__ import annotations

import random
from collections.abc import Callable

_MAX_EXPONENT = 62  # 2**62 seconds is past any cap; keeps the arithmetic finite


def retry_delay(
    attempt: int,
    base_seconds: float,
    cap_seconds: float,
    *,
    rand: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1 = the first attempt)."""
    if attempt < 1:
        raise ValueError("attempt numbers start at 1")
    delay = min(cap_seconds, base_seconds * 2.0 ** min(attempt - 1, _MAX_EXPONENT))
    return delay / 2 + rand() * delay / 2
