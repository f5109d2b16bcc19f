"""The email lifecycle and the outbox, on the real database: the statements every
service relies on, tested below the services."""

from __future__ import annotations

import dataclasses
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import OperationalError

from services.core import emails, outbox
from services.core.db import KeptConnection, db_now, transaction, unit_of_work
from services.core.delivery import (
    DELIVERY_COLUMNS,
    LEAD,
    Claim,
    ClaimStatus,
    Delivery,
    Outcome,
    claim_batch,
    record,
    record_statements,
    recorded_before,
)
from services.core.emails import NewEmail
from services.core.messages import DeliveryMessage
from services.core.schema import attempts, db_time
from services.core.schema import emails as emails_table
from services.core.schema import outbox as outbox_table
from services.worker.__main__ import BATCH_MAX
from tests.support.locks import deadlocks, until_a_lock_wait

OWNER = "f" * 32
LEASE = timedelta(seconds=30)


def claim(
    conn: Connection,
    email_id: str,
    version: int,
    *,
    now: datetime,
    lease: timedelta,
    max_attempts: int,
) -> Claim:
    """A batch of one: the worker's claim for a single message."""
    (result,) = claim_batch(
        conn, [DeliveryMessage(email_id, version)], now=now, lease=lease, max_attempts=max_attempts
    )
    return result


def new_email(send_at: datetime | None = None) -> NewEmail:
    return NewEmail(
        to=["ann@example.com"],
        from_addr="me@example.com",
        subject="Hi",
        send_at=send_at,
        text="hello",
    )


def create(engine: Engine, count: int = 1, send_at: datetime | None = None) -> list[str]:
    with unit_of_work(engine) as conn:
        return emails.create(conn, OWNER, [new_email(send_at)] * count, datetime.now(UTC))


def email_row(engine: Engine, email_id: str) -> sa.Row:  # type: ignore[type-arg]
    with engine.connect() as conn:
        return conn.execute(sa.select(emails_table).where(emails_table.c.id == email_id)).one()


def unpublished(engine: Engine, email_id: str) -> list[sa.Row]:  # type: ignore[type-arg]
    with engine.connect() as conn:
        return list(
            conn.execute(
                sa.select(outbox_table).where(
                    outbox_table.c.email_id == email_id, outbox_table.c.published_at.is_(None)
                )
            )
        )


def count(engine: Engine, table: sa.Table) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())


def test_email_and_outbox_rows_are_written_both_or_neither(db: Engine) -> None:
    """Make the second insert (the outbox row) fail inside MySQL: no email row survives."""
    with db.begin() as conn:
        conn.execute(
            sa.text(
                "CREATE TRIGGER outbox_refuses BEFORE INSERT ON outbox FOR EACH ROW "
                "SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'outbox insert refused by test'"
            )
        )
    try:
        with pytest.raises(OperationalError, match="refused by test"):
            create(db, 3)
    finally:
        with db.begin() as conn:
            conn.execute(sa.text("DROP TRIGGER outbox_refuses"))
    assert count(db, emails_table) == 0
    assert count(db, outbox_table) == 0
    create(db, 3)
    assert count(db, emails_table) == 3
    assert count(db, outbox_table) == 3


def test_claim_leases_rows_and_a_dead_claimers_rows_come_back(db: Engine) -> None:
    now = datetime.now(UTC)
    due = create(db, 3)
    create(db, 2, send_at=now + timedelta(hours=1))
    with unit_of_work(db) as conn:
        claimed = outbox.claim_due(
            conn, horizon=db_now(conn), limit=10, lease_until=now + LEASE, claimed_by="a"
        )
    assert sorted(r.email_id for r in claimed) == sorted(due)
    with unit_of_work(db) as conn:  # leased: nobody else gets them now
        assert (
            outbox.claim_due(
                conn, horizon=db_now(conn), limit=10, lease_until=now + LEASE, claimed_by="b"
            )
            == []
        )
    with unit_of_work(db) as conn:  # ... but once the lease has run out, they are due again
        again = outbox.claim_due(
            conn,
            horizon=now + LEASE + timedelta(seconds=1),
            limit=10,
            lease_until=now + 2 * LEASE,
            claimed_by="b",
        )
    assert sorted(r.id for r in again) == sorted(r.id for r in claimed)


