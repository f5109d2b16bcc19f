"""Email ids: UUIDv7, so that ids sort by creation time (a good InnoDB primary key, and
the order of the list endpoint). Monotonic within a process, even inside a millisecond.
"""

from __future__ import annotations

import os
import threading
import time

_lock = threading.Lock()
_last = (0, 0)  # (unix ms, 12-bit sequence) of the last id handed out


def new_id() -> str:
    global _last  # noqa: PLW0603 - one small piece of process state, guarded by _lock
    with _lock:
        ms = time.time_ns() // 1_000_000
        last_ms, last_seq = _last
        if ms > last_ms:
            seq = int.from_bytes(os.urandom(2), "big") & 0x3FF  # leave room to count up
        else:
            ms, seq = last_ms, last_seq + 1
            if seq > 0xFFF:
                ms, seq = ms + 1, 0
        _last = (ms, seq)
    tail = int.from_bytes(os.urandom(8), "big") & ((1 << 62) - 1)
    value = (ms << 80) | (0x7 << 76) | (seq << 64) | (0b10 << 62) | tail
    h = f"{value:032x}"  # as str(uuid.UUID(int=value)), in a third of the time
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
