"""The REST API against the real MariaDB/MySQL of the run: CONTRACT.md, route by route."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import sqlalchemy as sa
import uvicorn
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy.engine import Engine

from services.api.app import create_app
from services.api.deps import fingerprint
from services.core.schema import attempts, emails, idempotency_keys, outbox
from services.core.settings import Settings
from tests.conftest import API_KEY, OTHER_API_KEY

AUTH = {"Authorization": f"Bearer {API_KEY}"}
OTHER = {"Authorization": f"Bearer {OTHER_API_KEY}"}
RESOURCE_KEYS = {
    "id",
    "status",
    "to",
    "cc",
    "bcc",
    "from",
    "subject",
    "send_at",
    "created_at",
    "updated_at",
    "sent_at",
    "attempts",
    "last_error",
    "message_id",
    "metadata",
}
REPO = Path(__file__).resolve().parents[2]


AUTH_JSON = {**AUTH, "Content-Type": "application/json"}


def email(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"to": ["a@example.com"], "subject": "Hi", "text": "body"}
    body.update(changes)
    return body


def count(engine: Engine, table: sa.Table) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())


def set_status(engine: Engine, email_id: str, status: str) -> None:
    with engine.begin() as conn:
        conn.execute(emails.update().where(emails.c.id == email_id).values(status=status))


@pytest.fixture
def client(settings: Settings, db: Engine) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@contextlib.contextmanager
def live_server(settings: Settings) -> Iterator[str]:
    """The app under a real uvicorn on a free loopback port, in a thread of this process."""
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=0, log_config=None)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)


# --- create and read ---------------------------------------------------------------


def test_create_returns_the_resource_and_writes_email_and_outbox(
    client: TestClient, db: Engine
) -> None:
    reply = client.post(
        "/v1/emails",
        json=email(
            to=["Alice <alice@example.com>"],
            cc=["c@example.com"],
            metadata={"user_id": "42"},
            headers={"X-Campaign": "spring"},
        ),
        headers=AUTH,
    )
    assert reply.status_code == 201, reply.text
    body = reply.json()
    assert set(body) == RESOURCE_KEYS
    assert body["status"] == "pending"
    assert body["to"] == ["Alice <alice@example.com>"]
    assert body["cc"] == ["c@example.com"]
    assert body["bcc"] == []
    assert body["from"] == "scheduler@example.com"
    assert body["metadata"] == {"user_id": "42"}
    assert body["attempts"] == 0
    assert body["sent_at"] is None
    assert body["message_id"] == f"<{body['id']}@example.com>"
    for field in ("send_at", "created_at", "updated_at"):
        assert body[field].endswith("Z")
        assert datetime.fromisoformat(body[field]).tzinfo is not None
    assert client.get(f"/v1/emails/{body['id']}", headers=AUTH).json() == body
    with db.connect() as conn:
        row = conn.execute(sa.select(emails).where(emails.c.id == body["id"])).one()
        entries = conn.execute(sa.select(outbox).where(outbox.c.email_id == body["id"])).all()
    assert row.owner == fingerprint(API_KEY)
    assert row.headers == {"X-Campaign": "spring"}
    assert [(e.version, e.published_at) for e in entries] == [(1, None)]


def test_send_at_in_2040_is_kept(client: TestClient, db: Engine) -> None:
    reply = client.post("/v1/emails", json=email(send_at="2040-01-01T09:00:00+01:00"), headers=AUTH)
    assert reply.status_code == 201, reply.text
    assert reply.json()["send_at"] == "2040-01-01T08:00:00Z"
    with db.connect() as conn:
        fire_at = conn.execute(sa.select(outbox.c.fire_at)).scalar_one()
    assert fire_at == datetime(2040, 1, 1, 8, tzinfo=UTC)


def test_naive_send_at_is_422(client: TestClient, db: Engine) -> None:
    reply = client.post("/v1/emails", json=email(send_at="2030-01-01T09:00:00"), headers=AUTH)
    assert reply.status_code == 422
    assert count(db, emails) == 0


def test_from_is_required_without_mail_from(settings: Settings, db: Engine) -> None:
    with TestClient(create_app(settings.model_copy(update={"mail_from": ""}))) as bare:
        reply = bare.post("/v1/emails", json=email(), headers=AUTH)
        assert reply.status_code == 422
        assert reply.json()["detail"][0]["loc"] == ["body", "from"]
        batch = bare.post(
            "/v1/emails/batch",
            json={"emails": [email(**{"from": "me@example.com"}), email()]},
            headers=AUTH,
        )
        assert batch.status_code == 422
        assert batch.json()["detail"][0]["loc"] == ["body", "emails", 1, "from"]
        ok = bare.post("/v1/emails", json=email(**{"from": "me@example.com"}), headers=AUTH)
        assert ok.status_code == 201
    assert count(db, emails) == 1


@pytest.mark.parametrize(
    "body",
    [
        email(subject="Hi\r\nBcc: victim@example.com"),
        email(to=["alice@example.org)<bob@example.org>"]),
        email(to=["a@example.com\r\nBcc: victim@example.com"]),
        email(reply_to="r@example.com\nBcc: victim@example.com"),
        email(headers={"X-A": "1\r\nBcc: victim@example.com"}),
        email(headers={"bcc": "victim@example.com"}),
        email(unknown=1),
        email(subject="s" * 999),
        email(to=["a" * 65 + "@example.com"]),
    ],
)
def test_bad_input_is_422_and_stores_nothing(
    client: TestClient, db: Engine, body: dict[str, Any]
) -> None:
    reply = client.post("/v1/emails", json=body, headers=AUTH)
    assert reply.status_code == 422, reply.text
    assert count(db, emails) == 0
    assert count(db, outbox) == 0


def test_malformed_json_is_422(client: TestClient) -> None:
    reply = client.post("/v1/emails", content=b'{"to": [', headers=AUTH_JSON)
    assert reply.status_code == 422
    (error,) = reply.json()["detail"]
    assert error["type"] == "json_invalid"
    assert error["loc"] == ["body"]
    assert error["input"] == {}  # what is not JSON is not echoed back


@pytest.mark.parametrize(
    ("content", "content_type", "error_type"),
    [
        (b"", "application/json", "missing"),
        (b'{"to": ["a@example.com"], "subject": "s", "text": "t"}', None, "content_type"),
        (b'{"to": ["a@example.com"], "subject": "s", "text": "t"}', "text/plain", "content_type"),
        (b"[]", "application/json", "model_type"),
        (b'{"to": ["a@example.com"], "subject": "\xff"}', "application/json", "json_invalid"),
    ],
)
def test_a_create_body_that_is_not_a_json_object_is_422(
    client: TestClient, db: Engine, content: bytes, content_type: str | None, error_type: str
) -> None:
    headers = {**AUTH, "Content-Type": content_type} if content_type else AUTH
    for path in ("/v1/emails", "/v1/emails/batch"):
        reply = client.post(path, content=content, headers=headers)
        assert reply.status_code == 422, reply.text
        assert [e["type"] for e in reply.json()["detail"]] == [error_type]
    assert count(db, emails) == 0


def test_a_create_body_is_read_as_json_also_with_a_json_suffix_type(client: TestClient) -> None:
    reply = client.post(
        "/v1/emails",
        content=b'{"to": ["a@example.com"], "from": "b@example.com", "subject": "s", "text": "t"}',
        headers={**AUTH, "Content-Type": "application/vnd.api+json; charset=utf-8"},
    )
    assert reply.status_code == 201, reply.text


@pytest.mark.parametrize("number", [b"NaN", b"Infinity", b"-Infinity"])
def test_nan_and_infinity_are_422_not_500(client: TestClient, number: bytes) -> None:
    """JSON has no NaN; an input echoed back in a 422 must not be one either."""
    create = b'{"to": ["a@example.com"], "subject": "s", "text": "t", "metadata": {"n": %s}}'
    replies = [
        client.post("/v1/emails", content=create % number, headers=AUTH_JSON),
        client.patch("/v1/emails/x", content=b'{"send_at": %s}' % number, headers=AUTH_JSON),
    ]
    for reply in replies:
        assert reply.status_code == 422, reply.text
        assert reply.json()["detail"]


def test_an_unauthenticated_create_is_401_before_its_body_is_read(client: TestClient) -> None:
    reply = client.post("/v1/emails", content=b"{", headers={"Content-Type": "application/json"})
    assert reply.status_code == 401


# --- auth and ownership ----------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-key"},
        {"Authorization": f"Basic {API_KEY}"},
        {"Authorization": f"Bearer {API_KEY}x"},
        {"Authorization": "Bearer"},
    ],
)
def test_missing_or_bad_key_is_401(client: TestClient, headers: dict[str, str]) -> None:
    for method, path in [
        ("POST", "/v1/emails"),
        ("POST", "/v1/emails/batch"),
        ("GET", "/v1/emails"),
        ("GET", "/v1/emails/x"),
        ("POST", "/v1/emails/x/cancel"),
        ("PATCH", "/v1/emails/x"),
        ("GET", "/v1/emails/x/attempts"),
    ]:
        reply = client.request(method, path, headers=headers, json=email())
        assert reply.status_code == 401, (method, path)
        assert reply.headers["WWW-Authenticate"] == "Bearer"
        assert API_KEY not in reply.text


def test_another_key_never_sees_an_email(client: TestClient) -> None:
    created = client.post("/v1/emails", json=email(), headers=AUTH).json()
    path = f"/v1/emails/{created['id']}"
    assert client.get(path, headers=OTHER).status_code == 404
    assert client.post(f"{path}/cancel", headers=OTHER).status_code == 404
    later = {"send_at": "2031-01-01T00:00:00Z"}
    assert client.patch(path, json=later, headers=OTHER).status_code == 404
    assert client.get(f"{path}/attempts", headers=OTHER).status_code == 404
    assert client.get("/v1/emails", headers=OTHER).json() == {"items": [], "next_cursor": None}
    assert client.get(path, headers=AUTH).json()["status"] == "pending"


def test_keys_never_reach_the_logs(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("DEBUG"):
        client.post("/v1/emails", json=email(), headers=AUTH)
        client.get("/v1/emails", headers={"Authorization": "Bearer not-a-key"})
    assert "email scheduled" in caplog.text
    assert API_KEY not in caplog.text
    assert "not-a-key" not in caplog.text


# --- list ------------------------------------------------------------------------------


def test_list_walks_every_email_newest_first(client: TestClient) -> None:
    created = [client.post("/v1/emails", json=email(), headers=AUTH).json()["id"] for _ in range(5)]
    batch = client.post("/v1/emails/batch", json={"emails": [email()] * 18}, headers=AUTH)
    created += [item["id"] for item in batch.json()["items"]]
    client.post("/v1/emails", json=email(), headers=OTHER)

    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 5} | ({"cursor": cursor} if cursor else {})
        reply = client.get("/v1/emails", params=params, headers=AUTH)
        assert reply.status_code == 200, reply.text
        page = reply.json()
        assert len(page["items"]) <= 5
        seen += [item["id"] for item in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 5
    assert seen == list(reversed(created))
    assert len(set(seen)) == 23


def test_list_filters_by_status(client: TestClient) -> None:
    ids = [client.post("/v1/emails", json=email(), headers=AUTH).json()["id"] for _ in range(4)]
    for email_id in ids[:3]:
        assert client.post(f"/v1/emails/{email_id}/cancel", headers=AUTH).status_code == 200
    cancelled = client.get("/v1/emails", params={"status": "cancelled"}, headers=AUTH).json()
    assert [item["id"] for item in cancelled["items"]] == list(reversed(ids[:3]))
    pending = client.get("/v1/emails", params={"status": "pending"}, headers=AUTH).json()
    assert [item["id"] for item in pending["items"]] == [ids[3]]
    default = client.get("/v1/emails", headers=AUTH).json()
    assert len(default["items"]) == 4
    assert default["next_cursor"] is None


@pytest.mark.parametrize(
    "params",
    [
        {"status": "bogus"},
        {"limit": 0},
        {"limit": 201},
        {"cursor": "!!!"},
        {"cursor": "abc"},
        {"cursor": "é"},
    ],
)
def test_list_refuses_bad_parameters(client: TestClient, params: dict[str, Any]) -> None:
    assert client.get("/v1/emails", params=params, headers=AUTH).status_code == 422


# --- batch -----------------------------------------------------------------------------


def test_batch_keeps_request_order(client: TestClient, db: Engine) -> None:
    subjects = [f"s{i}" for i in range(30)]
    reply = client.post(
        "/v1/emails/batch", json={"emails": [email(subject=s) for s in subjects]}, headers=AUTH
    )
    assert reply.status_code == 201, reply.text
    assert [item["subject"] for item in reply.json()["items"]] == subjects
    for item in reply.json()["items"]:  # the 201 shows the emails as stored
        assert client.get(f"/v1/emails/{item['id']}", headers=AUTH).json() == item
    assert count(db, emails) == 30
    assert count(db, outbox) == 30


def test_batch_with_one_invalid_item_stores_nothing(client: TestClient, db: Engine) -> None:
    items = [email(), email(), email(to=["alice@example.org)<bob@example.org>"]), email()]
    reply = client.post("/v1/emails/batch", json={"emails": items}, headers=AUTH)
    assert reply.status_code == 422
    assert {tuple(error["loc"][:3]) for error in reply.json()["detail"]} == {("body", "emails", 2)}
    assert count(db, emails) == 0
    assert count(db, outbox) == 0


def test_batch_size_bounds(client: TestClient, db: Engine) -> None:
    assert client.post("/v1/emails/batch", json={"emails": []}, headers=AUTH).status_code == 422
    thousand = {"emails": [email()] * 1000}
    assert client.post("/v1/emails/batch", json=thousand, headers=AUTH).status_code == 201
    too_many = {"emails": [email()] * 1001}
    assert client.post("/v1/emails/batch", json=too_many, headers=AUTH).status_code == 422
    assert count(db, emails) == 1000


# --- cancel and reschedule -----------------------------------------------------------


def test_cancel_pending_and_queued_and_again(client: TestClient, db: Engine) -> None:
    first, second = (
        client.post("/v1/emails", json=email(send_at="2035-01-01T00:00:00Z"), headers=AUTH).json()[
            "id"
        ]
        for _ in range(2)
    )
    set_status(db, second, "queued")
    for email_id in (first, second):
        reply = client.post(f"/v1/emails/{email_id}/cancel", headers=AUTH)
        assert reply.status_code == 200, reply.text
        assert reply.json()["status"] == "cancelled"
        again = client.post(f"/v1/emails/{email_id}/cancel", headers=AUTH)
        assert again.status_code == 200
        assert again.json()["status"] == "cancelled"
    assert count(db, outbox) == 0
    assert client.post("/v1/emails/nope/cancel", headers=AUTH).status_code == 404


@pytest.mark.parametrize("status", ["sending", "sent", "failed"])
def test_cancel_and_reschedule_refuse_late_states(
    client: TestClient, db: Engine, status: str
) -> None:
    email_id = client.post("/v1/emails", json=email(), headers=AUTH).json()["id"]
    set_status(db, email_id, status)
    assert client.post(f"/v1/emails/{email_id}/cancel", headers=AUTH).status_code == 409
    later = {"send_at": "2031-01-01T00:00:00Z"}
    assert client.patch(f"/v1/emails/{email_id}", json=later, headers=AUTH).status_code == 409
    assert client.get(f"/v1/emails/{email_id}", headers=AUTH).json()["status"] == status


def test_reschedule_replaces_the_unpublished_outbox_row(client: TestClient, db: Engine) -> None:
    email_id = client.post(
        "/v1/emails", json=email(send_at="2035-01-01T00:00:00Z"), headers=AUTH
    ).json()["id"]
    reply = client.patch(
        f"/v1/emails/{email_id}", json={"send_at": "2036-02-03T04:05:06+00:00"}, headers=AUTH
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["send_at"] == "2036-02-03T04:05:06Z"
    assert reply.json()["status"] == "pending"
    with db.connect() as conn:
        entries = conn.execute(sa.select(outbox).where(outbox.c.email_id == email_id)).all()
        version = conn.execute(sa.select(emails.c.version)).scalar_one()
    assert version == 2
    assert [(e.version, e.fire_at, e.published_at) for e in entries] == [
        (2, datetime(2036, 2, 3, 4, 5, 6, tzinfo=UTC), None)
    ]


def test_reschedule_of_a_queued_email_keeps_the_published_row(
    client: TestClient, db: Engine
) -> None:
    email_id = client.post("/v1/emails", json=email(), headers=AUTH).json()["id"]
    with db.begin() as conn:
        conn.execute(outbox.update().values(published_at=datetime.now(UTC)))
    set_status(db, email_id, "queued")
    past = (datetime.now(UTC) - timedelta(days=1)).isoformat()
    reply = client.patch(f"/v1/emails/{email_id}", json={"send_at": past}, headers=AUTH)
    assert reply.status_code == 200, reply.text
    with db.connect() as conn:
        entries = conn.execute(sa.select(outbox.c.version, outbox.c.published_at)).all()
    assert sorted(e.version for e in entries) == [1, 2]
    assert [e.version for e in entries if e.published_at is None] == [2]


@pytest.mark.parametrize(
    "body", [{"send_at": "2031-01-01T00:00:00"}, {}, {"send_at": "2031-01-01T00:00:00Z", "x": 1}]
)
def test_reschedule_refuses_bad_bodies(client: TestClient, body: dict[str, Any]) -> None:
    email_id = client.post("/v1/emails", json=email(), headers=AUTH).json()["id"]
    assert client.patch(f"/v1/emails/{email_id}", json=body, headers=AUTH).status_code == 422


# --- attempts --------------------------------------------------------------------------


def test_attempts_oldest_first(client: TestClient, db: Engine) -> None:
    email_id = client.post("/v1/emails", json=email(), headers=AUTH).json()["id"]
    path = f"/v1/emails/{email_id}/attempts"
    assert client.get(path, headers=AUTH).json() == {"items": []}
    start = datetime(2030, 1, 1, tzinfo=UTC)
    with db.begin() as conn:
        conn.execute(
            attempts.insert(),
            [
                {
                    "email_id": email_id,
                    "number": 2,
                    "started_at": start + timedelta(minutes=1),
                    "finished_at": start + timedelta(minutes=1, seconds=1),
                    "outcome": "sent",
                    "smtp_code": 250,
                    "error": None,
                },
                {
                    "email_id": email_id,
                    "number": 1,
                    "started_at": start,
                    "finished_at": start + timedelta(seconds=1),
                    "outcome": "transient_error",
                    "smtp_code": 451,
                    "error": "try later",
                },
            ],
        )
    assert client.get(path, headers=AUTH).json() == {
        "items": [
            {
                "number": 1,
                "started_at": "2030-01-01T00:00:00Z",
                "finished_at": "2030-01-01T00:00:01Z",
                "outcome": "transient_error",
                "smtp_code": 451,
                "error": "try later",
            },
            {
                "number": 2,
                "started_at": "2030-01-01T00:01:00Z",
                "finished_at": "2030-01-01T00:01:01Z",
                "outcome": "sent",
                "smtp_code": 250,
                "error": None,
            },
        ]
    }
    assert client.get("/v1/emails/nope/attempts", headers=AUTH).status_code == 404


# --- idempotency -----------------------------------------------------------------------


def test_idempotent_replay(client: TestClient, db: Engine) -> None:
    headers = {**AUTH, "Idempotency-Key": "order-42"}
    first = client.post("/v1/emails", json=email(), headers=headers)
    assert first.status_code == 201
    assert "Idempotent-Replayed" not in first.headers
    client.post(f"/v1/emails/{first.json()['id']}/cancel", headers=AUTH)
    again = client.post("/v1/emails", json=email(), headers=headers)
    assert again.status_code == 200
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    assert again.json()["status"] == "cancelled"  # the email as it is now
    assert count(db, emails) == 1
    with db.connect() as conn:
        stored = conn.execute(sa.select(idempotency_keys)).one()
    assert stored.owner == fingerprint(API_KEY)
    assert "order-42" not in stored.key_hash


def test_same_key_other_body_is_422(client: TestClient, db: Engine) -> None:
    headers = {**AUTH, "Idempotency-Key": "k1"}
    assert client.post("/v1/emails", json=email(), headers=headers).status_code == 201
    assert client.post("/v1/emails", json=email(subject="x"), headers=headers).status_code == 422
    batch = client.post("/v1/emails/batch", json={"emails": [email()]}, headers=headers)
    assert batch.status_code == 422
    assert count(db, emails) == 1


def test_idempotent_batch_replay(client: TestClient, db: Engine) -> None:
    headers = {**AUTH, "Idempotency-Key": "batch-1"}
    body = {"emails": [email(subject=f"s{i}") for i in range(3)]}
    first = client.post("/v1/emails/batch", json=body, headers=headers)
    again = client.post("/v1/emails/batch", json=body, headers=headers)
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.headers["Idempotent-Replayed"] == "true"
    assert [i["id"] for i in again.json()["items"]] == [i["id"] for i in first.json()["items"]]
    assert count(db, emails) == 3


@pytest.mark.parametrize("key", [b"", b"k" * 256, "naïve".encode(), b"tab\there", b"\x7f"])
def test_malformed_idempotency_key_is_400(client: TestClient, db: Engine, key: bytes) -> None:
    headers: dict[str, str | bytes] = {**AUTH, "Idempotency-Key": key}
    reply = client.post("/v1/emails", json=email(), headers=headers)
    assert reply.status_code == 400
    assert count(db, emails) == 0


def test_idempotency_key_of_255_chars_works(client: TestClient) -> None:
    headers = {**AUTH, "Idempotency-Key": "k" * 255}
    assert client.post("/v1/emails", json=email(), headers=headers).status_code == 201


def test_two_api_keys_never_share_an_idempotency_key(client: TestClient, db: Engine) -> None:
    mine = client.post("/v1/emails", json=email(), headers={**AUTH, "Idempotency-Key": "same"})
    theirs = client.post("/v1/emails", json=email(), headers={**OTHER, "Idempotency-Key": "same"})
    assert (mine.status_code, theirs.status_code) == (201, 201)
    assert mine.json()["id"] != theirs.json()["id"]
    assert count(db, emails) == 2


def test_hundred_concurrent_identical_requests_make_one_email(
    settings: Settings, db: Engine
) -> None:
    headers = {**AUTH, "Idempotency-Key": "concurrent"}
    with live_server(settings) as url, httpx.Client(base_url=url, timeout=60) as http:
        barrier = threading.Barrier(100)

        def post(_: int) -> httpx.Response:
            barrier.wait()
            return http.post("/v1/emails", json=email(), headers=headers)

        with ThreadPoolExecutor(100) as pool:
            replies = list(pool.map(post, range(100)))
    statuses = [reply.status_code for reply in replies]
    assert set(statuses) <= {200, 201, 409}, statuses
    assert statuses.count(201) == 1
    ids = {reply.json()["id"] for reply in replies if reply.status_code in (200, 201)}
    assert len(ids) == 1
    assert count(db, emails) == 1
    assert count(db, outbox) == 1


# --- size limits -------------------------------------------------------------------------


def test_declared_body_over_the_limit_is_413(client: TestClient, settings: Settings) -> None:
    reply = client.post(
        "/v1/emails",
        content=b"x" * (settings.max_request_bytes + 1),
        headers={**AUTH, "Content-Type": "application/json"},
    )
    assert reply.status_code == 413


def test_chunked_10_mb_body_is_cut_off_early(settings: Settings, db: Engine) -> None:
    """A raw socket with a small send buffer: the 413 must come long before 10 MB went out."""
    total, chunk = 10 * 1024 * 1024, 64 * 1024
    with live_server(settings) as url:
        port = int(url.rsplit(":", 1)[1])
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        sock.settimeout(10)
        sock.connect(("127.0.0.1", port))
        sock.sendall(
            b"POST /v1/emails HTTP/1.1\r\nHost: test\r\n"
            + f"Authorization: Bearer {API_KEY}\r\n".encode()
            + b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        sent = 0
        with contextlib.suppress(BrokenPipeError, ConnectionResetError, TimeoutError):
            while sent < total:
                sock.sendall(b"%x\r\n" % chunk + b"x" * chunk + b"\r\n")
                sent += chunk
        reply = sock.recv(4096)
        sock.close()
    assert reply.startswith(b"HTTP/1.1 413"), reply[:100]
    assert sent < total
    assert count(db, emails) == 0


# --- database down ---------------------------------------------------------------------


def test_database_unreachable_is_503_never_500(settings: Settings) -> None:
    down = settings.model_copy(
        update={"database_url": SecretStr("mysql+pymysql://root@127.0.0.1:1/emailsched")}
    )
    with TestClient(create_app(down), raise_server_exceptions=False) as dead:
        replies = [
            dead.post("/v1/emails", json=email(), headers=AUTH),
            dead.post("/v1/emails", json=email(), headers={**AUTH, "Idempotency-Key": "k"}),
            dead.post("/v1/emails/batch", json={"emails": [email()]}, headers=AUTH),
            dead.get("/v1/emails", headers=AUTH),
            dead.get("/v1/emails/some-id", headers=AUTH),
            dead.post("/v1/emails/some-id/cancel", headers=AUTH),
            dead.patch(
                "/v1/emails/some-id", json={"send_at": "2031-01-01T00:00:00Z"}, headers=AUTH
            ),
            dead.get("/v1/emails/some-id/attempts", headers=AUTH),
        ]
        for reply in replies:
            assert reply.status_code == 503, (reply.request.url, reply.text)
            assert reply.headers["Retry-After"] == "5"
            assert reply.json() == {"detail": "database unavailable, retry later"}
        assert dead.get("/readyz").status_code == 503
        assert dead.get("/healthz").status_code == 200


def _waiting_for_table_lock(db: Engine) -> int:
    with db.connect() as conn:
        return int(
            conn.execute(
                sa.text(
                    "SELECT COUNT(*) FROM information_schema.processlist"
                    " WHERE db = :db AND state LIKE 'Waiting for table%lock'"
                ),
                {"db": db.url.database},
            ).scalar_one()
        )


@contextlib.contextmanager
def _creates_under_a_table_lock(
    settings: Settings, db: Engine, headers: Callable[[int], dict[str, str]], creates: int
) -> Iterator[int]:
    """Send ``creates`` creates while MySQL holds them all (LOCK TABLES outbox WRITE);
    gives how many wait inside MySQL once they have all arrived, having checked that
    /healthz still answers; afterwards, that every create is a 201 once the lock goes."""
    with (
        live_server(settings) as url,
        httpx.Client(base_url=url, timeout=60) as http,
        ThreadPoolExecutor(creates) as pool,
        db.connect() as locker,
    ):
        locker.execute(sa.text("LOCK TABLES outbox WRITE"))
        try:
            replies = [
                pool.submit(http.post, "/v1/emails", json=email(), headers=headers(n))
                for n in range(creates)
            ]
            deadline = time.monotonic() + 20
            while _waiting_for_table_lock(db) == 0:
                assert time.monotonic() < deadline, "no create reached MySQL"
                time.sleep(0.05)
            time.sleep(0.5)  # the rest arrive and queue in the API
            started = time.monotonic()
            assert http.get("/healthz").status_code == 200
            assert time.monotonic() - started < 1.0
            yield _waiting_for_table_lock(db)
            assert not any(reply.done() for reply in replies)
        finally:
            locker.execute(sa.text("UNLOCK TABLES"))
        assert [reply.result().status_code for reply in replies] == [201] * creates
    assert count(db, emails) == creates


def test_creates_wait_for_mysql_in_one_transaction_and_healthz_still_answers(
    settings: Settings, db: Engine
) -> None:
    """Creates without an Idempotency-Key are committed in groups: while MySQL holds the
    first group, one transaction waits in MySQL however many creates come; the others
    wait in the API for the next group, and each gets its 201 once the lock goes."""
    with _creates_under_a_table_lock(settings, db, lambda n: AUTH, creates=7) as in_mysql:
        assert in_mysql == 1


def test_idempotent_creates_wait_for_mysql_on_a_bounded_pool(
    settings: Settings, db: Engine
) -> None:
    """Creates with an Idempotency-Key each have a transaction of their own, on one of
    API_THREADS request threads: at most that many wait inside MySQL, the rest queue."""
    threads = 3  # not the default, so the setting is what bounds them
    settings = settings.model_copy(update={"api_threads": threads})
    with _creates_under_a_table_lock(
        settings, db, lambda n: {**AUTH, "Idempotency-Key": f"bounded-{n}"}, creates=threads + 4
    ) as in_mysql:
        assert in_mysql == threads


def test_readyz_with_the_database_up(client: TestClient) -> None:
    assert client.get("/readyz").json() == {"status": "ok"}
    assert client.get("/healthz").json() == {"status": "ok"}


# --- fast path, docs, process ------------------------------------------------------------


def test_due_email_wakes_the_relay_and_a_future_one_does_not(
    client: TestClient, settings: Settings, redis_client: redis.Redis
) -> None:
    channel = f"emailsched:{settings.email_queue}:wakeup"
    pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(channel)
    pubsub.get_message(timeout=1)  # the subscribe confirmation

    def wakeups() -> int:
        return sum(1 for _ in iter(lambda: pubsub.get_message(timeout=0.3), None))

    client.post("/v1/emails", json=email(send_at="2040-01-01T00:00:00Z"), headers=AUTH)
    assert wakeups() == 0
    client.post("/v1/emails", json=email(), headers=AUTH)
    assert wakeups() == 1
    pubsub.close()


def test_openapi_declares_bearer_auth(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert {"/v1/emails", "/v1/emails/batch", "/v1/emails/{email_id}"} <= set(spec["paths"])
    assert client.get("/docs").status_code == 200


def test_process_refuses_to_start_without_api_keys(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "API_KEYS": "",
        "PYTHONPATH": str(REPO),
        "DATABASE_URL": "mysql+pymysql://root@127.0.0.1:1/none",
    }
    result = subprocess.run(
        [sys.executable, "-m", "services.api"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "API_KEYS is empty" in result.stderr


@contextlib.contextmanager
def api_process(tmp_path: Path, database_url: str, **extra_env: str) -> Iterator[ApiProcess]:
    """``python -m services.api`` on a free loopback port in its own session, output
    piped; whatever of it still runs when the block ends is killed, children and all."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        **os.environ,
        "API_KEYS": API_KEY,
        "API_HOST": "127.0.0.1",
        "API_PORT": str(port),
        "REDIS_URL": "",
        "PYTHONPATH": str(REPO),
        "DATABASE_URL": database_url,
        **extra_env,
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "services.api"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        yield ApiProcess(process, f"http://127.0.0.1:{port}")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()


