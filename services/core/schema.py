"""The database schema, as SQLAlchemy Core tables. Alembic migrations mirror it.

- ``emails``: one row per email; ``version`` grows with every change that makes older
  broker messages for it obsolete (reschedule, cancel, each delivery claim, each retry).
- ``outbox``: "publish (email_id, version) at fire_at". The relay claims due rows
  through ``due_at``, a generated column that is NULL once a row is published, so the
  index it sits on only holds rows still to publish.
- ``attempts``: every SMTP delivery attempt.
- ``idempotency_keys``: ``Idempotency-Key`` per API key, durable.

All times are UTC in ``DATETIME(6)``: MySQL keeps no zone, so we never store a local one.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Dialect


def db_time(value: datetime | None) -> str | None:
    """A time as bound to ``DATETIME(6)``: the text PyMySQL would send for the naive UTC
    datetime, written by ``datetime.isoformat`` (C) rather than PyMySQL's Python
    formatting. Refuses a naive datetime: its zone would be a guess."""
    if value is None:
        return None
    if value.tzinfo is not UTC:  # (most are UTC already: no conversion, a worker's 2 %)
        if value.tzinfo is None:
            raise ValueError("naive datetime: store UTC with an explicit zone")
        value = value.astimezone(UTC)
    return value.replace(tzinfo=None).isoformat(" ")


def json_text(value: Any) -> str | None:
    """A value as bound to a ``JSONText`` column: compact JSON."""
    if value is None:
        return None
    if not value and isinstance(value, list | dict):  # most cc, bcc, headers, metadata
        return "[]" if isinstance(value, list) else "{}"
    return json.dumps(value, separators=(",", ":"))


class UTCDateTime(sa.TypeDecorator[datetime]):
    """``DATETIME(6)`` holding UTC: refuses naive input, returns aware datetimes."""

    impl = mysql.DATETIME(fsp=6)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> str | None:
        return db_time(value)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


class JSONText(sa.TypeDecorator[Any]):
    """JSON kept as text: identical on MySQL 8 and MariaDB (whose JSON is LONGTEXT)."""

    impl = sa.Text
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> str | None:
        return json_text(value)

    def process_result_value(self, value: str | None, dialect: Dialect) -> Any:
        return None if value is None else json.loads(value)


metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "pk": "pk_%(table_name)s",
    }
)

BODY = mysql.MEDIUMTEXT()

emails = sa.Table(
    "emails",
    metadata,
    sa.Column("id", sa.CHAR(36), primary_key=True),
    sa.Column("owner", sa.CHAR(32), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("send_at", UTCDateTime, nullable=False),
    sa.Column("due_at", UTCDateTime, nullable=False),
    sa.Column("lease_until", UTCDateTime, nullable=True),
    sa.Column("claim_token", sa.CHAR(16), nullable=True),  # which worker's batch holds it
    sa.Column("from_addr", sa.String(998), nullable=False),
    sa.Column("reply_to", sa.String(998), nullable=True),
    sa.Column("to_addrs", JSONText, nullable=False),
    sa.Column("cc_addrs", JSONText, nullable=False),
    sa.Column("bcc_addrs", JSONText, nullable=False),
    sa.Column("subject", sa.String(998), nullable=False),
    sa.Column("text_body", BODY, nullable=True),
    sa.Column("html_body", BODY, nullable=True),
    sa.Column("headers", JSONText, nullable=False),
    sa.Column("metadata", JSONText, nullable=False),
    sa.Column("message_id", sa.String(255), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("last_error", sa.String(2000), nullable=True),
    sa.Column("sent_at", UTCDateTime, nullable=True),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.Index(None, "owner", "id"),
    sa.Index(None, "owner", "status", "id"),
)

outbox = sa.Table(
    "outbox",
    metadata,
    sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
    sa.Column("email_id", sa.CHAR(36), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("fire_at", UTCDateTime, nullable=False),
    sa.Column("available_at", UTCDateTime, nullable=False),
    sa.Column("published_at", UTCDateTime, nullable=True),
    sa.Column("claimed_by", sa.String(64), nullable=True),
    sa.Column("publish_attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("last_error", sa.String(1000), nullable=True),
    sa.Column(
        "due_at",
        UTCDateTime,
        sa.Computed("IF(published_at IS NULL, available_at, NULL)", persisted=True),
    ),
    sa.Index(None, "due_at"),
    sa.Index(None, "email_id"),
    sa.Index(None, "published_at"),
)

attempts = sa.Table(
    "attempts",
    metadata,
    sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
    sa.Column("email_id", sa.CHAR(36), nullable=False),
    sa.Column("number", sa.Integer, nullable=False),
    sa.Column("started_at", UTCDateTime, nullable=False),
    sa.Column("finished_at", UTCDateTime, nullable=False),
    sa.Column("outcome", sa.String(20), nullable=False),
    sa.Column("smtp_code", sa.Integer, nullable=True),
    sa.Column("error", sa.String(2000), nullable=True),
    sa.UniqueConstraint("email_id", "number"),
)

idempotency_keys = sa.Table(
    "idempotency_keys",
    metadata,
    sa.Column("owner", sa.CHAR(32), primary_key=True),
    sa.Column("key_hash", sa.CHAR(64), primary_key=True),
    sa.Column("request_hash", sa.CHAR(64), nullable=False),
    sa.Column("email_ids", JSONText, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Index(None, "created_at"),
)
