"""``GroupCommit`` against the real MySQL: creates in flight together share a transaction,
each is answered as if alone, and nothing waits on a request that has gone."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, OperationalError

from services.api.group_commit import ONE_QUERY_MAX_CHARS, GroupCommit
from services.core.db import create_db_engine
from services.core.emails import Creation, NewEmail
from services.core.schema import emails, outbox
from tests.support.queries import QueryLog

OWNER = "0" * 32


def creation(
    size: int = 1, *, subject: str = "Hello", owner: str = OWNER, text: str = "hi"
) -> Creation:
    later = datetime.now(UTC) + timedelta(hours=1)
    items = [
        NewEmail(
            to=["to@example.com"],
            from_addr="from@example.com",
            subject=subject,
            send_at=later,
            text=text,
        )
        for _ in range(size)
    ]
    return Creation(owner, items, datetime.now(UTC))


def stored_ids(db: Engine) -> set[str]:
    with db.connect() as conn:
        ids = set(conn.execute(sa.select(emails.c.id)).scalars())
        in_outbox = set(conn.execute(sa.select(outbox.c.email_id)).scalars())
    assert ids == in_outbox  # every email with its outbox row, and no row without one
    return ids


@pytest.fixture
def group_commit(db: Engine, writer_engine: Engine) -> Iterator[GroupCommit]:
    writer = GroupCommit(writer_engine, max_emails=1000)
    yield writer
    writer.close()


async def create_all(writer: GroupCommit, creations: Sequence[Creation]) -> list[object]:
    return await asyncio.gather(*(writer.create(c) for c in creations), return_exceptions=True)


def test_creates_in_flight_together_share_a_transaction(
    db: Engine, group_commit: GroupCommit
) -> None:
    creations = [creation() for _ in range(20)]
    answers = asyncio.run(create_all(group_commit, creations))
    # The first create finds nothing being written and goes alone; the 19 that arrive
    # while it is written go together in the next transaction.
    assert group_commit.groups <= 3
    assert all(isinstance(rows, list) and len(rows) == 1 for rows in answers)
    ids = [rows[0]["id"] for rows in answers]  # type: ignore[index]
    assert len(set(ids)) == 20
    assert stored_ids(db) == set(ids)


def test_a_group_holds_at_most_max_emails(db: Engine, writer_engine: Engine) -> None:
    writer = GroupCommit(writer_engine, max_emails=5)
    try:
        answers = asyncio.run(create_all(writer, [creation(3) for _ in range(6)]))
    finally:
        writer.close()
    assert writer.groups == 6  # 3 + 3 > 5: each create of three goes alone
    assert sum(len(rows) for rows in answers if isinstance(rows, list)) == 18
    assert len(stored_ids(db)) == 18


def test_a_request_whose_rows_fail_fails_alone(db: Engine, group_commit: GroupCommit) -> None:
    """A subject too long for its column (validation would refuse it; here it reaches
    MySQL) fails its own request; the others of its group are committed."""
    good = [creation() for _ in range(5)]
    bad = creation(subject="x" * 2000)
    answers = asyncio.run(create_all(group_commit, [good[0], *good[1:3], bad, *good[3:]]))
    assert isinstance(answers[3], DBAPIError)
    ok = [rows for rows in answers if isinstance(rows, list)]
    assert len(ok) == 5
    assert stored_ids(db) == {rows[0]["id"] for rows in ok}


def test_an_unreachable_database_fails_every_request(database_url: str) -> None:
    dead = create_db_engine(
        database_url.replace("127.0.0.1:3306", "127.0.0.1:1"), multi_statements=True
    )
    writer = GroupCommit(dead, max_emails=1000)
    try:
        answers = asyncio.run(create_all(writer, [creation() for _ in range(5)]))
    finally:
        writer.close()
        dead.dispose()
    assert all(isinstance(answer, OperationalError) for answer in answers)


def test_a_cancelled_request_is_left_out_and_nothing_waits_on_it(
    db: Engine, group_commit: GroupCommit
) -> None:
    async def scenario() -> tuple[list[dict[str, object]], list[dict[str, object]]]:
        first = asyncio.ensure_future(group_commit.create(creation()))
        await asyncio.sleep(0)  # first is being written now
        gone = asyncio.ensure_future(group_commit.create(creation()))
        third = asyncio.ensure_future(group_commit.create(creation()))
        await asyncio.sleep(0)  # both wait for the next group
        gone.cancel()
        rows = await asyncio.wait_for(asyncio.gather(first, third), timeout=10)
        assert gone.cancelled()
        return rows[0], rows[1]

    first, third = asyncio.run(scenario())
    assert stored_ids(db) == {first[0]["id"], third[0]["id"]}


def test_the_hook_sees_each_commit_and_cannot_fail_it(db: Engine, writer_engine: Engine) -> None:
    seen: list[int] = []

    def written(creations: Sequence[Creation]) -> None:
        seen.append(len(creations))
        raise RuntimeError("a broken hook")

    writer = GroupCommit(writer_engine, max_emails=1000, written=written)
    try:
        answers = asyncio.run(create_all(writer, [creation() for _ in range(4)]))
    finally:
        writer.close()
    assert all(isinstance(rows, list) for rows in answers)
    assert sum(seen) == 4
    assert len(stored_ids(db)) == 4


def test_a_small_group_goes_with_its_commit_in_one_query_a_large_one_statement_by_statement(
    db: Engine, writer_engine: Engine
) -> None:
    """Both ways commit every email of the group with its outbox row, or none."""
    writer = GroupCommit(writer_engine, max_emails=1000)
    big = "x" * (ONE_QUERY_MAX_CHARS // 2)
    try:
        with QueryLog(writer_engine) as log:
            small = asyncio.run(create_all(writer, [creation(3)]))
            sent_small = list(log.queries)
            log.queries.clear()
            large = asyncio.run(create_all(writer, [creation(3, subject="s", text=big)]))
    finally:
        writer.close()
    assert [sql.split(" ", 3)[:3] for _, sql in sent_small] == [["INSERT", "INTO", "emails"]]
    assert sent_small[0][1].endswith(";COMMIT")
    kinds = [" ".join(sql.split(" ", 3)[:3]) for _, sql in log.queries]
    # (PyMySQL splits the emails' INSERT where it would pass 1 MB)
    assert kinds[-2:] == ["INSERT INTO outbox", "COMMIT"]
    assert set(kinds[:-2]) == {"INSERT INTO emails"}
    ids = {row["id"] for rows in (*small, *large) if isinstance(rows, list) for row in rows}
    assert len(ids) == 6
    assert stored_ids(db) == ids
