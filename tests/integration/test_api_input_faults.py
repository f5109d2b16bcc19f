"""FAULTS.md "API input", the parts the route-by-route tests (test_api.py,
tests/unit/test_api_schemas.py) leave open: injection attempts checked at the SMTP
server through the real processes, a 10 MB declared body refused before it is sent,
and Idempotency-Keys of two API keys that differ in body as well.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine

from services.api.app import create_app
from services.core.schema import emails
from services.core.settings import Settings
from tests.conftest import API_KEY, OTHER_API_KEY
from tests.e2e.test_pipeline import wait_terminal
from tests.integration.test_api import count, live_server
from tests.support.smtp_sink import SmtpSink
from tests.support.stack import Stack

AUTH = {"Authorization": f"Bearer {API_KEY}"}
OTHER = {"Authorization": f"Bearer {OTHER_API_KEY}"}
VICTIM = "victim@example.net"


def email(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"to": ["rcpt@example.com"], "subject": "Hi", "text": "body"}
    body.update(changes)
    return body


@pytest.fixture
def client(settings: Settings, db: Engine) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


INJECTIONS = [
    email(subject=f"Hi\r\nBcc: {VICTIM}"),
    email(subject=f"Hi\nBcc: {VICTIM}"),
    email(subject=f"Hi\rBcc: {VICTIM}"),
    email(subject=f"Hi\x00Bcc: {VICTIM}"),
    email(subject=f"Hi\u2028Bcc: {VICTIM}"),
    email(subject=f"Hi\x85Bcc: {VICTIM}"),
    email(to=[f"Rcpt\r\nBcc: {VICTIM} <rcpt@example.com>"]),
    email(to=[f'"Rcpt\nBcc: {VICTIM}" <rcpt@example.com>']),
    email(to=[f"rcpt@example.com\r\nBcc: {VICTIM}"]),
    email(to=[f"rcpt@example.com, {VICTIM}"]),
    email(to=[f"rcpt@example.com)<{VICTIM}>"]),
    email(cc=[f"Cc Name\x0b <{VICTIM}>"]),
    email(**{"from": f"Me\r\nBcc: {VICTIM} <me@example.com>"}),
    email(reply_to=f"Reply\r\nBcc: {VICTIM} <r@example.com>"),
    email(reply_to=f"r@example.com\nBcc: {VICTIM}"),
    email(reply_to=f"r@example.com, {VICTIM}"),
    email(headers={"X-Campaign": f"spring\r\nBcc: {VICTIM}"}),
    email(headers={"X-Campaign": f"spring\nBcc: {VICTIM}"}),
    email(headers={"X-Campaign\r\nBcc": VICTIM}),
    email(headers={"Bcc": VICTIM}),
    email(headers={"bcc": VICTIM}),
    email(headers={"Resent-To": "x", "To": VICTIM}),
]


def test_injection_attempts_are_422_and_nothing_reaches_the_smtp_server(
    stack: Stack, smtp_sink: SmtpSink
) -> None:
    """Every attempt is refused; the one honest email next to them reaches exactly its
    own recipients, and the victim's address appears nowhere at the SMTP server."""
    stack.start_api()
    stack.start("relay")
    stack.start("worker")
    client = stack.client(API_KEY)
    for body in INJECTIONS:
        reply = client.post("/v1/emails", json=body)
        assert reply.status_code == 422, (body, reply.text)
    batch = client.post("/v1/emails/batch", json={"emails": [email(), *INJECTIONS[:3]]})
    assert batch.status_code == 422
    # valid, but close to the edge: quotes, commas, a tab, "Bcc:" as plain subject text
    honest = email(
        to=['"Smith, Rcpt" <rcpt@example.com>'],
        cc=["Cc Person <cc@example.com>"],
        reply_to='"Reply \\"R\\"" <r@example.com>',
        subject=f"Re:\tBcc: {VICTIM}",
        headers={"X-Campaign": f"spring\tBcc: {VICTIM}"},
        text=f"Bcc: {VICTIM}\r\n.\r\nRCPT TO:<{VICTIM}>\r\n",
    )
    created = client.post("/v1/emails", json=honest)
    assert created.status_code == 201, created.text
    final = wait_terminal(client, [created.json()["id"]])
    assert final[created.json()["id"]]["status"] == "sent"
    (received,) = smtp_sink.received
    assert sorted(received.rcpt_tos) == ["cc@example.com", "rcpt@example.com"]
    message = received.message
    header_block = received.raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    starts = [line.split(b":", 1)[0].lower() for line in header_block if line[:1] not in b" \t"]
    assert b"bcc" not in starts, header_block
    assert starts.count(b"to") == starts.count(b"cc") == starts.count(b"reply-to") == 1
    assert message.get_all("Bcc") is None
    assert VICTIM not in received.mail_from
    assert message["Subject"].replace("\t", " ").endswith(f"Bcc: {VICTIM}")
    assert smtp_sink.handler.transactions == 1


def test_declared_10_mb_body_is_refused_before_it_is_sent(settings: Settings, db: Engine) -> None:
    """Content-Length: 10 MB, and not a byte of the body sent: the 413 comes at once."""
    with live_server(settings) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(
                b"POST /v1/emails HTTP/1.1\r\nHost: test\r\n"
                + f"Authorization: Bearer {API_KEY}\r\n".encode()
                + b"Content-Type: application/json\r\n"
                + f"Content-Length: {10 * 1024 * 1024}\r\n\r\n".encode()
            )
            reply = sock.recv(4096)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:100]
    assert b"request body larger than" in reply
    assert count(db, emails) == 0


def test_two_api_keys_with_one_idempotency_key_and_other_bodies(
    client: TestClient, db: Engine
) -> None:
    """The key is scoped to its API key: another API key reusing it with another body
    creates its own email (no 422), and each replays only its own."""
    mine = client.post(
        "/v1/emails", json=email(subject="mine"), headers={**AUTH, "Idempotency-Key": "k"}
    )
    theirs = client.post(
        "/v1/emails", json=email(subject="theirs"), headers={**OTHER, "Idempotency-Key": "k"}
    )
    assert (mine.status_code, theirs.status_code) == (201, 201)
    again_mine = client.post(
        "/v1/emails", json=email(subject="mine"), headers={**AUTH, "Idempotency-Key": "k"}
    )
    again_theirs = client.post(
        "/v1/emails", json=email(subject="theirs"), headers={**OTHER, "Idempotency-Key": "k"}
    )
    assert again_mine.json()["id"] == mine.json()["id"]
    assert again_theirs.json()["id"] == theirs.json()["id"]
    assert again_mine.json()["subject"] == "mine"
    assert (again_mine.status_code, again_theirs.status_code) == (200, 200)
    crossed = client.post(
        "/v1/emails", json=email(subject="theirs"), headers={**AUTH, "Idempotency-Key": "k"}
    )
    assert crossed.status_code == 422  # my key, another body: mine alone decides