def test_claim_skips_rows_locked_by_another_claimer(db: Engine) -> None:
    create(db, 4)
    horizon = datetime.now(UTC) + timedelta(seconds=1)
    first_holds = threading.Event()
    release_first = threading.Event()
    seen: dict[str, list[int]] = {}

    def hold() -> None:
        with unit_of_work(db) as conn:
            seen["a"] = [
                r.id
                for r in outbox.claim_due(
                    conn, horizon=horizon, limit=2, lease_until=horizon + LEASE, claimed_by="a"
                )
            ]
            first_holds.set()
            release_first.wait(10)

    thread = threading.Thread(target=hold)
    thread.start()
    assert first_holds.wait(10)
    with unit_of_work(db) as conn:  # does not wait for "a": SKIP LOCKED
        seen["b"] = [
            r.id
            for r in outbox.claim_due(
                conn, horizon=horizon, limit=10, lease_until=horizon + LEASE, claimed_by="b"
            )
        ]
    release_first.set()
    thread.join()
    assert len(seen["a"]) == 2
    assert len(seen["b"]) == 2
    assert not set(seen["a"]) & set(seen["b"])


def test_mark_published_queues_only_the_current_version(db: Engine) -> None:
    kept, cancelled = create(db, 2)
    now = datetime.now(UTC)
    with unit_of_work(db) as conn:
        rows = outbox.claim_due(
            conn, horizon=now, limit=10, lease_until=now + LEASE, claimed_by="a"
        )
    with unit_of_work(db) as conn:
        emails.cancel(conn, OWNER, cancelled, now)
    with unit_of_work(db) as conn:
        outbox.mark_published(conn, [r.id for r in rows], now)
    assert email_row(db, kept).status == "queued"
    assert email_row(db, cancelled).status == "cancelled"
    assert unpublished(db, kept) == []


def test_release_makes_rows_due_again_later(db: Engine) -> None:
    (email_id,) = create(db)
    now = datetime.now(UTC)
    with unit_of_work(db) as conn:
        rows = outbox.claim_due(conn, horizon=now, limit=1, lease_until=now + LEASE, claimed_by="a")
        outbox.release(conn, [rows[0].id], available_at=now + timedelta(seconds=5), error="nack")
    (row,) = unpublished(db, email_id)
    assert row.last_error == "nack"
    assert row.due_at == now + timedelta(seconds=5)


def test_reschedule_and_cancel_make_old_messages_stale(db: Engine) -> None:
    (email_id,) = create(db)
    now = datetime.now(UTC)
    with unit_of_work(db) as conn:
        emails.reschedule(conn, OWNER, email_id, now + timedelta(minutes=5), now)
    (row,) = unpublished(db, email_id)
    assert (row.version, row.fire_at) == (2, now + timedelta(minutes=5))
    with unit_of_work(db) as conn:
        old = claim(conn, email_id, 1, now=now, lease=LEASE, max_attempts=5)
    assert old.status is ClaimStatus.STALE
    with unit_of_work(db) as conn:
        emails.cancel(conn, OWNER, email_id, now)
        emails.cancel(conn, OWNER, email_id, now)  # cancelling twice is fine
    assert unpublished(db, email_id) == []
    with unit_of_work(db) as conn:
        late = claim(conn, email_id, 2, now=now + timedelta(minutes=6), lease=LEASE, max_attempts=5)
    assert late.status is ClaimStatus.STALE


