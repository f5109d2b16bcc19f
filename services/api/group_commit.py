"""Creates that arrive together are committed together: one transaction, one commit.

An API process writes one group at a time, on a thread of its own. A create that
arrives while a group is being written waits for the next group, which takes every
create waiting by then (up to ``max_emails`` emails; always at least one create). A lone
request is a group of one and waits for nothing; under load the round trips, the pooled
connection's check-out and the commit of one transaction are shared by all its
requests, and the requests that wait cost no thread.

Each request is told what it would be told alone. Its 201 comes only once the group's
transaction - so its own rows - is committed. When MySQL cannot be reached every request
of the group gets that error (a 503: nothing committed, or, a commit cut off, the same
doubt a lone request has). Any other error might belong to one request's rows, so the
group is written again one request at a time, and only a request whose own rows fail
gets an error. A request whose client has gone is still written if its group was
already taken (a lone request's transaction does not stop either), and left out if not.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

from services.core import emails
from services.core.db import KeptConnection, is_unavailable, transaction
from services.core.emails import Creation

log = logging.getLogger(__name__)

Rows = list[dict[str, Any]]

# A group this small (``emails.text_size``) goes with its COMMIT as one query, one round
# trip instead of three: creates/s here from one client 1,170 -> 1,300, from eight
# 2,620 -> 3,270, from 32 4,770 -> 5,390 (bench api section, three alternating runs).
# The query is one packet: a character takes up to 4 bytes in UTF-8 and escaping can
# double it, so 8 MB at most, half of MariaDB's default max_allowed_packet. A larger
# group goes statement by statement (PyMySQL splits a many-row INSERT at 1 MB), as a
# lone create of a 10 MB body must.
ONE_QUERY_MAX_CHARS = 1_000_000


@dataclass(frozen=True, slots=True)
class _Waiting:
    creation: Creation
    answer: asyncio.Future[Rows]


class GroupCommit:
    """``await create(creation)``: its emails as written, once committed with others'.

    ``engine`` must let one query hold several statements (``multi_statements``): a
    group of up to ``ONE_QUERY_MAX_CHARS`` goes to MySQL with its COMMIT in one query,
    on a connection the writing thread keeps; a larger one statement by statement.
    ``written`` runs on the writing thread after each commit with the creations the
    transaction held (the API wakes the relay from there). Used from one event loop.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        max_emails: int,
        written: Callable[[Sequence[Creation]], None] = lambda creations: None,
    ) -> None:
        self.engine = engine
        self._max_emails = max_emails
        self._written = written
        self._waiting: deque[_Waiting] = deque()
        self._writing = False
        self._closed = False
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="group-commit")
        self._kept = KeptConnection(engine)  # the writing thread's, between groups too
        self.groups = 0  # transactions begun, for the curious and the tests

    async def create(self, creation: Creation) -> Rows:
        answer: asyncio.Future[Rows] = asyncio.get_running_loop().create_future()
        self._waiting.append(_Waiting(creation, answer))
        if not self._writing:
            self._write_next()
        return await answer

    def close(self) -> None:
        """Wait for the group being written; afterwards nothing more is written. (The
        engine stays its owner's to dispose of.)"""
        self._closed = True
        self._thread.shutdown(wait=True, cancel_futures=True)
        self._kept.release()

    def _write_next(self) -> None:
        """Start writing the creates waiting now, if any (on the event loop)."""
        group = self._take()
        self._writing = bool(group)
        if not group:
            return
        if self._closed:  # requests still arriving after the server stopped taking them
            for waiting in group:
                waiting.answer.set_exception(RuntimeError("the API is stopping"))
            self._write_next()
            return
        self.groups += 1
        loop = asyncio.get_running_loop()
        job = loop.run_in_executor(self._thread, self._write, [w.creation for w in group])
        job.add_done_callback(lambda done: self._answer(group, done))

    def _take(self) -> list[_Waiting]:
        group: list[_Waiting] = []
        emails_in_group = 0
        while self._waiting:
            waiting = self._waiting[0]
            if waiting.answer.done():  # its request was cancelled: nobody to answer
                self._waiting.popleft()
                continue
            size = len(waiting.creation.items)
            if group and emails_in_group + size > self._max_emails:
                break
            group.append(self._waiting.popleft())
            emails_in_group += size
        return group

    def _answer(self, group: list[_Waiting], done: asyncio.Future[list[Rows | Exception]]) -> None:
        if done.cancelled():  # the process is stopping: close() cancelled it
            outcomes: list[Rows | BaseException] = [asyncio.CancelledError()] * len(group)
        elif (error := done.exception()) is not None:
            outcomes = [error] * len(group)
        else:
            outcomes = list(done.result())
        for waiting, outcome in zip(group, outcomes, strict=True):
            if waiting.answer.done():
                continue
            if isinstance(outcome, BaseException):
                waiting.answer.set_exception(outcome)
            else:
                waiting.answer.set_result(outcome)
        self._write_next()

    def _write(self, group: list[Creation]) -> list[Rows | Exception]:
        """On the writing thread: each creation's rows once committed, or its error."""
        try:
            if emails.text_size(group) <= ONE_QUERY_MAX_CHARS:
                statements, written = emails.create_statements(group)
                self._kept.commit(statements)
            else:
                written = transaction(self.engine, lambda conn: emails.create_many(conn, group))
        except DBAPIError as exc:
            if len(group) == 1 or is_unavailable(exc):
                return [exc] * len(group)
            log.warning(
                "a group of %d creates failed (%s); writing each alone", len(group), exc.orig
            )
            return [self._write([creation])[0] for creation in group]
        self._after(group)
        return list(written)

    def _after(self, creations: Sequence[Creation]) -> None:
        try:
            self._written(creations)
        except Exception:  # a hook that fails must not turn a commit into an error
            log.exception("after a group commit")
