"""The message the worker builds from an email row: headers, envelope, bodies, refusals."""

from __future__ import annotations

import smtplib
from datetime import UTC, datetime, timedelta
from email import message_from_bytes, message_from_string, policy
from email.errors import HeaderParseError
from email.header import Header
from email.utils import format_datetime, formataddr
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from services.api.schemas import normalize_address
from services.core.errors import PermanentDelivery
from services.core.settings import Settings
from services.worker.compose import _text_header, build_message, date_header

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
    return message_from_bytes(composed.data, policy=policy.default)


def test_headers_and_envelope() -> None:
    composed = build_message(row(), SETTINGS, now=NOW)
    message = message_from_bytes(composed.data, policy=policy.default)
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
    assert b"dave@" not in composed.data
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
    raw = composed.data
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


# --- the wire format, checked by parsing it back --------------------------------------------

# What the API lets through to a header value: any text without CR, LF or NUL (the API
# refuses other control characters too).
HEADER_TEXT = st.text(
    st.characters(blacklist_categories=("Cc", "Cs")) | st.sampled_from(" \t"), max_size=300
)
BODY_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=3000)


def as_stored(address: str) -> str | None:
    """The address as the API stores it; None: refused (a tab in a display name, say)."""
    try:
        return normalize_address(address)
    except ValueError:
        return None


def wire(email_row: Any) -> tuple[bytes, Any]:
    data = build_message(email_row, SETTINGS, now=NOW).data
    return data, message_from_bytes(data, policy=policy.default)


def assert_wire_format(data: bytes) -> None:
    assert data.isascii()
    lines = data.split(b"\r\n")
    assert b"\n" not in b"".join(lines)  # CRLF line ends only
    assert b"\r" not in b"".join(lines)
    assert all(len(line) <= 998 for line in lines)


@settings(max_examples=300, deadline=None)
@given(subject=HEADER_TEXT, campaign=HEADER_TEXT)
def test_any_subject_and_header_value_survive_the_wire(subject: str, campaign: str) -> None:
    data, message = wire(row(subject=subject, headers={"X-Campaign": campaign}))
    assert_wire_format(data)
    # Folding whitespace is not content (RFC 5322 2.2.3): compare with runs of it as one.
    assert " ".join(message["Subject"].split()) == " ".join(subject.split())
    assert " ".join(message["X-Campaign"].split()) == " ".join(campaign.split())


@settings(max_examples=1000, deadline=None)
@given(
    name=st.sampled_from(["Subject", "X-Email-Id", "Message-ID", "X-Campaign"]),
    value=st.text(st.characters(min_codepoint=0x00, max_codepoint=0x7E), max_size=70),
)
def test_a_short_ascii_header_is_written_as_the_email_package_would(name: str, value: str) -> None:
    """The one-line shortcut gives what ``Header.encode`` gives for the same text (or
    refuses what it refuses)."""
    assume(len(name) + 2 + len(value) <= 78)
    charset = "utf-8" if "=?" in value else "us-ascii"
    try:
        expected = Header(value, charset, header_name=name).encode(linesep="\r\n")
    except HeaderParseError:
        with pytest.raises(HeaderParseError):
            _text_header(name, value)
    else:
        assert _text_header(name, value) == f"{name}: {expected}"


@settings(max_examples=300, deadline=None)
@given(text=BODY_TEXT, html=st.none() | BODY_TEXT)
def test_any_body_survives_the_wire(text: str, html: str | None) -> None:
    data, message = wire(row(text_body=text, html_body=html))
    assert_wire_format(data)

    def content(part: Any) -> str:
        return str(part.get_content()).replace("\r\n", "\n")

    expected = text.replace("\r\n", "\n").replace("\r", "\n")
    if html is None:
        assert message.get_content_type() == "text/plain"
        assert content(message).rstrip("\n") == expected.rstrip("\n")
    else:
        plain, rich = message.iter_parts()
        assert content(plain).rstrip("\n") == expected.rstrip("\n")
        assert content(rich).rstrip("\n") == html.replace("\r\n", "\n").replace("\r", "\n").rstrip(
            "\n"
        )


