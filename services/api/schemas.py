"""The JSON that crosses the API edge, validated before anything touches the database.

Python 3.11.7's ``email`` package does not reject header injection (CVE-2024-6923) or
ambiguous addresses (CVE-2023-27043), and the worker builds headers from what is stored
here. So every string that ends up in a header is refused here, before any parsing, when
it holds a control or line-breaking character; addresses go through email-validator and
are stored in one normalized form the worker can parse again.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from operator import methodcaller
from typing import Annotated, Any, Literal, Self

from email_validator import EmailNotValidError, validate_email
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    field_validator,
    model_validator,
)
from sqlalchemy.engine import Row

from services.core.addresses import MAX_LOCAL_PART_OCTETS, is_plain_address
from services.core.emails import NewEmail

MAX_RECIPIENTS = 50
ADDRESS_CACHE_SIZE = 4096  # normalized addresses kept per process
MAX_BATCH = 1000
MAX_ADDRESS_CHARS = 998  # the width of the from/reply_to columns, and a header line
MAX_HEADERS = 50
MAX_HEADER_NAME_CHARS = 76
MAX_HEADER_VALUE_CHARS = 998
MAX_METADATA_KEYS = 50
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_STRING_CHARS = 512
EARLIEST_SEND_AT = datetime(1970, 1, 1, tzinfo=UTC)
LATEST_SEND_AT = datetime(9999, 1, 1, tzinfo=UTC)

# Headers the system writes itself; a request may not set or duplicate them.
OWNED_HEADERS = frozenset(
    name.lower()
    for name in (
        "From",
        "To",
        "Cc",
        "Bcc",
        "Subject",
        "Message-ID",
        "Date",
        "Reply-To",
        "Sender",
        "Return-Path",
        "X-Email-Id",
        "MIME-Version",
        "Content-Type",
        "Content-Transfer-Encoding",
        "Received",
        "DKIM-Signature",
    )
)

# C0/C1 controls, DEL, and the Unicode line breaks that ``str.splitlines`` (and so parts
# of ``email``) honour; the second pattern lets a tab through.
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_CONTROLS_BUT_TAB = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")

Status = Literal["pending", "queued", "sending", "sent", "failed", "cancelled"]


def refuse_controls(value: str, *, allow_tab: bool = False) -> str:
    """Refuse C0/C1 controls, DEL and Unicode line breaks: the header-injection toolkit."""
    found = (_CONTROLS_BUT_TAB if allow_tab else _CONTROLS).search(value)
    if found:
        raise ValueError(f"control character U+{ord(found.group()):04X} is not allowed here")
    return value


def _quote_display_name(name: str) -> str:
    """A display name as an RFC 5322 phrase: bare when it is plain atoms, else quoted."""
    plain = name == " ".join(name.split())
    if plain and all(c.isascii() and (c.isalnum() or c in " !#$%&'*+-/=?^_`{|}~") for c in name):
        return name
    escaped = name.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


@functools.lru_cache(maxsize=ADDRESS_CACHE_SIZE)
def normalize_address(value: str) -> str:
    """``addr`` or ``Display Name <addr>``, checked by email-validator, normalized.

    The result is parsed again and must come back identical, so what the worker parses
    later is exactly what was validated here. It depends on nothing but ``value``, so
    the answers for recent addresses are kept: a sender's ``from`` repeats in every email
    of a batch. email-validator takes 20-100 us per address; a plain one
    (``is_plain_address``) is taken as it is, in about 2. A refused address raises and is
    not kept.
    """
    refuse_controls(value)
    if len(value) > MAX_ADDRESS_CHARS:
        raise ValueError(f"address longer than {MAX_ADDRESS_CHARS} characters")
    if is_plain_address(value):
        return value
    return validated_address(value)


def validated_address(value: str) -> str:
    """``normalize_address`` by email-validator alone."""
    try:
        parsed = validate_email(value, check_deliverability=False, allow_display_name=True)
    except EmailNotValidError as exc:
        raise ValueError(f"invalid email address: {exc}") from None
    if len(parsed.local_part.encode()) > MAX_LOCAL_PART_OCTETS:
        raise ValueError(f"the part before the @ is longer than {MAX_LOCAL_PART_OCTETS} octets")
    if not parsed.display_name:
        return parsed.normalized
    result = f"{_quote_display_name(parsed.display_name)} <{parsed.normalized}>"
    again = validate_email(result, check_deliverability=False, allow_display_name=True)
    if again.normalized != parsed.normalized or len(result) > MAX_ADDRESS_CHARS:
        raise ValueError("display name cannot be represented safely")
    return result


def _require_text(value: object) -> object:
    """Datetimes arrive as ISO 8601 text only (no Unix numbers, whose zone is a guess)."""
    if not isinstance(value, str | datetime):
        raise ValueError("expected an ISO 8601 date-time with a UTC offset")
    return value


def _to_utc(value: datetime) -> datetime:
    try:
        utc = value.astimezone(UTC)
    except OverflowError:
        raise ValueError("send_at is out of range") from None
    if not EARLIEST_SEND_AT <= utc < LATEST_SEND_AT:
        raise ValueError("send_at must be between 1970 and 9999")
    return utc


Address = Annotated[str, AfterValidator(normalize_address)]
SendAt = Annotated[AwareDatetime, BeforeValidator(_require_text), AfterValidator(_to_utc)]
# The one way the API writes a time: ISO 8601 in UTC with a ``Z`` (pydantic writes a UTC
# datetime so, in C; converting on the way in costs less than a Python serializer).
UTCTime = Annotated[datetime, AfterValidator(methodcaller("astimezone", UTC))]
MetadataValue = (
    StrictBool
    | StrictInt
    | StrictFloat
    | Annotated[str, Field(max_length=MAX_METADATA_STRING_CHARS)]
    | None
)

_EMPTY_LIST: Any = Field(default_factory=list, json_schema_extra={"default": []})
_EMPTY_DICT: Any = Field(default_factory=dict, json_schema_extra={"default": {}})


class EmailRequest(BaseModel):
    """One email to schedule. Unknown fields are refused so that typos do not vanish."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    to: Annotated[list[Address], Field(min_length=1, max_length=MAX_RECIPIENTS)]
    # Empty defaults come from factories: pydantic deep-copies a literal [] or {} default
    # for every request (a tenth of validating one); the schema still shows them.
    cc: Annotated[list[Address], Field(max_length=MAX_RECIPIENTS), _EMPTY_LIST]
    bcc: Annotated[list[Address], Field(max_length=MAX_RECIPIENTS), _EMPTY_LIST]
    from_: Annotated[Address | None, Field(alias="from")] = None
    reply_to: Address | None = None
    subject: Annotated[
        str,
        Field(min_length=1, max_length=998),
        AfterValidator(lambda v: refuse_controls(v, allow_tab=True)),
    ]
    text: str | None = None
    html: str | None = None
    send_at: SendAt | None = None
    headers: Annotated[dict[str, str], _EMPTY_DICT]
    metadata: Annotated[dict[str, MetadataValue], _EMPTY_DICT]

    @field_validator("text", "html")
    @classmethod
    def _no_nul(cls, value: str | None) -> str | None:
        if value is not None and "\x00" in value:
            raise ValueError("NUL is not allowed in a message body")
        return value

    @field_validator("headers")
    @classmethod
    def _check_headers(cls, headers: dict[str, str]) -> dict[str, str]:
        if len(headers) > MAX_HEADERS:
            raise ValueError(f"at most {MAX_HEADERS} headers")
        seen: set[str] = set()
        for name, value in headers.items():
            if not 1 <= len(name) <= MAX_HEADER_NAME_CHARS or not all(
                33 <= ord(c) <= 126 and c != ":" for c in name
            ):
                raise ValueError(
                    f"header name {name!r} must be 1..{MAX_HEADER_NAME_CHARS} printable "
                    "ASCII characters without ':' or spaces"
                )
            lowered = name.lower()
            if lowered in OWNED_HEADERS:
                raise ValueError(f"header {name!r} is set by the scheduler itself")
            if lowered in seen:
                raise ValueError(f"header {name!r} is given twice")
            seen.add(lowered)
            if len(value) > MAX_HEADER_VALUE_CHARS:
                raise ValueError(f"header {name!r} is longer than {MAX_HEADER_VALUE_CHARS}")
            refuse_controls(value, allow_tab=True)
        return headers

    @field_validator("metadata")
    @classmethod
    def _check_metadata(cls, metadata: dict[str, Any]) -> dict[str, Any]:
        if len(metadata) > MAX_METADATA_KEYS:
            raise ValueError(f"at most {MAX_METADATA_KEYS} metadata keys")
        for key in metadata:
            if not 1 <= len(key) <= MAX_METADATA_KEY_CHARS:
                raise ValueError(f"metadata keys are 1..{MAX_METADATA_KEY_CHARS} characters")
            refuse_controls(key)
        return metadata

    @model_validator(mode="after")
    def _has_body(self) -> Self:
        if not self.text and not self.html:
            raise ValueError("give at least one of text and html")
        return self

    def to_new_email(self, default_from: str) -> NewEmail:
        """The core's view of this request; ``default_from`` is the normalized MAIL_FROM."""
        return NewEmail(
            to=list(self.to),
            cc=list(self.cc),
            bcc=list(self.bcc),
            from_addr=self.from_ or default_from,
            reply_to=self.reply_to,
            subject=self.subject,
            text=self.text,
            html=self.html,
            send_at=self.send_at,
            headers=dict(self.headers),
            metadata=dict(self.metadata),
        )


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    emails: Annotated[list[EmailRequest], Field(min_length=1, max_length=MAX_BATCH)]


class RescheduleRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    send_at: SendAt


class EmailOut(BaseModel):
    model_config = ConfigDict(validate_by_name=True, validate_by_alias=True)

    id: str
    status: Status
    to: list[str]
    cc: list[str]
    bcc: list[str]
    from_: Annotated[str, Field(alias="from")]
    subject: str
    send_at: UTCTime
    created_at: UTCTime
    updated_at: UTCTime
    sent_at: UTCTime | None
    attempts: int
    last_error: str | None
    message_id: str
    metadata: dict[str, Any]

    @classmethod
    def from_row(cls, row: Row[Any] | Mapping[str, Any]) -> EmailOut:
        """From an ``emails`` row read back, or from its columns as just written."""
        m = row._mapping if isinstance(row, Row) else row
        return cls(
            id=m["id"],
            status=m["status"],
            to=m["to_addrs"],
            cc=m["cc_addrs"],
            bcc=m["bcc_addrs"],
            from_=m["from_addr"],
            subject=m["subject"],
            send_at=m["send_at"],
            created_at=m["created_at"],
            updated_at=m["updated_at"],
            sent_at=m["sent_at"],
            attempts=m["attempts"],
            last_error=m["last_error"],
            message_id=m["message_id"],
            metadata=m["metadata"],
        )


class EmailPage(BaseModel):
    items: list[EmailOut]
    next_cursor: str | None


class EmailBatch(BaseModel):
    items: list[EmailOut]


class AttemptOut(BaseModel):
    number: int
    started_at: UTCTime
    finished_at: UTCTime
    outcome: Literal["sent", "transient_error", "permanent_error"]
    smtp_code: int | None
    error: str | None

    @classmethod
    def from_row(cls, row: Row[Any]) -> AttemptOut:
        return cls(
            number=row.number,
            started_at=row.started_at,
            finished_at=row.finished_at,
            outcome=row.outcome,
            smtp_code=row.smtp_code,
            error=row.error,
        )


class AttemptList(BaseModel):
    items: list[AttemptOut]


class ErrorOut(BaseModel):
    detail: str


class HealthOut(BaseModel):
    status: Literal["ok", "unavailable"]
