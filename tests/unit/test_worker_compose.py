"""The message the worker builds from an email row: headers, envelope, bodies, refusals."""

from __future__ import annotations

from datetime import UTC, datetime
from email import message_from_bytes, policy
from types import SimpleNamespace
from typing import Any

import pytest

from services.core.errors import PermanentDelivery
from services.core.settings import Settings
from services.worker.compose import build_message

SETTINGS = Settings(_env_file=None, mail_from="fallback@example.com")  # type: ignore[call-arg]
NOW = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)


def row(**changes: Any) -> Any:
    fields: dict[str, Any] = {
        "id": "0190aaaa-0000-7000-8000-000000000001",
        "from_addr": "Sender Name <sender@example.com>",
        "reply_to": "replies@example.com",
        "to_addrs": ["Ann <ann@example.com>", "bob@example.com"],
        "cc_addrs": ["carol@example.com"],
        "bcc_addrs": ["dave@example.com", "ANN@example.com"],
        "subject": "Hello",
        "text_body": "plain body",
        "html_body": None,
        "headers": {"X-Campaign": "spring"},
        "message_id": "<0190aaaa-0000-7000-8000-000000000001@example.com>",
    }
    fields.update(changes)
    return SimpleNamespace(**fields)


def parsed(email_row: Any) -> Any:
    composed = build_message(email_row, SETTINGS, now=NOW)
    return message_from_bytes(composed.message.as_bytes(), policy=policy.default)


def test_headers_and_envelope() -> None:
    composed = build_message(row(), SETTINGS, now=NOW)
    message = message_from_bytes(composed.message.as_bytes(), policy=policy.default)
    assert message["From"] == "Sender Name <sender@example.com>"
    assert message["To"] == "Ann <ann@example.com>, bob@example.com"
    assert message["Cc"] == "carol@example.com"
    assert message["Reply-To"] == "replies@example.com"
    assert message["Subject"] == "Hello"
    assert message["Date"] == "Wed, 02 Jan 2030 03:04:05 +0000"
    assert message["Message-ID"] == "<0190aaaa-0000-7000-8000-000000000001@example.com>"
    assert message["X-Email-Id"] == "0190aaaa-0000-7000-8000-000000000001"
    assert message["X-Campaign"] == "spring"
    assert "Bcc" not in message
    assert b"dave@" not in composed.message.as_bytes()
    assert composed.envelope_from == "sender@example.com"
    # bcc in the envelope only; ANN@ duplicates Ann's address and is sent once
    assert composed.recipients == [
        "ann@example.com",
        "bob@example.com",
        "carol@example.com",
        "dave@example.com",
    ]


def test_text_and_html_make_multipart_alternative() -> None:
    message = parsed(row(html_body="<p>html body</p>"))
    assert message.get_content_type() == "multipart/alternative"
    parts = [part.get_content_type() for part in message.iter_parts()]
    assert parts == ["text/plain", "text/html"]
    assert message.get_body(("html",)).get_content().strip() == "<p>html body</p>"


def test_html_only() -> None:
    message = parsed(row(text_body=None, html_body="<p>only</p>"))
    assert message.get_content_type() == "text/html"


def test_no_body_is_permanent() -> None:
    with pytest.raises(PermanentDelivery):
        build_message(row(text_body=None), SETTINGS)


def test_non_ascii_subject_display_name_and_domain_are_encoded() -> None:
    composed = build_message(
        row(subject="Grüße", to_addrs=['"Jörg Ü" <jorg@bücher.de>'], cc_addrs=[], bcc_addrs=[]),
        SETTINGS,
    )
    raw = composed.message.as_bytes()
    assert raw.isascii()
    message = message_from_bytes(raw, policy=policy.default)
    assert message["Subject"] == "Grüße"
    assert message["To"].addresses[0].display_name == "Jörg Ü"
    assert composed.recipients == ["jorg@xn--bcher-kva.de"]


def test_empty_from_falls_back_to_mail_from() -> None:
    composed = build_message(row(from_addr=""), SETTINGS)
    assert composed.envelope_from == "fallback@example.com"


@pytest.mark.parametrize(
    "changes",
    [
        {"subject": "hi\r\nBcc: evil@example.com"},
        {"subject": "nul\x00"},
        {"to_addrs": ["Ann\r\nBcc: evil@example.com <ann@example.com>"]},
        {"reply_to": "x@example.com\nBcc: evil@example.com"},
        {"headers": {"X-Campaign": "a\r\nBcc: evil@example.com"}},
        {"headers": {"X-Bad Name": "v"}},
        {"headers": {"Bcc": "evil@example.com"}},
        {"headers": {"message-id": "<other@example.com>"}},
        {"to_addrs": ["alice@example.org)<bob@example.org>"]},
        {"to_addrs": []},
        {"message_id": "<x@example.com>\r\nBcc: evil@example.com"},
    ],
)
def test_injection_and_invalid_input_are_refused(changes: dict[str, Any]) -> None:
    with pytest.raises(PermanentDelivery):
        build_message(row(**changes), SETTINGS)


def test_lone_dot_lines_survive_composition() -> None:
    body = "first\n.\n..\n.leading dot\nlast\n"
    message = parsed(row(text_body=body))
    assert message.get_content().replace("\r\n", "\n") == body
