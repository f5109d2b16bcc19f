"""Request validation: everything FAULTS.md lists under "API input", without a database."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, get_args

import pytest
from pydantic import TypeAdapter, ValidationError

from services.api.schemas import (
    OWNED_HEADERS,
    AttemptOut,
    BatchRequest,
    EmailRequest,
    RescheduleRequest,
    Status,
    UTCTime,
    normalize_address,
)
from services.core.emails import STATUSES

CONTROLS = ["\r", "\n", "\r\n", "\x00", "\x0b", "\x1b", "\x7f", "\x85", "\u2028"]


def request(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"to": ["a@example.com"], "subject": "Hi", "text": "body"}
    body.update(changes)
    return body


def refused(body: dict[str, Any]) -> list[Any]:
    with pytest.raises(ValidationError) as caught:
        EmailRequest.model_validate_json(_json(body))
    return [error["loc"] for error in caught.value.errors()]


def _json(body: dict[str, Any]) -> str:
    return json.dumps(body)


def test_minimal_request_is_accepted() -> None:
    parsed = EmailRequest.model_validate_json(_json(request()))
    assert parsed.to == ["a@example.com"]
    assert parsed.from_ is None
    assert parsed.send_at is None


def test_full_request_with_from_alias() -> None:
    parsed = EmailRequest.model_validate_json(
        _json(
            request(
                **{"from": "Me <me@example.com>"},
                cc=["c@example.com"],
                bcc=["b@example.com"],
                reply_to="r@example.com",
                html="<p>x</p>",
                send_at="2026-12-01T09:00:00Z",
                headers={"X-Campaign": "spring"},
                metadata={"user_id": "42", "n": 1, "ok": True, "f": 1.5, "none": None},
            )
        )
    )
    assert parsed.from_ == "Me <me@example.com>"
    assert parsed.metadata == {"user_id": "42", "n": 1, "ok": True, "f": 1.5, "none": None}
    email = parsed.to_new_email("default@example.com")
    assert email.from_addr == "Me <me@example.com>"
    assert email.send_at == datetime(2026, 12, 1, 9, tzinfo=UTC)


def test_from_falls_back_to_the_default() -> None:
    parsed = EmailRequest.model_validate_json(_json(request()))
    assert parsed.to_new_email("d@example.com").from_addr == "d@example.com"


@pytest.mark.parametrize("char", CONTROLS)
@pytest.mark.parametrize(
    ("field", "make"),
    [
        ("subject", lambda c: {"subject": f"Hi{c}Bcc: victim@example.com"}),
        ("to", lambda c: {"to": [f"a@example.com{c}"]}),
        ("to", lambda c: {"to": [f"Alice{c}Bcc: v@example.com <a@example.com>"]}),
        ("to", lambda c: {"to": [f'"Alice{c}" <a@example.com>']}),
        ("cc", lambda c: {"cc": [f"c{c}@example.com"]}),
        ("bcc", lambda c: {"bcc": [f"b@exa{c}mple.com"]}),
        ("from", lambda c: {"from": f"Me{c} <me@example.com>"}),
        ("reply_to", lambda c: {"reply_to": f"r@example.com{c}x@example.com"}),
        ("headers", lambda c: {"headers": {"X-Campaign": f"spring{c}Bcc: v@example.com"}}),
        ("headers", lambda c: {"headers": {f"X-Camp{c}aign": "spring"}}),
        ("metadata", lambda c: {"metadata": {f"k{c}": "v"}}),
    ],
)
def test_control_characters_are_refused_everywhere(field: str, make: Any, char: str) -> None:
    locs = refused(request(**make(char)))
    assert any(loc[0] == field for loc in locs), locs


def test_tab_is_allowed_in_header_values_and_subject_only() -> None:
    parsed = EmailRequest.model_validate_json(
        _json(request(subject="a\tb", headers={"X-A": "1\t2"}))
    )
    assert parsed.subject == "a\tb"
    assert refused(request(to=["a\t@example.com"]))


def test_nul_in_a_body_is_refused() -> None:
    assert refused(request(text="a\x00b")) == [("text",)]
    assert refused(request(text=None, html="<p>\x00</p>")) == [("html",)]


def test_lone_dot_lines_in_a_body_are_kept() -> None:
    parsed = EmailRequest.model_validate_json(_json(request(text="a\r\n.\r\nb\n.\n")))
    assert parsed.text == "a\r\n.\r\nb\n.\n"


@pytest.mark.parametrize("name", [*sorted(OWNED_HEADERS), "FROM", "message-id", "x-EMAIL-id"])
def test_owned_headers_are_refused_in_any_case(name: str) -> None:
    assert refused(request(headers={name: "x"})) == [("headers",)]


@pytest.mark.parametrize("name", ["X Campaign", "X:Campaign", "", "X-\u00e9", "x" * 77])
def test_malformed_header_names_are_refused(name: str) -> None:
    assert refused(request(headers={name: "x"})) == [("headers",)]


def test_header_limits() -> None:
    assert refused(request(headers={f"X-H{i}": "v" for i in range(51)})) == [("headers",)]
    assert refused(request(headers={"X-A": "v" * 999})) == [("headers",)]
    assert refused(request(headers={"X-A": "1", "x-a": "2"})) == [("headers",)]
    EmailRequest.model_validate_json(_json(request(headers={"X-A": "v" * 998})))


def test_unknown_fields_are_refused() -> None:
    assert refused(request(tos=["x@example.com"])) == [("tos",)]
    assert refused(request(from_="a@example.com")) == [("from_",)]
    with pytest.raises(ValidationError):
        BatchRequest.model_validate({"emails": [request()], "extra": 1})
    with pytest.raises(ValidationError):
        RescheduleRequest.model_validate({"send_at": "2030-01-01T00:00:00Z", "x": 1})


def test_subject_size() -> None:
    EmailRequest.model_validate_json(_json(request(subject="s" * 998)))
    assert refused(request(subject="s" * 999)) == [("subject",)]
    assert refused(request(subject="")) == [("subject",)]


def test_recipient_counts() -> None:
    many = [f"u{i}@example.com" for i in range(51)]
    assert refused(request(to=[])) == [("to",)]
    assert refused(request(to=many)) == [("to",)]
    assert refused(request(cc=many)) == [("cc",)]
    assert refused(request(bcc=many)) == [("bcc",)]
    EmailRequest.model_validate_json(_json(request(to=many[:50], cc=many[:50], bcc=many[:50])))


def test_a_body_is_required() -> None:
    assert refused(request(text=None)) == [()]
    assert refused(request(text="", html="")) == [()]
    EmailRequest.model_validate_json(_json(request(text=None, html="<p>x</p>")))


@pytest.mark.parametrize(
    "address",
    [
        "alice@example.org)<bob@example.org>",
        "alice@example.org, bob@example.org",
        "Alice <alice@example.org>, bob@example.org",
        "a" * 65 + "@example.com",
        "a@" + ".".join(["b" * 60] * 5) + ".com",
        "not-an-address",
        "a@localhost",
        "a@[127.0.0.1]",
        "",
        "x" * 999 + "@example.com",
    ],
)
def test_bad_addresses_are_refused(address: str) -> None:
    assert refused(request(to=[address])) == [("to", 0)]


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        ("Alice@Example.ORG", "Alice@example.org"),
        ("Alice Smith <alice@example.org>", "Alice Smith <alice@example.org>"),
        ('"Smith, Alice" <alice@example.org>', '"Smith, Alice" <alice@example.org>'),
        ('"Zoë \\"Z\\"" <z@example.org>', '"Zoë \\"Z\\"" <z@example.org>'),
        ("<bare@example.org>", "bare@example.org"),
        ("a" * 64 + "@example.com", "a" * 64 + "@example.com"),
    ],
)
def test_addresses_are_stored_normalized(given: str, stored: str) -> None:
    assert normalize_address(given) == stored
    assert normalize_address(stored) == stored  # what the worker parses again


def test_send_at_must_carry_an_offset() -> None:
    assert refused(request(send_at="2026-12-01T09:00:00")) == [("send_at",)]
    assert refused(request(send_at=1_800_000_000)) == [("send_at",)]
    assert refused(request(send_at="tomorrow")) == [("send_at",)]
    assert refused(request(send_at="9999-12-31T23:00:00-05:00")) == [("send_at",)]


def test_send_at_is_converted_to_utc_and_2040_works() -> None:
    parsed = EmailRequest.model_validate_json(_json(request(send_at="2040-06-01T12:00:00+02:00")))
    assert parsed.send_at == datetime(2040, 6, 1, 10, tzinfo=UTC)
    assert parsed.send_at is not None
    assert parsed.send_at.utcoffset() is not None
    assert TypeAdapter(UTCTime).dump_json(parsed.send_at) == b'"2040-06-01T10:00:00Z"'


def test_reschedule_needs_an_aware_send_at() -> None:
    with pytest.raises(ValidationError):
        RescheduleRequest.model_validate_json('{"send_at": "2030-01-01T00:00:00"}')
    with pytest.raises(ValidationError):
        RescheduleRequest.model_validate_json("{}")


def test_metadata_is_a_bounded_object_of_scalars() -> None:
    assert all(loc[:2] == ("metadata", "a") for loc in refused(request(metadata={"a": {"b": 1}})))
    assert all(loc[:2] == ("metadata", "a") for loc in refused(request(metadata={"a": [1]})))
    assert refused(request(metadata={f"k{i}": i for i in range(51)})) == [("metadata",)]
    assert refused(request(metadata={"k" * 65: 1})) == [("metadata",)]
    assert refused(request(metadata={"": 1})) == [("metadata",)]
    assert all(loc[:2] == ("metadata", "a") for loc in refused(request(metadata={"a": "v" * 513})))
    assert refused(request(metadata="not an object")) == [("metadata",)]


def test_metadata_refuses_nan() -> None:
    with pytest.raises(ValidationError):
        EmailRequest.model_validate_json(
            '{"to": ["a@example.com"], "subject": "s", "text": "t", "metadata": {"a": NaN}}'
        )


def test_batch_size_and_error_index() -> None:
    with pytest.raises(ValidationError):
        BatchRequest.model_validate({"emails": []})
    with pytest.raises(ValidationError):
        BatchRequest.model_validate({"emails": [request()] * 1001})
    with pytest.raises(ValidationError) as caught:
        BatchRequest.model_validate({"emails": [request(), request(), request(subject="")]})
    assert [error["loc"][:2] for error in caught.value.errors()] == [("emails", 2)]


def test_status_filter_matches_the_core_statuses() -> None:
    assert set(get_args(Status)) == set(STATUSES)


def test_times_are_written_in_utc_with_a_z() -> None:
    local = datetime(2030, 1, 1, 1, 30, tzinfo=timezone(timedelta(hours=1, minutes=30)))
    attempt = AttemptOut(
        number=1,
        started_at=local,
        finished_at=datetime(2030, 1, 1, 0, 0, 0, 5, tzinfo=UTC),
        outcome="sent",
        smtp_code=250,
        error=None,
    )
    written = json.loads(attempt.model_dump_json())
    assert written["started_at"] == "2030-01-01T00:00:00Z"
    assert written["finished_at"] == "2030-01-01T00:00:00.000005Z"
