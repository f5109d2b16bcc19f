"""A real SMTP server (aiosmtpd) on loopback that records what it receives and answers
from a script, per recipient: ``sink.script("a@example.com", "451 4.3.0 later", "250")``
makes the first DATA for that recipient fail with 451 and the second succeed.
``SmtpSink(pipelining=True)`` offers PIPELINING, as Postfix and the large providers do.

Script entries: an SMTP reply line ("250 OK", "451 ...", "550 ..."), ``"close"`` (drop
the connection after DATA without answering), or ``"slow:<seconds> <reply>"``.

For TLS tests: ``SmtpSink(tls_context=ctx)`` offers STARTTLS, ``SmtpSink(ssl_context=ctx)``
is implicit TLS; ``SmtpSink(authenticator=AuthRecorder(), auth_require_tls=False)``
advertises AUTH even in cleartext and records every AUTH the server saw, with or
without TLS under it (``AuthRecorder.attempts``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import email
import socket
import threading
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import Message
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, Session


@dataclass(frozen=True)
class Received:
    email_id: str | None
    message_id: str | None
    arrived_at: datetime  # the end of DATA: the final "." read
    mail_at: datetime  # the MAIL command: the start of the transaction
    mail_from: str
    rcpt_tos: tuple[str, ...]
    raw: bytes

    @property
    def message(self) -> Message:
        return email.message_from_bytes(self.raw)


class ScriptedHandler:
    def __init__(self, *, pipelining: bool = False) -> None:
        self.pipelining = pipelining  # offer PIPELINING (RFC 2920) in the EHLO reply
        self.received: list[Received] = []
        self.transactions = 0  # DATA commands seen, accepted or not
        self._scripts: dict[str, list[str]] = defaultdict(list)
        self._lock = threading.Lock()

    def script(self, recipient: str, *replies: str) -> None:
        with self._lock:
            self._scripts[recipient.lower()].extend(replies)

    def _next_reply(self, recipients: list[str]) -> str:
        with self._lock:
            for rcpt in recipients:
                queue = self._scripts.get(rcpt.lower())
                if queue:
                    return queue.pop(0)
        return "250 2.0.0 OK"

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname  # this hook's duty (aiosmtpd)
        if self.pipelining:  # aiosmtpd reads commands one by one: pipelined ones are fine
            responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        envelope.mail_at = datetime.now(UTC)  # type: ignore[attr-defined]
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.transactions += 1
        reply = self._next_reply(envelope.rcpt_tos)
        if reply.startswith("slow:"):
            delay, _, reply = reply[5:].partition(" ")
            await asyncio.sleep(float(delay))
            reply = reply or "250 2.0.0 OK"
        if reply == "close":
            assert server.transport is not None
            server.transport.close()
            return "421 closing"  # never reaches the client: the transport is gone
        if reply.startswith("250"):
            raw = envelope.original_content or b""
            parsed = email.message_from_bytes(raw)
            with self._lock:
                self.received.append(
                    Received(
                        email_id=parsed.get("X-Email-Id"),
                        message_id=parsed.get("Message-ID"),
                        arrived_at=datetime.now(UTC),
                        mail_at=envelope.mail_at,  # type: ignore[attr-defined]
                        mail_from=envelope.mail_from or "",
                        rcpt_tos=tuple(envelope.rcpt_tos),
                        raw=raw,
                    )
                )
        return reply


@dataclass(frozen=True)
class AuthAttempt:
    mechanism: str
    login: str
    tls: bool  # was the session encrypted (STARTTLS done, or implicit TLS) at AUTH time


class AuthRecorder:
    """An aiosmtpd ``authenticator`` that accepts every login and records it."""

    def __init__(self) -> None:
        self.attempts: list[AuthAttempt] = []
        self._lock = threading.Lock()

    def __call__(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        transport = server.transport
        tls = session.ssl is not None or (
            transport is not None and transport.get_extra_info("ssl_object") is not None
        )
        login = getattr(auth_data, "login", b"")
        text = login.decode("utf-8", "replace") if isinstance(login, bytes) else str(login)
        with self._lock:
            self.attempts.append(AuthAttempt(mechanism, text, tls))
        return AuthResult(success=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class SmtpSink:
    """Owns the aiosmtpd controller thread; ``with SmtpSink() as sink: ...``."""

    def __init__(
        self, port: int | None = None, *, pipelining: bool = False, **smtp_kwargs: Any
    ) -> None:
        self.handler = ScriptedHandler(pipelining=pipelining)
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self._controller = Controller(
            self.handler, hostname=self.host, port=self.port, **smtp_kwargs
        )

    def __enter__(self) -> SmtpSink:
        self._controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._controller.stop()

    @property
    def native_thread_id(self) -> int:
        """The OS id of the thread serving SMTP (the bench reads its CPU time)."""
        found: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._controller.loop.call_soon_threadsafe(
            lambda: found.set_result(threading.get_native_id())
        )
        return found.result(timeout=5)

    @property
    def received(self) -> list[Received]:
        return list(self.handler.received)

    def script(self, recipient: str, *replies: str) -> None:
        self.handler.script(recipient, *replies)

    def by_email_id(self) -> dict[str, list[Received]]:
        result: dict[str, list[Received]] = defaultdict(list)
        for item in self.received:
            result[item.email_id or ""].append(item)
        return dict(result)
