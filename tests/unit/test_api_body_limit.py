"""The body limit at the ASGI level: how much of a body is pulled before the 413."""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.types import Message, Receive, Scope, Send

from services.api.body_limit import BodyLimit

LIMIT = 1024 * 1024
CHUNK = 64 * 1024


class Client:
    """Offers a body in chunks and records what comes back."""

    def __init__(self, total: int, *, content_length: bool) -> None:
        self.total = total
        self.pulled = 0
        self.sent: list[Message] = []
        headers = [(b"content-type", b"application/json")]
        if content_length:
            headers.append((b"content-length", str(total).encode()))
        self.scope: Scope = {"type": "http", "method": "POST", "path": "/", "headers": headers}

    async def receive(self) -> Message:
        size = min(CHUNK, self.total - self.pulled)
        self.pulled += size
        return {"type": "http.request", "body": b"x" * size, "more_body": self.pulled < self.total}

    async def send(self, message: Message) -> None:
        self.sent.append(message)

    @property
    def status(self) -> Any:
        return self.sent[0]["status"]


async def reading_app(scope: Scope, receive: Receive, send: Send) -> None:
    """Reads the whole body like FastAPI does, then answers 200 (or 400 on disconnect)."""
    status = 200
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            status = 400
            break
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": b""})


def run(client: Client) -> None:
    asyncio.run(BodyLimit(reading_app, LIMIT)(client.scope, client.receive, client.send))


def test_declared_length_over_the_limit_is_refused_unread() -> None:
    client = Client(10 * LIMIT, content_length=True)
    run(client)
    assert client.status == 413
    assert client.pulled == 0


def test_chunked_body_is_cut_off_just_past_the_limit() -> None:
    client = Client(10 * LIMIT, content_length=False)
    run(client)
    assert client.status == 413
    assert client.pulled <= LIMIT + CHUNK
    assert [m["type"] for m in client.sent] == ["http.response.start", "http.response.body"]


def test_body_at_the_limit_passes() -> None:
    for content_length in (True, False):
        client = Client(LIMIT, content_length=content_length)
        run(client)
        assert client.status == 200
        assert client.pulled == LIMIT


def test_other_scopes_pass_through() -> None:
    seen: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["type"])

    async def nothing() -> Message:
        return {}

    async def ignore(message: Message) -> None:
        return None

    asyncio.run(BodyLimit(app, LIMIT)({"type": "lifespan"}, nothing, ignore))
    assert seen == ["lifespan"]
