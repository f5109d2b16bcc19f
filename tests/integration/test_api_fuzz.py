"""A property-based run of the OpenAPI schema (schemathesis) against the app on the real
database: whatever a client sends, valid or not, no 5xx, and every answer is one the
schema declares (status code, content type, headers, body).

Each operation gets ``FUZZ_EXAMPLES`` cases (default 20) of valid data and as many of
invalid data, derandomized, so the whole run stays well under a minute;
``FUZZ_EXAMPLES=500`` explores further. (schemathesis' own pytest loader does not run
under pytest 9, so the test drives its Hypothesis strategies directly.)
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from pydantic import SecretStr
from schemathesis import GenerationMode
from schemathesis import checks as st
from sqlalchemy.engine import Engine

from services.api.app import create_app
from services.core.settings import Settings
from tests.conftest import API_KEY

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "20"))
AUTH = {"Authorization": f"Bearer {API_KEY}"}
CHECKS = [
    st.not_a_server_error,
    st.status_code_conformance,
    st.content_type_conformance,
    st.response_headers_conformance,
    st.response_schema_conformance,
]
OPERATIONS = [
    ("POST", "/v1/emails"),
    ("POST", "/v1/emails/batch"),
    ("GET", "/v1/emails"),
    ("GET", "/v1/emails/{email_id}"),
    ("PATCH", "/v1/emails/{email_id}"),
    ("POST", "/v1/emails/{email_id}/cancel"),
    ("GET", "/v1/emails/{email_id}/attempts"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
]


@pytest.fixture
def api_app(settings: Settings, db: Engine) -> Iterator[FastAPI]:
    app = create_app(settings)
    with TestClient(app):  # runs the lifespan once, like a served app
        yield app


def test_every_operation_is_in_the_list(api_app: FastAPI) -> None:
    schema = schemathesis.openapi.from_asgi("/openapi.json", api_app)
    found = {
        (result.ok().method.upper(), result.ok().path) for result in schema.get_all_operations()
    }
    assert found == set(OPERATIONS)


CASES = [(method, path, GenerationMode.POSITIVE) for method, path in OPERATIONS] + [
    # invalid data: the probes take none, and a free-form path id has no invalid form
    (method, path, GenerationMode.NEGATIVE)
    for method, path in OPERATIONS
    if path.startswith("/v1/")
]


@pytest.mark.parametrize(("method", "path", "mode"), CASES)
def test_no_5xx_and_every_answer_conforms(
    api_app: FastAPI, method: str, path: str, mode: GenerationMode
) -> None:
    schema = schemathesis.openapi.from_asgi("/openapi.json", api_app)
    operation = schema[path][method]
    seen: dict[int, int] = {}
    fixed = {"email_id": "no-such-email"} if mode is GenerationMode.NEGATIVE else None

    @given(case=operation.as_strategy(generation_mode=mode, path_parameters=fixed))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Any) -> None:
        response = case.call_and_validate(headers=AUTH, checks=CHECKS)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1

    run()
    assert seen, "no case ran"
    assert all(code < 500 for code in seen), seen


def _checked(app: FastAPI, method: str, path: str, *, down: bool = False, **case: Any) -> int:
    """One hand-made case, sent and held to the same checks as the generated ones (but a
    deliberate 503 while the database is ``down``)."""
    operation = schemathesis.openapi.from_asgi("/openapi.json", app)[path][method]
    headers = case.pop("headers", AUTH)
    checks = CHECKS[1:] if down else CHECKS
    response = operation.Case(headers=headers, **case).call_and_validate(checks=checks)
    return int(response.status_code)


def test_every_error_answer_is_declared(api_app: FastAPI, db: Engine) -> None:
    """The answers random data rarely reaches: each one must match its declaration."""
    body = {"to": ["a@example.com"], "subject": "Hi", "text": "x"}
    keyed = {**AUTH, "Idempotency-Key": "fuzz-1"}
    assert _checked(api_app, "POST", "/v1/emails", body=body, headers={}) == 401
    assert _checked(api_app, "POST", "/v1/emails", body=body, headers=keyed) == 201
    assert _checked(api_app, "POST", "/v1/emails", body=body, headers=keyed) == 200
    other = {**body, "subject": "other"}
    assert _checked(api_app, "POST", "/v1/emails", body=other, headers=keyed) == 422
    batch = {"emails": [body]}
    assert _checked(api_app, "POST", "/v1/emails/batch", body=batch, headers=keyed) == 422
    too_long = {**AUTH, "Idempotency-Key": "k" * 256}
    assert _checked(api_app, "POST", "/v1/emails", body=body, headers=too_long) == 400
    huge = {**body, "text": "x" * 2_000_000}
    assert _checked(api_app, "POST", "/v1/emails", body=huge) == 413
    later = {"send_at": "2031-01-01T00:00:00Z"}
    missing = {"email_id": "no-such-email"}
    one = "/v1/emails/{email_id}"
    assert _checked(api_app, "PATCH", one, path_parameters=missing, body=later) == 404
    assert _checked(api_app, "GET", one, path_parameters=missing) == 404
    assert _checked(api_app, "GET", one + "/attempts", path_parameters=missing) == 404
    created = TestClient(api_app).post("/v1/emails", json=body, headers=AUTH).json()
    with db.begin() as conn:
        conn.execute(
            sa.text("UPDATE emails SET status = 'sent' WHERE id = :id"), {"id": created["id"]}
        )
    mine = {"email_id": created["id"]}
    assert _checked(api_app, "POST", one + "/cancel", path_parameters=mine) == 409
    assert _checked(api_app, "PATCH", one, path_parameters=mine, body=later) == 409


def test_database_down_answers_are_declared(settings: Settings) -> None:
    down = settings.model_copy(
        update={"database_url": SecretStr("mysql+pymysql://root@127.0.0.1:1/emailsched")}
    )
    app = create_app(down)
    body = {"to": ["a@example.com"], "subject": "Hi", "text": "x"}
    some = {"email_id": "some-id"}
    one = "/v1/emails/{email_id}"
    assert _checked(app, "POST", "/v1/emails", body=body, down=True) == 503
    assert _checked(app, "POST", "/v1/emails/batch", body={"emails": [body]}, down=True) == 503
    assert _checked(app, "GET", "/v1/emails", down=True) == 503
    assert _checked(app, "GET", one, path_parameters=some, down=True) == 503
    assert _checked(app, "POST", one + "/cancel", path_parameters=some, down=True) == 503
    assert _checked(app, "GET", "/readyz", down=True) == 503