def test_an_early_message_is_brought_back_on_time(db: Engine) -> None:
    send_at = datetime.now(UTC) + timedelta(minutes=1)
    (email_id,) = create(db, send_at=send_at)
    with unit_of_work(db) as conn:
        result = claim(conn, email_id, 1, now=datetime.now(UTC), lease=LEASE, max_attempts=5)
    assert result.status is ClaimStatus.EARLY
    assert email_row(db, email_id).status == "pending"
    assert sorted(r.fire_at for r in unpublished(db, email_id)) == [send_at, send_at]


def test_an_email_due_within_the_lead_is_claimed_and_one_beyond_it_is_early(
    db: Engine,
) -> None:
    now = datetime.now(UTC)
    (within,) = create(db, send_at=now + LEAD)
    (beyond,) = create(db, send_at=now + LEAD + timedelta(milliseconds=1))
    with unit_of_work(db) as conn:
        claims = claim_batch(
            conn,
            [DeliveryMessage(within, 1), DeliveryMessage(beyond, 1)],
            now=now,
            lease=LEASE,
            max_attempts=5,
        )
    assert [c.status for c in claims] == [ClaimStatus.CLAIMED, ClaimStatus.EARLY]
    assert claims[0].row is not None
    assert claims[0].row.due_at == now + LEAD  # the worker holds its final "." till then
    assert email_row(db, beyond).status == "pending"
    assert [r.fire_at for r in unpublished(db, beyond)] == [
        now + LEAD + timedelta(milliseconds=1)
    ] * 2


