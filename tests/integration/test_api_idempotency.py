"""Idempotency-Key races, made deterministic: the first request is held open mid-transaction
(its key row inserted, not committed) while the second arrives through the API."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy.engine import Connection, Engine

from services.api.app import create_app
from services.api.deps import fingerprint
from services.api.idempotency import Outcome, Scope, create_once
from services.api.schemas import EmailRequest
from services.core import emails
from services.core.schema import emails as emails_table
from services.core.settings import Settings
from tests.conftest import API_KEY

KEY = "race-key"
BODY: dict[str, Any] = {"to": ["a@example.com"], "subject": "Hi", "text": "body"}
HEADERS = {"Authorization": f"Bearer {API_KEY}", "Idempotency-Key": KEY}
OWNER = fingerprint(API_KEY)


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The shared settings without Redis: idempotency must hold on MySQL alone."""
    return settings.model_copy(update={"redis_url": SecretStr("")})


@pytest.fixture
def client(settings: Settings, db: Engine) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def scope_of(body: dict[str, Any]) -> Scope:
    """The scope the API computes for ``body`` sent as a single email."""
    request = EmailRequest.model_validate(body)
    return Scope.of(OWNER, KEY, "single", request.model_dump(mode="json", by_alias=True))


def hold_first_request(
    engine: Engine,
    body: dict[str, Any],
    inside: threading.Event,
    release: threading.Event,
    *,
    fail: bool = False,
) -> Callable[[], Outcome]:
    """``create_once`` whose work (run after the key row is inserted) signals ``inside``,
    waits for ``release``, then commits, or raises to roll back."""
    request = EmailRequest.model_validate(body).to_new_email("scheduler@example.com")

    def work(conn: Connection) -> list[dict[str, Any]]:
        (rows,) = emails.create_many(conn, [emails.Creation(OWNER, [request], datetime.now(UTC))])
        inside.set()
        assert release.wait(30)
        if fail:
            raise RuntimeError("first request failed")
        return rows

    return lambda: create_once(engine, scope_of(body), datetime.now(UTC), work)


def wait_for_lock_wait(engine: Engine) -> None:
    """Until the second request's key insert is running (blocked on the first's row)."""
    deadline = time.monotonic() + 10
    query = sa.text(
        "SELECT COUNT(*) FROM information_schema.processlist"
        " WHERE db = DATABASE() AND info LIKE 'INSERT INTO idempotency_keys%%'"
    )
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            if conn.execute(query).scalar_one():
                return
        time.sleep(0.02)
    raise AssertionError("the second request never waited on the key")


def race(
    client: TestClient,
    db: Engine,
    first_body: dict[str, Any],
    *,
    fail: bool = False,
    hold_seconds: float = 0.0,
) -> tuple[Future[Outcome], httpx.Response]:
    inside, release = threading.Event(), threading.Event()
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(hold_first_request(db, first_body, inside, release, fail=fail))
        assert inside.wait(10)  # the first has inserted its key row and holds its lock
        second = pool.submit(client.post, "/v1/emails", json=BODY, headers=HEADERS)
        wait_for_lock_wait(db)
        time.sleep(hold_seconds)
        release.set()
        reply = second.result(timeout=30)
        with pytest.raises(RuntimeError) if fail else contextlib.nullcontext():
            first.result(timeout=30)
    return first, reply


def count(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(emails_table)).scalar_one())


def test_waiter_replays_once_the_first_commits(client: TestClient, db: Engine) -> None:
    first, reply = race(client, db, BODY)
    assert reply.status_code == 200, reply.text
    assert reply.headers["Idempotent-Replayed"] == "true"
    assert reply.json()["id"] == first.result().rows[0]["id"]
    assert count(db) == 1


def test_waiter_gets_422_when_the_first_had_another_body(client: TestClient, db: Engine) -> None:
    _, reply = race(client, db, {**BODY, "subject": "other"})
    assert reply.status_code == 422
    assert count(db) == 1


def test_waiter_creates_when_the_first_rolls_back(client: TestClient, db: Engine) -> None:
    _, reply = race(client, db, BODY, fail=True)
    assert reply.status_code == 201, reply.text
    assert count(db) == 1
    again = client.post("/v1/emails", json=BODY, headers=HEADERS)
    assert again.status_code == 200
    assert again.json()["id"] == reply.json()["id"]


def test_waiter_gets_409_while_the_first_is_still_in_flight(client: TestClient, db: Engine) -> None:
    """innodb_lock_wait_timeout is 10 s on API connections: hold the first longer."""
    _, reply = race(client, db, BODY, hold_seconds=11)
    assert reply.status_code == 409, reply.text
    assert count(db) == 1