@settings(max_examples=200, deadline=None)
@given(names=st.lists(HEADER_TEXT.filter(lambda n: n.strip()), min_size=1, max_size=8))
def test_any_display_names_survive_the_wire(names: list[str]) -> None:
    addresses = [f"u{i}@example.com" for i in range(len(names))]
    stored = [as_stored(formataddr(pair)) for pair in zip(names, addresses, strict=True)]
    assume(None not in stored)  # only what the API accepts reaches the worker
    data, message = wire(
        row(
            to_addrs=stored,
            cc_addrs=[],
            bcc_addrs=[],
        )
    )
    assert_wire_format(data)
    parsed = message["To"].addresses
    assert [a.addr_spec for a in parsed] == addresses
    assert [" ".join(a.display_name.split()) for a in parsed] == [
        " ".join(n.split()) for n in names
    ]


def test_long_words_and_lines_are_encoded_not_cut() -> None:
    subject = "x" * 998  # the API's limit, one word: must be folded as encoded words
    data, message = wire(row(subject=subject, text_body="y" * 5000))
    assert_wire_format(data)
    assert message["Subject"] == subject
    assert message["Content-Transfer-Encoding"] == "quoted-printable"
    assert message.get_content().rstrip("\r\n") == "y" * 5000


def test_ascii_short_lines_go_as_7bit_and_long_recipient_lists_fold() -> None:
    to = [f"User {i} <user{i}@example.com>" for i in range(40)]
    data, message = wire(row(to_addrs=to, cc_addrs=[], bcc_addrs=[]))
    assert message["Content-Transfer-Encoding"] == "7bit"
    assert [str(a) for a in message["To"].addresses] == to
    to_lines = data.split(b"\r\n\r\n")[0].split(b"\r\nSubject:")[0]
    assert all(len(line) <= 78 for line in to_lines.split(b"\r\n"))


def test_a_non_ascii_local_part_needs_smtputf8() -> None:
    composed = build_message(
        row(to_addrs=['"Jörg" <jörg@example.com>'], cc_addrs=[], bcc_addrs=[]), SETTINGS, now=NOW
    )
    assert composed.smtputf8
    assert composed.recipients == ["jörg@example.com"]
    message = message_from_string(composed.data.decode("utf-8"), policy=policy.SMTPUTF8)
    assert message["To"].addresses[0].addr_spec == "jörg@example.com"
    assert not build_message(row(), SETTINGS).smtputf8


@given(moment=st.datetimes(timezones=st.timezones()))
@settings(max_examples=500, deadline=None)
def test_the_date_header_is_what_the_email_package_writes(moment: datetime) -> None:
    assume(datetime.min.replace(tzinfo=UTC) + timedelta(days=2) < moment.astimezone(UTC))
    assert date_header(moment) == format_datetime(moment.astimezone(UTC))


@pytest.mark.parametrize(
    "address",
    [
        "plain@example.com",
        "first.last+tag@mail.example.co.uk",
        "o'brien@example.org",
        '"Ünïcode Name" <jörg@example.com>',
        "user@bücher.example",
        "weird!#$%&'*+/=?^_`{|}~-chars@example.com",
    ],
)
def test_an_envelope_address_goes_between_angle_brackets_as_it_stands(address: str) -> None:
    """The worker writes ``MAIL FROM:<...>`` and ``RCPT TO:<...>`` without smtplib's
    quoteaddr: for what compose puts in the envelope, that gives the same."""
    stored = normalize_address(address)  # as the API stores it
    composed = build_message(row(from_addr=stored, to_addrs=[stored]), SETTINGS, now=NOW)
    for envelope in (composed.envelope_from, *composed.recipients):
        assert smtplib.quoteaddr(envelope) == f"<{envelope}>"
        assert not any(char in envelope for char in '<> \r\n"()')