def test_claim_is_decided_once_under_concurrency(db: Engine) -> None:
    ids = create(db, 20)
    results: list[ClaimStatus] = []
    lock = threading.Lock()

    def claim_all() -> None:
        for email_id in ids:
            result = transaction(
                db,
                lambda conn, e=email_id: claim(
                    conn, e, 1, now=db_now(conn), lease=LEASE, max_attempts=5
                ),
            )
            with lock:
                results.append(result.status)

    threads = [threading.Thread(target=claim_all) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results.count(ClaimStatus.CLAIMED) == 20
    assert results.count(ClaimStatus.STALE) == 60


def claim_each(engine: Engine, email_ids: list[str], now: datetime) -> dict[str, Delivery]:
    """Each email claimed (at version 1) in a transaction of its own: the rows as claimed."""
    claimed = {}
    for email_id in email_ids:
        with unit_of_work(engine) as conn:
            result = claim(conn, email_id, 1, now=now, lease=LEASE, max_attempts=5)
        assert result.status is ClaimStatus.CLAIMED
        assert result.row is not None
        claimed[email_id] = result.row
    return claimed


def test_a_record_drops_the_recovery_rows_it_is_given_and_a_leftover_one_is_harmless(
    db: Engine, records: KeptConnection
) -> None:
    first_id, second_id = create(db, 2)
    now = datetime.now(UTC)
    claimed = claim_each(db, [first_id, second_id], now)
    first, second = claimed[first_id], claimed[second_id]
    # a batch's first record leaves its recovery row...
    assert record(records, first, Outcome("sent", now, now, smtp_code=250), discard=())
    assert [r.version for r in unpublished(db, first_id) if r.version == 2] == [2]
    retry_at = now + timedelta(seconds=30)
    # ... and the last drops both, but not a retry's row
    outcome = Outcome("transient_error", now, now, smtp_code=451, retry_at=retry_at)
    assert record(records, second, outcome, discard=[(first_id, 2), (second_id, 2)])
    assert [r.version for r in unpublished(db, first_id) if r.version > 1] == []
    assert [(r.version, r.fire_at) for r in unpublished(db, second_id) if r.version > 1] == [
        (3, retry_at)
    ]

    # Had the worker died between the two, the leftover row's message would come after
    # the lease: the email is sent, so it is dropped - no second send.
    (third_id,) = create(db)
    third = claim_each(db, [third_id], now)[third_id]
    assert record(records, third, Outcome("sent", now, now, smtp_code=250), discard=())
    (leftover,) = [r for r in unpublished(db, third_id) if r.version == 2]
    assert leftover.fire_at == now + LEASE + LEAD
    with unit_of_work(db) as conn:
        late = claim(conn, third_id, 2, now=leftover.fire_at, lease=LEASE, max_attempts=5)
    assert late.status is ClaimStatus.STALE
    assert email_row(db, third_id).status == "sent"


@pytest.mark.parametrize("size", [1, 10, BATCH_MAX])
def test_a_claim_and_its_records_find_their_rows_by_index(
    db: Engine, records: KeptConnection, size: int
) -> None:
    """Every statement of a batch's claim and records reads its rows through an index,
    for a batch of one too: MariaDB does not range-scan a lone row constructor, so a
    single ``(id, version) IN`` pair alone would scan - and lock its way through - the
    whole table. (In a table only a few times the batch's size a scan is the cheaper
    plan, and the optimizer rightly takes it: here every claimed row has 20 beside it.)"""
    create(db, max(200, 20 * size))  # rows that a scan would walk
    now = datetime.now(UTC)
    ids = create(db, size)
    plans: list[tuple[str, str | None]] = []

    def explain(cursor: Any, statement: str, parameters: Any) -> None:
        if statement.lstrip().upper().startswith(("UPDATE", "DELETE", "SELECT")):
            cursor.execute("EXPLAIN " + statement, parameters)
            plans.extend((statement.split(maxsplit=1)[0], row[3]) for row in cursor.fetchall())

    with db.connect() as conn:

        @sa.event.listens_for(conn, "before_cursor_execute", retval=True)
        def explain_claim(_c, cursor, statement, parameters, _ctx, many):  # type: ignore[no-untyped-def]
            if not many:
                explain(cursor, statement, parameters)
            return statement, parameters

        with conn.begin():
            claims = claim_batch(
                conn,
                [DeliveryMessage(email_id, 1) for email_id in ids],
                now=now,
                lease=LEASE,
                max_attempts=5,
            )
    rows = [c.row for c in claims if c.row is not None]
    assert len(rows) == size
    sent = Outcome("sent", now, now, smtp_code=250)
    raw = db.raw_connection()
    try:
        for row in rows:
            discard = [(r.id, r.version) for r in rows] if row is rows[-1] else ()
            statements, params = record_statements(row, sent, discard=discard)
            cursor = raw.cursor()
            for statement in statements:
                explain(cursor, statement, params)
            cursor.close()
            assert record(records, row, sent, discard=discard)
    finally:
        raw.close()
    # "ALL": a table scan, "index": a scan of a whole index.
    scans = [(statement, access) for statement, access in plans if access in ("ALL", "index")]
    kinds = [statement for statement, _ in plans]  # the claim's UPDATE, each record's, ...
    assert (kinds.count("UPDATE"), kinds.count("DELETE")) == (1 + size, 1), plans
    assert not scans, plans


def test_sent_retry_and_failed_are_recorded_with_their_outbox_rows(
    db: Engine, records: KeptConnection
) -> None:
    sent_id, retry_id, failed_id = create(db, 3)
    now = datetime.now(UTC)
    claimed = claim_each(db, [sent_id, retry_id, failed_id], now)
    for email_id in claimed:
        # the relay has not flagged version 1 published here; the recovery row is version 2
        recovery = [r for r in unpublished(db, email_id) if r.version == 2]
        # due a lead after the lease ends: its message, a lead early, finds the lease over
        assert [r.fire_at for r in recovery] == [now + LEASE + LEAD]
    retry_at = now + timedelta(seconds=30)
    outcomes = {
        sent_id: Outcome("sent", now, now, smtp_code=250),
        retry_id: Outcome(
            "transient_error", now, now, smtp_code=451, error="later", retry_at=retry_at
        ),
        failed_id: Outcome("permanent_error", now, now, smtp_code=550, error="no such user"),
    }
    for email_id, outcome in outcomes.items():
        assert record(records, claimed[email_id], outcome)
    sent, retry, failed = (email_row(db, i) for i in (sent_id, retry_id, failed_id))

    def versions(email_id: str) -> list[tuple[int, datetime]]:
        return [(r.version, r.fire_at) for r in unpublished(db, email_id) if r.version > 1]

    assert (sent.status, sent.sent_at, versions(sent_id)) == ("sent", now, [])
    assert (retry.status, retry.version, retry.last_error) == ("pending", 3, "451 later")
    assert versions(retry_id) == [(3, retry_at)]
    assert (failed.status, failed.last_error) == ("failed", "550 no such user")
    assert versions(failed_id) == []
    with db.connect() as conn:
        outcomes_seen = conn.execute(
            sa.select(attempts.c.email_id, attempts.c.number, attempts.c.outcome)
        ).all()
    assert sorted(outcomes_seen) == sorted(
        [
            (sent_id, 1, "sent"),
            (retry_id, 1, "transient_error"),
            (failed_id, 1, "permanent_error"),
        ]
    )


def test_an_email_left_sending_by_a_dead_worker_is_taken_up_after_the_lease(
    db: Engine, records: KeptConnection
) -> None:
    (email_id,) = create(db)
    now = datetime.now(UTC)
    with unit_of_work(db) as conn:
        first = claim(conn, email_id, 1, now=now, lease=LEASE, max_attempts=5)
    assert first.row is not None  # ... and this worker dies here
    for before_the_end in (LEASE / 2, LEASE - timedelta(microseconds=1)):
        with unit_of_work(db) as conn:  # the recovery row's message, before the lease ends
            early = claim(conn, email_id, 2, now=now + before_the_end, lease=LEASE, max_attempts=5)
        assert early.status is ClaimStatus.STALE
    later = now + LEASE + timedelta(seconds=1)
    with unit_of_work(db) as conn:
        second = claim(conn, email_id, 2, now=later, lease=LEASE, max_attempts=5)
    assert second.status is ClaimStatus.CLAIMED
    assert second.row is not None
    assert (second.row.attempts, second.row.version) == (2, 3)
    assert second.row.message_id == first.row.message_id
    # the first worker wakes up: its lease is gone
    assert not record(records, first.row, Outcome("sent", now, later, smtp_code=250))
    assert record(records, second.row, Outcome("sent", later, later, smtp_code=250))
    row = email_row(db, email_id)
    assert (row.status, row.attempts) == ("sent", 2)
    with db.connect() as conn:
        history = conn.execute(
            sa.select(attempts.c.number, attempts.c.outcome).order_by(attempts.c.number)
        ).all()
    assert [tuple(h) for h in history] == [(1, "transient_error"), (2, "sent")]


def test_a_retried_record_knows_its_first_commit_landed(
    db: Engine, records: KeptConnection
) -> None:
    """The connection can drop after the commit and before its answer: the worker retries,
    finds the row no longer at the claimed version, and must tell "my record landed" from
    "the recovery path took the email over"."""
    sent_id, released_id, lost_id = create(db, 3)
    now = datetime.now(UTC)
    rows = claim_each(db, [sent_id, released_id, lost_id], now)
    finished = now + timedelta(milliseconds=150)
    sent = Outcome("sent", now, finished, smtp_code=250)
    released = Outcome("released", now, finished, error="smtp down", retry_at=finished)
    for email_id, outcome in ((sent_id, sent), (released_id, released)):
        with unit_of_work(db) as conn:
            assert not recorded_before(conn, rows[email_id], outcome)
        assert record(records, rows[email_id], outcome)  # ... and the answer is lost
    for email_id, outcome in ((sent_id, sent), (released_id, released)):  # the retry
        assert not record(records, rows[email_id], outcome)
        with unit_of_work(db) as conn:
            assert recorded_before(conn, rows[email_id], outcome)
    with unit_of_work(db) as conn:
        other = Outcome("sent", now, finished + timedelta(microseconds=1), smtp_code=250)
        assert not recorded_before(conn, rows[sent_id], other)  # not this attempt's record
    later = now + LEASE + timedelta(seconds=1)
    with unit_of_work(db) as conn:  # this one's lease ended and the recovery path took it
        taken = claim(conn, lost_id, 2, now=later, lease=LEASE, max_attempts=5)
    assert taken.status is ClaimStatus.CLAIMED
    lost = Outcome("sent", now, finished, smtp_code=250)
    assert not record(records, rows[lost_id], lost)
    with unit_of_work(db) as conn:
        assert not recorded_before(conn, rows[lost_id], lost)  # "outcome unknown" is not it


def test_a_worker_that_keeps_dying_ends_failed(db: Engine) -> None:
    (email_id,) = create(db)
    now, version = datetime.now(UTC), 1
    for _ in range(3):
        with unit_of_work(db) as conn:
            result = claim(conn, email_id, version, now=now, lease=LEASE, max_attempts=3)
        assert result.status is ClaimStatus.CLAIMED
        assert result.row is not None
        version, now = result.row.version, now + LEASE + timedelta(seconds=1)
    with unit_of_work(db) as conn:
        final = claim(conn, email_id, version, now=now, lease=LEASE, max_attempts=3)
    assert final.status is ClaimStatus.STALE
    row = email_row(db, email_id)
    assert row.status == "failed"
    assert "worker lost" in row.last_error


def test_a_batch_claims_each_email_once_whatever_copies_it_holds(db: Engine) -> None:
    first, second, cancelled = create(db, 3)
    now = datetime.now(UTC)
    with unit_of_work(db) as conn:
        emails.reschedule(conn, OWNER, second, now, now)  # second is now version 2
        emails.cancel(conn, OWNER, cancelled, now)
    batch = [
        DeliveryMessage(first, 1),
        DeliveryMessage(first, 1),  # a duplicate copy in the same batch
        DeliveryMessage(second, 1),  # stale copy first ...
        DeliveryMessage(second, 2),  # ... then the current one
        DeliveryMessage(cancelled, 1),
        DeliveryMessage("00000000-0000-7000-8000-000000000000", 1),
    ]
    with unit_of_work(db) as conn:
        claims = claim_batch(
            conn, batch, now=now + timedelta(seconds=1), lease=LEASE, max_attempts=5
        )
    assert [c.status for c in claims] == [
        ClaimStatus.CLAIMED,
        ClaimStatus.STALE,
        ClaimStatus.STALE,
        ClaimStatus.CLAIMED,
        ClaimStatus.STALE,
        ClaimStatus.GONE,
    ]
    assert email_row(db, second).version == 3


def test_a_claimed_row_holds_what_a_delivery_reads_and_not_the_metadata(db: Engine) -> None:
    """Whichever way an email is claimed - in the batch's UPDATE, or alone after a stale
    copy held the batch's version - its row has the columns a delivery is composed and
    recorded from; the caller's metadata (up to 50 keys) never goes to the worker."""
    heavy = dataclasses.replace(new_email(), metadata={f"k{i}": "v" * 512 for i in range(50)})
    with unit_of_work(db) as conn:
        together, alone = emails.create(conn, OWNER, [heavy, heavy], datetime.now(UTC))
    batch = [
        DeliveryMessage(together, 1),
        DeliveryMessage(alone, 0),  # a stale copy first: the batch UPDATE misses ...
        DeliveryMessage(alone, 1),  # ... and the current one is taken on its own
    ]
    with unit_of_work(db) as conn:
        claims = claim_batch(
            conn, batch, now=datetime.now(UTC) + timedelta(seconds=1), lease=LEASE, max_attempts=5
        )
    assert [c.status for c in claims] == [
        ClaimStatus.CLAIMED,
        ClaimStatus.STALE,
        ClaimStatus.CLAIMED,
    ]
    wanted = [column.name for column in DELIVERY_COLUMNS]
    assert "metadata" not in wanted
    for claimed in (claims[0], claims[2]):
        assert claimed.row is not None
        assert [field.name for field in dataclasses.fields(claimed.row)] == wanted


def test_a_released_email_is_due_again_without_using_an_attempt(
    db: Engine, records: KeptConnection
) -> None:
    (email_id,) = create(db)
    now = datetime.now(UTC)
    with unit_of_work(db) as conn:
        claimed = claim(conn, email_id, 1, now=now, lease=LEASE, max_attempts=5)
    assert claimed.row is not None
    retry_at = now + timedelta(seconds=1)
    released = Outcome("released", now, now, error="smtp down", retry_at=retry_at)
    assert record(records, claimed.row, released)
    row = email_row(db, email_id)
    assert (row.status, row.attempts, row.version, row.due_at) == ("pending", 0, 3, retry_at)
    assert [(r.version, r.fire_at) for r in unpublished(db, email_id) if r.version > 1] == [
        (3, retry_at)
    ]
    with db.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(attempts)).scalar_one() == 0


