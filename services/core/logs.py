"""One logging set-up for every process: one line per event, to stderr.

A worker logs a line per email and the API one per create, so a line's cost counts: the
set-up drops what the format never shows - the caller's file and line, the thread, the
process (the Python logging HOWTO's "Optimization") - and the timestamp's text is made
once a second, not once a line: a line's CPU 17 -> 9 us (a slow phase of this machine).
"""

from __future__ import annotations

import logging
import sys
import time

FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


class _Formatter(logging.Formatter):
    """``FORMAT`` with the default ``asctime`` (``2026-11-30 00:34:04,123``, local time),
    whose text up to the second is kept for the rest of that second."""

    _second: tuple[int, str] = (-1, "")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        cached = self._second  # one tuple: threads may log at once
        if cached[0] != second:
            cached = (second, time.strftime("%Y-%m-%d %H:%M:%S", self.converter(second)))
            self._second = cached
        return f"{cached[1]},{int(record.msecs):03d}"


def configure_logging(level: str = "INFO") -> None:
    logging._srcfile = None  # no caller lookup: the format shows no file or line
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    for noisy in ("pika", "apscheduler.executors", "apscheduler.scheduler"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
