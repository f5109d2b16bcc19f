"""Build the RFC 5322 message for one email row, and the SMTP envelope that goes with it.

The API validates every field, but this is the last place before bytes leave the
machine, and Python 3.11.7's email package lacks the fixes for CVE-2023-27043 and
CVE-2024-6923: so addresses are parsed again with email-validator (never
``email.utils.parseaddr``) and any CR, LF or NUL in a header value is refused here too.
A refusal is a ``PermanentDelivery``: retrying cannot make the row valid.

Bcc recipients go into the envelope only, never into a header. ``Message-ID`` comes from
the row, so every retry (and the one documented duplicate) carries the same one.
"""

from __future__ import annotations

import functools
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from email import policy
from email.charset import QP, Charset
from email.header import Header
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import formataddr
from typing import NamedTuple

from email_validator import EmailNotValidError, validate_email

from services.core.addresses import plain_address
from services.core.delivery import Delivery
from services.core.errors import PermanentDelivery
from services.core.settings import Settings

ADDRESS_CACHE_SIZE = 4096  # parsed addresses kept per worker process
_FORBIDDEN_CHARS = re.compile(r"[\r\n\x00]")
_HEADER_NAME = re.compile(r"^[!-9;-~]{1,76}$")  # printable ASCII without ':' (RFC 5322 2.2)

# Headers this module writes itself (or that describe the MIME structure it builds):
# a custom header must not replace or duplicate them.
OWNED_HEADERS = frozenset(
    name.lower()
    for name in (
        "From",
        "Sender",
        "To",
        "Cc",
        "Bcc",
        "Reply-To",
        "Subject",
        "Date",
        "Message-ID",
        "X-Email-Id",
        "MIME-Version",
        "Content-Type",
        "Content-Transfer-Encoding",
        "Content-Disposition",
        "Return-Path",
        "Received",
        "Resent-From",
        "Resent-To",
        "Resent-Cc",
        "Resent-Bcc",
        "Resent-Date",
        "Resent-Message-ID",
        "Resent-Sender",
    )
)


class Composed(NamedTuple):
    data: bytes  # the message as it goes over the wire, CRLF line ends
    envelope_from: str
    recipients: list[str]
    smtputf8: bool  # an address has a non-ASCII local part: needs the SMTPUTF8 extension


def build_message(row: Delivery, settings: Settings, *, now: datetime | None = None) -> Composed:
    """The message, the envelope sender and every envelope recipient (to, cc and bcc)."""
    sender = _address(row.from_addr or settings.mail_from, "from")
    to = [_address(value, "to") for value in row.to_addrs]
    cc = [_address(value, "cc") for value in row.cc_addrs]
    bcc = [_address(value, "bcc") for value in row.bcc_addrs]
    if not to:
        raise PermanentDelivery("email has no 'to' recipient")
    reply_to = _address(row.reply_to, "reply_to") if row.reply_to else None
    headers: list[tuple[str, str]] = [
        ("Subject", _clean(row.subject, "subject")),
        ("Date", date_header(now or datetime.now(UTC))),
        ("Message-ID", _clean(row.message_id, "message_id")),
        ("X-Email-Id", _clean(row.id, "id")),
    ]
    for name, value in (row.headers or {}).items():
        headers.append(_custom_header(name, value))
    if row.text_body is None and row.html_body is None:
        raise PermanentDelivery("email has neither a text nor an html body")

    recipients = _unique(addr.addr_spec for addr in (*to, *cc, *bcc))
    message = _Message(sender, to, cc, reply_to, headers, row.text_body, row.html_body)
    everyone = (sender, *to, *cc, *bcc, *([reply_to] if reply_to else []))
    if all(addr.username.isascii() for addr in everyone):
        return Composed(_render(message), sender.addr_spec, recipients, smtputf8=False)
    return Composed(_render_international(message), sender.addr_spec, recipients, smtputf8=True)


_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def date_header(moment: datetime) -> str:
    """RFC 5322 date-time in UTC, as ``email.utils.format_datetime`` writes it (which
    goes through a time tuple and cost ~3 % of a worker's CPU per email)."""
    t = moment.astimezone(UTC)
    return (
        f"{_DAYS[t.weekday()]}, {t.day:02d} {_MONTHS[t.month - 1]} {t.year:04d}"
        f" {t.hour:02d}:{t.minute:02d}:{t.second:02d} +0000"
    )


@dataclass(frozen=True, slots=True)
class _Message:
    sender: Address
    to: list[Address]
    cc: list[Address]
    reply_to: Address | None
    headers: list[tuple[str, str]]  # Subject, Date, Message-ID, X-Email-Id, custom ones
    text: str | None
    html: str | None


# --- the usual case: every address ASCII on the wire --------------------------------------
#
# Written directly with the email package's encoders (RFC 2047 encoded words, quoted-
# printable bodies) rather than through ``EmailMessage``: its header registry parses every
# header it is given back into a syntax tree, which cost ~2 ms of the worker's ~5 ms per
# email. tests/unit/test_worker_compose.py parses the result back with ``policy.default``.

_LINE = 78  # RFC 5322 2.1.1: lines SHOULD be at most 78 characters
_UTF8_QP = Charset("utf-8")
_UTF8_QP.body_encoding = QP
_ENCODED_WORD = "=?"
_PRINTABLE = re.compile(r"[\t -~]*")  # (Header drops other controls Python calls spaces)