def test_created_rows_are_exactly_what_a_read_back_gives(db: Engine) -> None:
    """The API answers a create from these values, without reading the rows back."""
    full = NewEmail(
        to=["Ann <ann@example.com>", "bo@example.com"],
        from_addr="me@example.com",
        subject="Grüße",
        send_at=datetime.now(UTC) + timedelta(hours=1, microseconds=7),
        cc=["c@example.com"],
        bcc=["b@example.com"],
        reply_to="r@example.com",
        text="hello",
        html="<p>hello</p>",
        headers={"X-Campaign": "spring"},
        metadata={"n": 1, "f": 0.5, "ok": True, "none": None, "s": "x"},
    )
    now = datetime.now(UTC)
    past = new_email(now - timedelta(minutes=5))  # due now, not at its send_at
    with unit_of_work(db) as conn:
        (written,) = emails.create_many(
            conn, [emails.Creation(OWNER, [full, new_email(), past], now)]
        )
    with db.connect() as conn:
        for row in written:
            stored = conn.execute(sa.select(emails_table).where(emails_table.c.id == row["id"]))
            assert dict(stored.one()._mapping) == row
    assert [w["due_at"] for w in written] == [full.send_at, now, now]
    for row in written:  # and each has its outbox row, due when the email is
        assert [(r.version, r.fire_at) for r in unpublished(db, row["id"])] == [(1, row["due_at"])]


