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

import re
from collections.abc import Iterable
from datetime import UTC, datetime
from email import policy
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime
from typing import Any, NamedTuple

from email_validator import EmailNotValidError, validate_email
from sqlalchemy.engine import Row

from services.core.errors import PermanentDelivery
from services.core.settings import Settings

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
    message: EmailMessage
    envelope_from: str
    recipients: list[str]


def build_message(row: Row[Any], settings: Settings, *, now: datetime | None = None) -> Composed:
    """The message, the envelope sender and every envelope recipient (to, cc and bcc)."""
    sender = _address(row.from_addr or settings.mail_from, "from")
    to = [_address(value, "to") for value in row.to_addrs]
    cc = [_address(value, "cc") for value in row.cc_addrs]
    bcc = [_address(value, "bcc") for value in row.bcc_addrs]
    if not to:
        raise PermanentDelivery("email has no 'to' recipient")

    message = EmailMessage(policy=policy.SMTP)
    message["From"] = sender
    message["To"] = to
    if cc:
        message["Cc"] = cc
    if row.reply_to:
        message["Reply-To"] = _address(row.reply_to, "reply_to")
    message["Subject"] = _clean(row.subject, "subject")
    message["Date"] = format_datetime(now or datetime.now(UTC))
    message["Message-ID"] = _clean(row.message_id, "message_id")
    message["X-Email-Id"] = _clean(row.id, "id")
    for name, value in (row.headers or {}).items():
        _add_custom_header(message, name, value)
    _set_body(message, row.text_body, row.html_body)

    recipients = _unique(addr.addr_spec for addr in (*to, *cc, *bcc))
    return Composed(message, sender.addr_spec, recipients)


def _clean(value: str, field: str) -> str:
    if _FORBIDDEN_CHARS.search(value):
        raise PermanentDelivery(f"{field} contains CR, LF or NUL")
    return value


def _address(value: str, field: str) -> Address:
    """One address as an ``Address``; the domain in its ASCII (IDNA) form for the wire."""
    _clean(value, field)
    try:
        valid = validate_email(value, check_deliverability=False, allow_display_name=True)
    except EmailNotValidError as exc:
        raise PermanentDelivery(f"invalid {field} address: {exc}") from exc
    return Address(
        display_name=valid.display_name or "",
        username=valid.local_part,
        domain=valid.ascii_domain,
    )


def _add_custom_header(message: EmailMessage, name: str, value: str) -> None:
    if not _HEADER_NAME.match(name):
        raise PermanentDelivery(f"invalid header name {name!r}")
    if name.lower() in OWNED_HEADERS:
        raise PermanentDelivery(f"header {name} is set by the scheduler, not by the request")
    message[name] = _clean(value, f"header {name}")


def _set_body(message: EmailMessage, text: str | None, html: str | None) -> None:
    """Text, HTML, or both as multipart/alternative (plain first: least preferred)."""
    if text is not None and html is not None:
        message.set_content(text)
        message.add_alternative(html, subtype="html")
    elif text is not None:
        message.set_content(text)
    elif html is not None:
        message.set_content(html, subtype="html")
    else:
        raise PermanentDelivery("email has neither a text nor an html body")


def _unique(addresses: Iterable[str]) -> list[str]:
    """Each envelope recipient once (case-insensitively), in order of appearance."""
    seen: set[str] = set()
    result: list[str] = []
    for address in addresses:
        if address.lower() not in seen:
            seen.add(address.lower())
            result.append(address)
    return result