@dataclass
class ApiProcess:
    process: subprocess.Popen[str]
    url: str

    def wait_until(self, ready: Callable[[], bool], what: str = "the API") -> None:
        deadline = time.monotonic() + 30
        while not ready():
            assert self.process.poll() is None, self.process.communicate()[0]
            assert time.monotonic() < deadline, f"{what} did not come up"
            time.sleep(0.1)

    def answers(self) -> bool:
        try:
            return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    def stop(self) -> str:
        """SIGTERM; the output of the whole run once the process has ended."""
        self.process.send_signal(signal.SIGTERM)
        output, _ = self.process.communicate(timeout=60)
        return output


def test_process_serves_then_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    with api_process(tmp_path, "mysql+pymysql://root@127.0.0.1:1/none") as api:
        api.wait_until(api.answers)
        assert httpx.get(f"{api.url}/readyz", timeout=10).status_code == 503
        output = api.stop()
    assert api.process.returncode == 0, output
    assert "Shutting down" in output
    assert API_KEY not in output


@pytest.mark.parametrize("access_log", [None, "true"])
def test_access_log_only_when_asked_and_each_create_logged(
    database_url: str, tmp_path: Path, access_log: str | None
) -> None:
    """Every scheduled email has its own line; uvicorn's line per request comes only
    with API_ACCESS_LOG=true."""
    extra = {"API_ACCESS_LOG": access_log} if access_log else {}
    with api_process(tmp_path, database_url, MAIL_FROM="sender@example.com", **extra) as api:
        api.wait_until(api.answers)
        reply = httpx.post(f"{api.url}/v1/emails", json=email(), headers=AUTH, timeout=30)
        assert reply.status_code == 201
        output = api.stop()
    assert f"email scheduled id={reply.json()['id']}" in output
    access_line = '"POST /v1/emails HTTP/1.1" 201'
    assert (access_line in output) == (access_log == "true"), output