def test_a_record_and_the_relays_mark_of_one_email_wait_for_each_other_without_deadlock(
    db: Engine, records: KeptConnection
) -> None:
    """The relay flags a lot's outbox rows published, then moves their emails to queued;
    a late mark can meet the email's record. The record drops its recovery row before it
    updates the email - the mark's order - so it waits for the mark and both go through
    (the other way round it held the email while the mark held the published row, and
    one of the two was rolled back as a deadlock)."""
    (email_id,) = create(db)
    now = datetime.now(UTC)
    (published,) = unpublished(db, email_id)  # version 1: the row the relay publishes
    claimed = claim_each(db, [email_id], now)[email_id]
    before = deadlocks(db)
    recorded: list[bool] = []
    with db.connect() as relay:
        relay.begin()
        bound = {"now": db_time(now), "ids": (published.id,)}
        assert relay.exec_driver_sql(outbox._MARK, bound).rowcount == 1
        worker = threading.Thread(
            target=lambda: recorded.append(
                record(records, claimed, Outcome("sent", now, now, smtp_code=250))
            )
        )
        worker.start()
        assert until_a_lock_wait(db)  # the record, for the row the mark holds
        relay.exec_driver_sql(outbox._QUEUED, bound)
        relay.commit()
    worker.join(10)
    assert recorded == [True]
    assert deadlocks(db) == before
    assert email_row(db, email_id).status == "sent"
    assert unpublished(db, email_id) == []  # the recovery row went with the record
