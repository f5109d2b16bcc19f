"""Test-only crash hooks: run a service with a ``SIGKILL`` planted at one exact point.

    python -m tests.support.crashing relay  after-confirm  [N]
    python -m tests.support.crashing worker after-250      [N]

``after-confirm``: the relay dies on its N-th (default 1st) attempt to record publisher
confirms, i.e. after the broker confirmed the rows and before the database commit.
``after-250``: the worker dies on its N-th record of a successful delivery sent (its
first try, ``delivery.send_record``), i.e. after the SMTP server's final 250 and before
the database commit.

The services carry no hook of their own: this module wraps their core calls from the
outside, lives under ``tests/`` (it is not installed with the package, nor copied into
the image), and refuses to run unless ``EMAILSCHED_TESTING=1``.
"""

from __future__ import annotations

import functools
import os
import runpy
import signal
import sys
from collections.abc import Callable
from typing import Any

from services.core import delivery, outbox


def _die_on_call(module: Any, name: str, nth: int, when: Callable[..., bool]) -> None:
    original = getattr(module, name)
    calls = 0

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        if when(*args, **kwargs):
            calls += 1
            if calls == nth:
                sys.stderr.write(f"crash hook: SIGKILL at {name} call {calls}\n")
                sys.stderr.flush()
                os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    setattr(module, name, wrapper)


HOOKS: dict[str, Callable[[int], None]] = {
    "after-confirm": lambda nth: _die_on_call(
        outbox, "mark_published", nth, lambda conn, ids, now: bool(list(ids))
    ),
    "after-250": lambda nth: _die_on_call(
        delivery, "send_record", nth, lambda kept, row, result, **_: result.outcome == "sent"
    ),
}


def main() -> None:
    if os.environ.get("EMAILSCHED_TESTING") != "1":
        raise SystemExit("crash hooks are for the test suite only (EMAILSCHED_TESTING=1)")
    service, hook, *rest = sys.argv[1:]
    HOOKS[hook](int(rest[0]) if rest else 1)
    sys.argv = [f"services.{service}"]
    runpy.run_module(f"services.{service}", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
