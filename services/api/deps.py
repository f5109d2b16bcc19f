"""What routes receive through ``Depends``: the runtime, the caller's identity, the key.

The owner of an email is a fingerprint of the API key that created it (the first 32 hex
digits of its SHA-256), so keys can be rotated in the settings without a table of users,
and the key itself is never stored or logged.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Annotated, cast

from fastapi import Depends, Header, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.engine import Engine

from services.api.group_commit import GroupCommit
from services.core.fastpath import FastPath
from services.core.settings import Settings

MAX_IDEMPOTENCY_KEY_CHARS = 255


def fingerprint(api_key: str) -> str:
    """The ``owner`` stored with an email: identifies a key without revealing it."""
    return hashlib.sha256(api_key.encode()).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class Runtime:
    """Everything a request needs, built once by ``create_app`` and kept on ``app.state``."""

    settings: Settings
    engine: Engine
    fastpath: FastPath
    key_digests: tuple[bytes, ...]  # SHA-256 of each configured API key
    default_from: str  # normalized MAIL_FROM, "" when unset
    group_commit: GroupCommit  # writes creates without an Idempotency-Key

    def owner_for(self, presented: str) -> str | None:
        """The fingerprint of ``presented`` if it is a configured key, else None.

        Compares digests, so every comparison takes the same time whatever the key's
        length, and goes through every key, so timing does not tell which one matched.
        """
        digest = hashlib.sha256(presented.encode()).digest()
        matched = False
        for known in self.key_digests:
            matched |= hmac.compare_digest(digest, known)
        return digest.hex()[:32] if matched else None


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is asking (the key's fingerprint), with the runtime to serve them from."""

    runtime: Runtime
    owner: str


# The dependencies below are ``async def`` although they never await: FastAPI runs a plain
# ``def`` dependency on the request thread pool (services/api/app.py), where it would
# queue behind requests waiting for MySQL. They only compute. Each one costs every request
# its share of FastAPI's solving (2-4 % of a create's CPU apiece), so a route gets the
# runtime and the owner from one, ``CallerDep``.


async def get_runtime(request: Request) -> Runtime:
    return cast(Runtime, request.app.state.runtime)


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]

bearer = HTTPBearer(auto_error=False, description="One of the API_KEYS")


async def authenticate(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Caller:
    runtime = cast(Runtime, request.app.state.runtime)
    owner = runtime.owner_for(credentials.credentials) if credentials else None
    if owner is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail="missing or invalid API key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return Caller(runtime, owner)


CallerDep = Annotated[Caller, Depends(authenticate)]


async def idempotency_key(
    key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            description="1..255 printable ASCII characters; repeats replay the first result",
        ),
    ] = None,
) -> str | None:
    """The optional ``Idempotency-Key`` header; a malformed one is a 400, not a 422."""
    if key is None:
        return None
    if not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY_CHARS or not all(
        0x20 <= ord(c) <= 0x7E for c in key
    ):
        raise HTTPException(
            status.HTTP_400_BAD_REQUEST,
            detail=f"Idempotency-Key must be 1..{MAX_IDEMPOTENCY_KEY_CHARS} printable "
            "ASCII characters",
        )
    return key


IdempotencyKeyDep = Annotated[str | None, Depends(idempotency_key)]
