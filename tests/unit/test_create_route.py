"""``CreateRoute`` serves only the signature FastAPI documents for it."""

from __future__ import annotations

from typing import Annotated

import pytest
from fastapi import APIRouter, Header, Response

from services.api.create_route import CreateRoute
from services.api.deps import CallerDep, IdempotencyKeyDep
from services.api.schemas import EmailRequest


def test_the_create_signature_is_accepted() -> None:
    router = APIRouter(route_class=CreateRoute)

    @router.post("/ok")
    async def ok(body: EmailRequest, caller: CallerDep, key: IdempotencyKeyDep) -> Response:
        return Response()

    assert isinstance(router.routes[0], CreateRoute)


def test_an_extra_parameter_is_refused_at_start_up() -> None:
    router = APIRouter(route_class=CreateRoute)
    with pytest.raises(TypeError, match="exactly"):

        @router.post("/extra")
        async def extra(
            body: EmailRequest,
            caller: CallerDep,
            key: IdempotencyKeyDep,
            trace: Annotated[str | None, Header()] = None,
        ) -> Response:
            return Response()


def test_a_missing_dependency_is_refused_at_start_up() -> None:
    router = APIRouter(route_class=CreateRoute)
    with pytest.raises(TypeError, match="exactly"):

        @router.post("/no-key")
        async def no_key(body: EmailRequest, caller: CallerDep) -> Response:
            return Response()
