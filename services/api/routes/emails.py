"""``/v1/emails``: schedule, read, list, cancel and reschedule the caller's emails.

Every route is scoped to the caller's API key: another key's email is a 404, exactly
as if it did not exist.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Query, Response, status
from fastapi.exceptions import RequestValidationError

from services.api import scheduling
from services.api.create_route import CreateRoute
from services.api.deps import CallerDep, IdempotencyKeyDep, Runtime
from services.api.idempotency import Outcome, Scope
from services.api.schemas import (
    AttemptList,
    AttemptOut,
    BatchRequest,
    EmailBatch,
    EmailOut,
    EmailPage,
    EmailRequest,
    ErrorOut,
    RescheduleRequest,
    Status,
)
from services.core import emails
from services.core.emails import NewEmail

REPLAYED_HEADER = "Idempotent-Replayed"

_ERROR = {"model": ErrorOut}
_RETRY_AFTER = {
    "Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "string"}}
}
# A 422 is either FastAPI's list of field errors or, for an Idempotency-Key reused with
# another body, a single message.
_UNPROCESSABLE: dict[str, Any] = {
    "description": "invalid request, or an Idempotency-Key reused with another body",
    "content": {
        "application/json": {
            "schema": {
                "anyOf": [
                    {"$ref": "#/components/schemas/HTTPValidationError"},
                    {"$ref": "#/components/schemas/ErrorOut"},
                ]
            }
        }
    },
}

_ROUTER: dict[str, Any] = dict(
    prefix="/v1/emails",
    tags=["emails"],
    responses={
        401: {
            **_ERROR,
            "description": "missing or invalid API key",
            "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}},
        },
        413: {**_ERROR, "description": "request body larger than MAX_REQUEST_BYTES"},
        503: {
            **_ERROR,
            "description": "database unavailable; retry after Retry-After seconds",
            "headers": _RETRY_AFTER,
        },
    },
)

router = APIRouter(**_ROUTER)
# The two creates: served by CreateRoute (services/api/create_route.py), documented alike.
creates = APIRouter(**_ROUTER, route_class=CreateRoute)

_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {**_ERROR, "description": "no such email for this API key"}
}
_CONFLICT: dict[int | str, dict[str, Any]] = {
    409: {**_ERROR, "description": "the email's status forbids this"}
}
_REPLAY: dict[str, Any] = {
    "description": "replay of an earlier request with the same Idempotency-Key",
    "headers": {REPLAYED_HEADER: {"schema": {"type": "string", "enum": ["true"]}}},
}
_CREATE: dict[int | str, dict[str, Any]] = {
    400: {**_ERROR, "description": "malformed Idempotency-Key"},
    409: {**_ERROR, "description": "the first request with this Idempotency-Key is in flight"},
    422: _UNPROCESSABLE,
}


def _new_emails(
    runtime: Runtime,
    requests: Sequence[EmailRequest],
    loc: Callable[[int], tuple[str | int, ...]],
) -> list[NewEmail]:
    """The requests as core emails; one without ``from`` needs MAIL_FROM configured.

    ``loc`` names the n-th request in a 422, the way FastAPI names its own errors.
    """
    errors = [
        {
            "type": "missing",
            "loc": (*loc(index), "from"),
            "msg": "Field required (no MAIL_FROM is configured)",
            "input": None,
        }
        for index, request in enumerate(requests)
        if request.from_ is None and not runtime.default_from
    ]
    if errors:
        raise RequestValidationError(errors)
    return [request.to_new_email(runtime.default_from) for request in requests]


def _scope(
    owner: str, key: str | None, route: str, body: EmailRequest | BatchRequest
) -> Scope | None:
    if key is None:
        return None
    return Scope.of(owner, key, route, body.model_dump(mode="json", by_alias=True))


def _answer(outcome: Outcome, body: EmailOut | EmailBatch) -> Response:
    """201 with the created email(s), or 200 and ``Idempotent-Replayed`` for a replay.

    Rendered here by pydantic's serializer, as FastAPI would render the route's
    ``response_model``, without FastAPI validating the model again on the way out (7 %
    of a create's Python time).
    """
    return Response(
        body.model_dump_json(by_alias=True),
        status_code=status.HTTP_200_OK if outcome.replayed else status.HTTP_201_CREATED,
        headers={REPLAYED_HEADER: "true"} if outcome.replayed else None,
        media_type="application/json",
    )


@creates.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=EmailOut,
    responses={200: {**_REPLAY, "model": EmailOut}, **_CREATE},
)
async def create_email(body: EmailRequest, caller: CallerDep, key: IdempotencyKeyDep) -> Response:
    """Schedule one email. 201 once committed (email and outbox row together)."""
    runtime, owner = caller.runtime, caller.owner
    items = _new_emails(runtime, [body], lambda _: ("body",))
    outcome = await scheduling.schedule(runtime, owner, items, _scope(owner, key, "single", body))
    return _answer(outcome, EmailOut.from_row(outcome.rows[0]))


@creates.post(
    "/batch",
    status_code=status.HTTP_201_CREATED,
    response_model=EmailBatch,
    responses={200: {**_REPLAY, "model": EmailBatch}, **_CREATE},
)
async def create_batch(body: BatchRequest, caller: CallerDep, key: IdempotencyKeyDep) -> Response:
    """Schedule 1..1000 emails in one transaction: all of them, in order, or none."""
    runtime, owner = caller.runtime, caller.owner
    items = _new_emails(runtime, body.emails, lambda index: ("body", "emails", index))
    outcome = await scheduling.schedule(runtime, owner, items, _scope(owner, key, "batch", body))
    return _answer(outcome, EmailBatch(items=[EmailOut.from_row(row) for row in outcome.rows]))


@router.get("")
def list_emails(
    caller: CallerDep,
    status_: Annotated[Status | None, Query(alias="status")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=100)] = None,
) -> EmailPage:
    """The caller's emails, newest first; follow ``next_cursor`` until it is null."""
    with caller.runtime.engine.connect() as conn:
        try:
            rows, next_cursor = emails.page(
                conn, caller.owner, status=status_, limit=limit, cursor=cursor
            )
        except ValueError:
            raise RequestValidationError(
                [
                    {
                        "type": "value_error",
                        "loc": ("query", "cursor"),
                        "msg": "malformed cursor",
                        "input": cursor,
                    }
                ]
            ) from None
    return EmailPage(items=[EmailOut.from_row(row) for row in rows], next_cursor=next_cursor)


@router.get("/{email_id}", responses=_NOT_FOUND)
def get_email(email_id: str, caller: CallerDep) -> EmailOut:
    with caller.runtime.engine.connect() as conn:
        return EmailOut.from_row(emails.get(conn, caller.owner, email_id))


@router.post("/{email_id}/cancel", responses={**_NOT_FOUND, **_CONFLICT})
def cancel_email(email_id: str, caller: CallerDep) -> EmailOut:
    """Pending or queued -> cancelled; cancelling a cancelled email is a no-op."""
    return EmailOut.from_row(scheduling.cancel(caller.runtime, caller.owner, email_id))


@router.patch("/{email_id}", responses={**_NOT_FOUND, **_CONFLICT})
def reschedule_email(email_id: str, body: RescheduleRequest, caller: CallerDep) -> EmailOut:
    """Move a pending or queued email to a new ``send_at`` (in the past: send now)."""
    return EmailOut.from_row(
        scheduling.reschedule(caller.runtime, caller.owner, email_id, body.send_at)
    )


@router.get("/{email_id}/attempts", responses=_NOT_FOUND)
def list_attempts(email_id: str, caller: CallerDep) -> AttemptList:
    """Every SMTP delivery attempt, oldest first."""
    with caller.runtime.engine.connect() as conn:
        rows = emails.list_attempts(conn, caller.owner, email_id)
    return AttemptList(items=[AttemptOut.from_row(row) for row in rows])