def _render(m: _Message) -> bytes:
    lines = [_address_header("From", [m.sender]), _address_header("To", m.to)]
    if m.cc:
        lines.append(_address_header("Cc", m.cc))
    if m.reply_to is not None:
        lines.append(_address_header("Reply-To", [m.reply_to]))
    lines += [_text_header(name, value) for name, value in m.headers]
    lines.append("MIME-Version: 1.0")
    if m.text is not None and m.html is not None:
        parts = [_part("plain", m.text), _part("html", m.html)]
        boundary = _boundary(parts)
        lines.append(f'Content-Type: multipart/alternative; boundary="{boundary}"')
        lines.append("")
        for part in parts:
            lines += [f"--{boundary}", part]
        lines += [f"--{boundary}--", ""]
    else:
        lines.append(_part("plain", m.text) if m.text is not None else _part("html", m.html or ""))
    return "\r\n".join(lines).encode("ascii")


def _address_header(name: str, addresses: list[Address]) -> str:
    """``Name: a, b, ...`` folded between addresses; display names RFC 2047-encoded."""
    line = f"{name}:"
    lines: list[str] = []
    for index, addr in enumerate(addresses):
        item = formataddr((addr.display_name, addr.addr_spec), charset="utf-8")
        if "\n" in item:  # a long encoded display name came back folded
            item = " ".join(piece.strip() for piece in item.splitlines())
        item += "," if index < len(addresses) - 1 else ""
        if len(line) + 1 + len(item) > _LINE and line != f"{name}:":
            lines.append(line)
            line = ""
        line += " " + item
    lines.append(line)
    return "\r\n".join(lines)


def _text_header(name: str, value: str) -> str:
    """ASCII stays as it is (folded at spaces); anything else, or a word too long to fold,
    or text that would read as an encoded word, becomes UTF-8 encoded words."""
    plain = value.isascii() and _ENCODED_WORD not in value
    if plain and len(name) + 2 + len(value) <= _LINE and _PRINTABLE.fullmatch(value):
        return f"{name}: {value}"  # fits one line: what Header would give, without it
    if plain and all(len(word) < _LINE - len(name) - 2 for word in value.split(" ")):
        folded = Header(value, "us-ascii", header_name=name).encode(linesep="\r\n")
    else:
        folded = Header(value, "utf-8", header_name=name).encode(linesep="\r\n")
    return f"{name}: {folded}"


def _part(subtype: str, body: str) -> str:
    """Content headers and body of one text part: 7bit when it is ASCII with lines a
    server must accept (RFC 5321: 998 octets), else quoted-printable UTF-8."""
    lines = body.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if body.isascii() and all(len(line) <= 998 for line in lines):
        encoding, payload = "7bit", "\r\n".join(lines)
    else:
        encoding = "quoted-printable"
        payload = _UTF8_QP.body_encode("\n".join(lines)).replace("\n", "\r\n")
    if not payload.endswith("\r\n"):
        payload += "\r\n"
    return (
        f'Content-Type: text/{subtype}; charset="utf-8"\r\n'
        f"Content-Transfer-Encoding: {encoding}\r\n\r\n{payload}"
    )


def _boundary(parts: list[str]) -> str:
    while True:
        boundary = f"=_{secrets.token_hex(16)}"
        if not any(boundary in part for part in parts):
            return boundary


# --- an address with a non-ASCII local part: SMTPUTF8, through EmailMessage ------------------


def _render_international(m: _Message) -> bytes:
    message = EmailMessage(policy=policy.SMTPUTF8)
    message["From"] = m.sender
    message["To"] = m.to
    if m.cc:
        message["Cc"] = m.cc
    if m.reply_to is not None:
        message["Reply-To"] = m.reply_to
    for name, value in m.headers:
        message[name] = value
    if m.text is not None and m.html is not None:
        message.set_content(m.text)
        message.add_alternative(m.html, subtype="html")
    elif m.text is not None:
        message.set_content(m.text)
    else:
        message.set_content(m.html or "", subtype="html")
    return message.as_bytes(policy=policy.SMTPUTF8)


def _clean(value: str, field: str) -> str:
    if _FORBIDDEN_CHARS.search(value):
        raise PermanentDelivery(f"{field} contains CR, LF or NUL")
    return value


def _address(value: str, field: str) -> Address:
    """One address as an ``Address``; the domain in its ASCII (IDNA) form for the wire."""
    _clean(value, field)
    try:
        return _parsed_address(value)
    except EmailNotValidError as exc:
        raise PermanentDelivery(f"invalid {field} address: {exc}") from exc


@functools.lru_cache(maxsize=ADDRESS_CACHE_SIZE)
def _parsed_address(value: str) -> Address:
    """email-validator takes 30-100 us an address (a plain one, ``plain_address``, is
    taken apart in about 2); a sender's From repeats on every email. (``Address`` is
    immutable; a refused address raises and is not kept.)"""
    plain = plain_address(value)
    if plain is not None:
        return Address(username=plain[0], domain=plain[1])
    valid = validate_email(value, check_deliverability=False, allow_display_name=True)
    return Address(
        display_name=valid.display_name or "",
        username=valid.local_part,
        domain=valid.ascii_domain,
    )


def _custom_header(name: str, value: str) -> tuple[str, str]:
    if not _HEADER_NAME.match(name):
        raise PermanentDelivery(f"invalid header name {name!r}")
    if name.lower() in OWNED_HEADERS:
        raise PermanentDelivery(f"header {name} is set by the scheduler, not by the request")
    return name, _clean(value, f"header {name}")


def _unique(addresses: Iterable[str]) -> list[str]:
    """Each envelope recipient once (case-insensitively), in order of appearance."""
    seen: set[str] = set()
    result: list[str] = []
    for address in addresses:
        if address.lower() not in seen:
            seen.add(address.lower())
            result.append(address)
    return result