def _servers(pid: int) -> set[int]:
    """PIDs of the server processes the supervisor ``pid`` spawned (from /proc;
    multiprocessing's resource tracker, also a child, is left out)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
            if int(fields[1]) == pid and b"spawn_main" in cmdline:
                found.add(int(stat.parent.name))
    return found


def _tcp_sockets(pid: int, port: int, state: str) -> set[str]:
    """The TCP sockets (inodes) on local ``port`` in ``state`` (a /proc/net/tcp code: 0A
    listening, 01 established) that process ``pid`` holds."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    held = set()
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].rsplit(":", 1)[1], 16)
        if local_port == port and fields[3] == state and fields[9] in inodes:
            held.add(fields[9])
    return held


def test_api_workers_serve_from_several_processes_and_stop_cleanly(
    database_url: str, db: Engine, tmp_path: Path
) -> None:
    """API_WORKERS=2: two server processes, each listening on a socket of its own, both
    take connections; one that dies is replaced; SIGTERM lets both finish and stop, and
    the API exits 0."""
    with api_process(
        tmp_path, database_url, API_WORKERS="2", MAIL_FROM="sender@example.com"
    ) as api:
        api.wait_until(
            lambda: len(_servers(api.process.pid)) == 2 and api.answers(), "the API processes"
        )
        servers = _servers(api.process.pid)
        port = int(api.url.rsplit(":", 1)[1])
        api.wait_until(lambda: all(_tcp_sockets(pid, port, "0A") for pid in servers))
        first, second = (_tcp_sockets(pid, port, "0A") for pid in servers)
        assert len(first) == len(second) == 1
        assert first != second  # not one socket shared
        # 32 keep-alive clients connecting together: the kernel spreads them over both
        # listeners (one shared socket gave one process nearly all of them).
        clients = [httpx.Client(base_url=api.url, timeout=30) for _ in range(32)]
        try:
            with ThreadPoolExecutor(32) as pool:
                codes = list(
                    pool.map(
                        lambda c: c.post("/v1/emails", json=email(), headers=AUTH).status_code,
                        clients,
                    )
                )
            assert codes == [201] * 32
            held = [len(_tcp_sockets(pid, port, "01")) for pid in servers]
            assert sum(held) == 32
            assert min(held) >= 4, held
        finally:
            for client in clients:
                client.close()
        assert count(db, emails) == 32

        victim = min(servers)
        os.kill(victim, signal.SIGKILL)
        api.wait_until(
            lambda: len(_servers(api.process.pid) - {victim}) == 2, "a replacement process"
        )
        servers = _servers(api.process.pid)
        api.wait_until(lambda: all(_tcp_sockets(pid, port, "0A") for pid in servers))
        output = api.stop()
    assert api.process.returncode == 0, output
    assert f"api process {victim} ended with status -9; starting another" in output
    assert output.count("Application startup complete") == 3, output
    assert output.count("Application shutdown complete") == 2, output
    assert all(not Path(f"/proc/{pid}").exists() for pid in servers)
    assert API_KEY not in output


def test_api_workers_refuse_a_port_already_taken(database_url: str, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with api_process(tmp_path, database_url, API_WORKERS="2", API_PORT=str(port)) as api:
            output, _ = api.process.communicate(timeout=60)
    assert api.process.returncode == 2, output
    assert f"cannot listen on 127.0.0.1:{port}" in output
