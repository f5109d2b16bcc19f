"""Small core pieces that need no services: ids, messages, URL masking, cursors, the
column types' bind values."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta, timezone

import pymysql.converters
import pytest
from sqlalchemy.dialects import mysql

from services.core.emails import decode_cursor, encode_cursor, message_id_for
from services.core.errors import PoisonMessage
from services.core.ids import new_id
from services.core.messages import DeliveryMessage
from services.core.schema import JSONText, UTCDateTime
from services.core.settings import mask_url


def test_ids_are_uuid7_and_strictly_increasing() -> None:
    ids = [new_id() for _ in range(20_000)]  # many fall in one millisecond
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert all(str(uuid.UUID(i)) == i for i in ids)  # the canonical form, lower-case hex
    parsed = uuid.UUID(ids[0])
    assert parsed.version == 7
    assert parsed.variant == uuid.RFC_4122


def test_message_round_trip() -> None:
    message = DeliveryMessage("0190d2a4-0000-7000-8000-000000000001", 3)
    assert DeliveryMessage.decode(message.encode()) == message
    assert message.message_id.endswith(":3")


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"\xff\xfe",
        b"[]",
        b'{"email_id": 5, "version": 1}',
        b'{"email_id": "x", "version": 0}',
        b'{"email_id": "x", "version": true}',
        b'{"email_id": "x"}',
        b'{"email_id": "' + b"x" * 37 + b'", "version": 1}',
        b'{"email_id": "not-a-uuid", "version": 1}',
        b'{"email_id": "\\ud800", "version": 1}',
    ],
)
def test_undecodable_messages_are_poison(body: bytes) -> None:
    with pytest.raises(PoisonMessage):
        DeliveryMessage.decode(body)


def test_mask_url_hides_only_the_password() -> None:
    assert mask_url("amqp://guest:s3cret@host:5672/%2F") == "amqp://guest:***@host:5672/%2F"
    assert mask_url("mysql+pymysql://root@127.0.0.1/db") == "mysql+pymysql://root@127.0.0.1/db"


def test_cursor_round_trip_and_garbage() -> None:
    email_id = new_id()
    assert decode_cursor(encode_cursor(email_id)) == email_id
    for bad in ("!!!", "abc", encode_cursor("short")):
        with pytest.raises(ValueError, match="cursor"):
            decode_cursor(bad)


def test_message_id_uses_the_sender_domain() -> None:
    assert message_id_for("abc", "Ann <ann@example.org>") == "<abc@example.org>"
    assert message_id_for("abc", "") == "<abc@emailsched.invalid>"


@pytest.mark.parametrize(
    "moment",
    [
        datetime(2026, 11, 29, 2, 30, 0, 123456, tzinfo=UTC),
        datetime(2026, 11, 29, 2, 30, 0, tzinfo=UTC),  # no fraction: none written
        datetime(999, 1, 2, 3, 4, 5, 6, tzinfo=UTC),
        datetime(2026, 11, 29, 4, 30, tzinfo=timezone(timedelta(hours=2))),  # stored as UTC
    ],
)
def test_a_time_is_bound_as_the_text_pymysql_would_send(moment: datetime) -> None:
    naive_utc = moment.astimezone(UTC).replace(tzinfo=None)
    bound = UTCDateTime().process_bind_param(moment, mysql.dialect())
    assert f"'{bound}'" == pymysql.converters.escape_datetime(naive_utc)


@pytest.mark.parametrize("value", [[], {}, ["a@example.com"], {"k": [1, None, "é"]}, 0, "", False])
def test_json_columns_are_bound_as_compact_json(value: object) -> None:
    assert JSONText().process_bind_param(value, mysql.dialect()) == json.dumps(
        value, separators=(",", ":")
    )
