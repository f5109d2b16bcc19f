"""SmtpSender against real SMTP servers on loopback: reuse, reply mapping, timeouts,
verified TLS, no AUTH in cleartext, and PIPELINING where the server offers it (the tests
of a transaction's replies run against a server with and without it)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import re
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from services.core.errors import PermanentDelivery, TransientDelivery
from services.core.settings import Settings
from services.worker.smtp import SmtpSender
from tests.support.proxy import FaultProxy
from tests.support.smtp_sink import ScriptedHandler, SmtpSink, free_port

# tests/support/smtp_sink.py passes aiosmtpd's deprecated ``server_kwargs``

PASSWORD = "s3cret-never-logged"


def sender_settings(port: int, **changes: Any) -> Settings:
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        smtp_host="127.0.0.1",
        smtp_port=port,
        smtp_timeout=changes.pop("smtp_timeout", 5),
        **changes,
    )


def message(to: str = "ann@example.com", body: str = "hello\n") -> bytes:
    msg = EmailMessage()
    msg["From"] = "sender@example.com"
    msg["To"] = to
    msg["Subject"] = "test"
    msg["X-Email-Id"] = "test-id"
    msg.set_content(body)
    return msg.as_bytes()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1: (cert, key) files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "emailsched test")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


@pytest.fixture
def server_context(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certificate)
    return context


@pytest.fixture(params=[False, True], ids=["stepwise", "pipelining"])
def pipelining(request: pytest.FixtureRequest) -> bool:
    """Whether the server offers PIPELINING: the sender then sends MAIL, RCPT and DATA in
    one write, and every reply path must come out the same."""
    return bool(request.param)


@pytest.fixture
def smtp_sink(pipelining: bool) -> Iterator[SmtpSink]:
    with SmtpSink(pipelining=pipelining) as sink:
        yield sink


class Logins:
    """An aiosmtpd authenticator that remembers who logged in."""

    def __init__(self) -> None:
        self.users: list[bytes] = []

    def __call__(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        ok = isinstance(data, LoginPassword) and data.password == PASSWORD.encode()
        if ok:
            self.users.append(data.login)
        return AuthResult(success=ok)


def test_reuses_one_connection(smtp_sink: SmtpSink) -> None:
    sender = SmtpSender(sender_settings(smtp_sink.port))
    try:
        assert sender.send(message(), "sender@example.com", ["ann@example.com"]).code == 250
        first = sender._conn
        sender.send(message(), "sender@example.com", ["ann@example.com"])
        assert sender._conn is first
    finally:
        sender.close()
    assert len(smtp_sink.received) == 2


def test_a_begun_message_is_accepted_only_at_its_final_dot(smtp_sink: SmtpSink) -> None:
    """``begin`` sends everything but the final ".": the server has the body and has
    accepted nothing; ``abort`` drops the connection, which discards it; ``finish`` gets
    it accepted, dot-stuffed lines intact."""
    sender = SmtpSender(sender_settings(smtp_sink.port))
    try:
        sender.begin(message(body="thrown away\n"), "sender@example.com", ["ann@example.com"])
        assert sender.begun
        with pytest.raises(RuntimeError, match="already begun"):
            sender.begin(message(), "sender@example.com", ["ann@example.com"])
        time.sleep(0.2)  # the server has read the body by now
        assert smtp_sink.handler.transactions == 0
        sender.abort()
        assert not sender.begun
        with pytest.raises(RuntimeError, match="no SMTP transaction"):
            sender.finish()

        dots = message(body=".\n..two\n.\n").replace(b"\n", b"\r\n")  # on the wire: CRLF
        sender.begin(dots, "sender@example.com", ["ann@example.com"])
        assert sender._conn is not None
        assert sender._conn.sock is not None
        assert sender._conn.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert sender.finish().code == 250
    finally:
        sender.close()
    time.sleep(0.2)
    [received] = smtp_sink.received
    assert received.message.get_payload() == ".\r\n..two\r\n.\r\n"
    assert smtp_sink.handler.transactions == 1


def test_permanent_reply_keeps_code_and_text(smtp_sink: SmtpSink) -> None:
    smtp_sink.script("ann@example.com", "550 5.1.1 no such user")
    sender = SmtpSender(sender_settings(smtp_sink.port))
    try:
        with pytest.raises(PermanentDelivery) as failure:
            sender.send(message(), "sender@example.com", ["ann@example.com"])
        assert failure.value.smtp_code == 550
        assert "no such user" in str(failure.value)
        # the session was reset, not dropped: the next message goes through
        sender.send(message(), "sender@example.com", ["ann@example.com"])
    finally:
        sender.close()
    assert smtp_sink.handler.transactions == 2
    assert len(smtp_sink.received) == 1


@pytest.mark.parametrize("reply", ["451 4.3.0 try later", "421 4.3.2 shutting down"])
def test_transient_replies_and_disconnects_then_recovery(smtp_sink: SmtpSink, reply: str) -> None:
    smtp_sink.script("ann@example.com", reply)
    sender = SmtpSender(sender_settings(smtp_sink.port))
    try:
        with pytest.raises(TransientDelivery) as failure:
            sender.send(message(), "sender@example.com", ["ann@example.com"])
        assert failure.value.smtp_code == int(reply[:3])
        sender.send(message(), "sender@example.com", ["ann@example.com"])
    finally:
        sender.close()
    assert len(smtp_sink.received) == 1


def test_idle_connection_is_probed_and_replaced(smtp_sink: SmtpSink) -> None:
    sender = SmtpSender(sender_settings(smtp_sink.port), idle_probe_seconds=0)
    try:
        sender.send(message(), "sender@example.com", ["ann@example.com"])
        assert sender._conn is not None
        sender._conn.sock.close()  # the server (or a NAT box) dropped the idle connection
        sender.send(message(), "sender@example.com", ["ann@example.com"])
    finally:
        sender.close()
    assert len(smtp_sink.received) == 2


class RefusingHandler(ScriptedHandler):
    """Refuses the sender ``blocked@...`` and the recipients ``nobody@...`` (550), and
    answers 421 - closing - to the recipient ``closing@...``."""

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: Any
    ) -> str:
        if address.startswith("blocked"):
            return "550 5.7.1 sender rejected"
        return await super().handle_MAIL(server, session, envelope, address, options)

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: Any
    ) -> str:
        if address.startswith("nobody"):
            return "550 5.1.1 unknown recipient"
        if address.startswith("closing"):
            assert server.transport is not None
            server.transport.close()
            return "421 4.3.2 closing"  # never reaches the client: the transport is gone
        envelope.rcpt_tos.append(address)
        return "250 OK"


@pytest.fixture
def refusing(pipelining: bool) -> Iterator[tuple[RefusingHandler, SmtpSender]]:
    """A ``RefusingHandler`` server, and a sender to it (closed afterwards)."""
    handler = RefusingHandler(pipelining=pipelining)
    controller = Controller(handler, hostname="127.0.0.1", port=free_port())
    controller.start()
    sender = SmtpSender(sender_settings(controller.port))
    try:
        yield handler, sender
    finally:
        sender.close()
        controller.stop()


def test_some_recipients_refused_is_sent_and_reported(
    refusing: tuple[RefusingHandler, SmtpSender],
) -> None:
    handler, sender = refusing
    result = sender.send(message(), "sender@example.com", ["ann@example.com", "nobody@example.com"])
    assert result.code == 250
    assert list(result.refused) == ["nobody@example.com"]
    assert result.refused["nobody@example.com"].startswith("550")
    with pytest.raises(PermanentDelivery) as failure:
        sender.send(message(), "sender@example.com", ["nobody@example.com"])
    assert failure.value.smtp_code == 550
    connection = sender._conn
    assert sender.send(message(), "sender@example.com", ["ann@example.com"]).code == 250
    assert sender._conn is connection  # reset, not dropped: replies still in step
    assert [r.rcpt_tos for r in handler.received] == [("ann@example.com",)] * 2


def test_a_refused_sender_is_permanent_and_the_session_goes_on(
    refusing: tuple[RefusingHandler, SmtpSender],
) -> None:
    handler, sender = refusing
    with pytest.raises(PermanentDelivery, match="sender rejected") as failure:
        sender.send(message(), "blocked@example.com", ["ann@example.com"])
    assert failure.value.smtp_code == 550
    connection = sender._conn
    assert sender.send(message(), "sender@example.com", ["ann@example.com"]).code == 250
    assert sender._conn is connection
    assert [r.mail_from for r in handler.received] == ["sender@example.com"]


def test_a_server_closing_at_a_recipient_is_transient_then_reconnected(
    refusing: tuple[RefusingHandler, SmtpSender],
) -> None:
    handler, sender = refusing
    with pytest.raises(TransientDelivery):
        sender.send(message(), "sender@example.com", ["ann@example.com", "closing@x.org"])
    assert sender.send(message(), "sender@example.com", ["ann@example.com"]).code == 250
    assert [r.rcpt_tos for r in handler.received] == [("ann@example.com",)]


@pytest.mark.parametrize("offered", [True, False])
def test_the_envelope_goes_in_one_write_to_a_server_that_offers_pipelining(
    offered: bool,
) -> None:
    """MAIL, both RCPTs and DATA arrive in one read (the client sent them before any
    reply) - and never so to a server that does not offer PIPELINING."""
    recipients = ["ann@example.com", "bob@example.com"]
    with SmtpSink(pipelining=offered) as sink, FaultProxy(sink.port) as proxy:
        proxy.client_chunks = chunks = []
        sender = SmtpSender(sender_settings(proxy.port))
        try:
            for _ in range(2):
                assert sender.send(message(), "sender@example.com", recipients).code == 250
        finally:
            sender.close()
        assert [r.rcpt_tos for r in sink.received] == [tuple(recipients)] * 2
    one_write = re.compile(
        rb"MAIL FROM:<sender@example\.com> size=\d+\r\n"
        rb"RCPT TO:<ann@example\.com>\r\nRCPT TO:<bob@example\.com>\r\nDATA\r\n"
    )
    envelopes = [chunk for chunk in chunks if one_write.fullmatch(chunk)]
    assert len(envelopes) == (2 if offered else 0), chunks
    if not offered:
        assert not [c for c in chunks if b"MAIL FROM" in c and b"RCPT TO" in c], chunks


def test_server_down_is_transient_without_fd_leak() -> None:
    sender = SmtpSender(sender_settings(free_port()))
    before = open_fds()
    for _ in range(20):
        with pytest.raises(TransientDelivery):
            sender.send(message(), "sender@example.com", ["ann@example.com"])
    sender.close()
    assert open_fds() == before


@pytest.fixture
def silent_server() -> Iterator[int]:
    """Accepts TCP (the kernel's backlog does) and never says a word."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield listener.getsockname()[1]


def test_silent_server_times_out_without_fd_leak(silent_server: int) -> None:
    sender = SmtpSender(sender_settings(silent_server, smtp_timeout=0.5))
    before = open_fds()
    started = time.monotonic()
    for _ in range(3):
        with pytest.raises(TransientDelivery):
            sender.send(message(), "sender@example.com", ["ann@example.com"])
    assert time.monotonic() - started < 3 * 0.5 + 1.5
    sender.close()
    assert open_fds() == before


def test_slow_final_reply_after_data_times_out(smtp_sink: SmtpSink) -> None:
    smtp_sink.script("ann@example.com", "slow:3 250 OK")
    sender = SmtpSender(sender_settings(smtp_sink.port, smtp_timeout=0.5))
    started = time.monotonic()
    try:
        with pytest.raises(TransientDelivery):
            sender.send(message(), "sender@example.com", ["ann@example.com"])
    finally:
        sender.close()
    assert time.monotonic() - started < 2.5


def test_tls_sender_against_plain_server_is_transient(smtp_sink: SmtpSink) -> None:
    settings = sender_settings(
        smtp_sink.port, smtp_security="tls", smtp_username="user", smtp_password=PASSWORD
    )
    sender = SmtpSender(settings)
    with pytest.raises(TransientDelivery):
        sender.send(message(), "sender@example.com", ["ann@example.com"])
    sender.close()
    assert smtp_sink.handler.transactions == 0


def test_implicit_tls_self_signed_refused_then_trusted_with_ca_file(
    server_context: ssl.SSLContext, certificate: tuple[Path, Path]
) -> None:
    logins = Logins()
    handler = ScriptedHandler()
    controller = Controller(
        handler,
        hostname="127.0.0.1",
        port=free_port(),
        ssl_context=server_context,
        authenticator=logins,
        auth_require_tls=False,  # the transport is TLS already; aiosmtpd cannot tell
    )
    controller.start()
    try:
        untrusted = SmtpSender(
            sender_settings(
                controller.port, smtp_security="tls", smtp_username="user", smtp_password=PASSWORD
            )
        )
        with pytest.raises(TransientDelivery, match="CERTIFICATE_VERIFY_FAILED"):
            untrusted.send(message(), "sender@example.com", ["ann@example.com"])
        untrusted.close()
        assert handler.transactions == 0
        assert logins.users == []

        trusted = SmtpSender(
            sender_settings(
                controller.port,
                smtp_security="tls",
                smtp_ca_file=str(certificate[0]),
                smtp_username="user",
                smtp_password=PASSWORD,
            )
        )
        trusted.send(message(), "sender@example.com", ["ann@example.com"])
        trusted.close()
    finally:
        controller.stop()
    assert len(handler.received) == 1
    assert logins.users == [b"user"]


def test_starttls_self_signed_refused_then_auth_inside_tls(
    server_context: ssl.SSLContext, certificate: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    logins = Logins()
    with SmtpSink(tls_context=server_context, authenticator=logins) as sink:
        untrusted = SmtpSender(
            sender_settings(
                sink.port, smtp_security="starttls", smtp_username="user", smtp_password=PASSWORD
            )
        )
        with pytest.raises(TransientDelivery, match="CERTIFICATE_VERIFY_FAILED"):
            untrusted.send(message(), "sender@example.com", ["ann@example.com"])
        untrusted.close()
        assert sink.handler.transactions == 0

        trusted = SmtpSender(
            sender_settings(
                sink.port,
                smtp_security="starttls",
                smtp_ca_file=str(certificate[0]),
                smtp_username="user",
                smtp_password=PASSWORD,
            )
        )
        trusted.send(message(), "sender@example.com", ["ann@example.com"])
        trusted.close()
        assert len(sink.received) == 1
    assert logins.users == [b"user"]
    assert PASSWORD not in caplog.text


class LineServer:
    """A minimal SMTP server on a plain socket: records every byte and answers each line
    by its command word from ``replies`` ("250 OK" for any other), however the lines
    arrive; it hangs up at a line starting with ``hangup_on``, and after QUIT."""

    def __init__(
        self, greeting: bytes, replies: dict[bytes, bytes], hangup_on: bytes | None = None
    ) -> None:
        self.greeting, self.replies, self.hangup_on = greeting, replies, hangup_on
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.received = b""
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            conn.settimeout(5)
            conn.sendall(self.greeting)
            pending = b""
            while data := conn.recv(4096):
                self.received += data
                pending += data
                while b"\r\n" in pending:
                    line, pending = pending.split(b"\r\n", 1)
                    if self.hangup_on and line.upper().startswith(self.hangup_on):
                        return
                    word = line.split(b" ")[0].split(b":")[0].upper()
                    conn.sendall(self.replies.get(word, b"250 OK\r\n"))
                    if word == b"QUIT":
                        return

    def close(self) -> None:
        self._thread.join(5)
        self.listener.close()


class RecordingServer(LineServer):
    """Offers AUTH in cleartext."""

    def __init__(self, hangup_on: bytes | None = None) -> None:
        replies = {b"EHLO": b"250-plain\r\n250 AUTH PLAIN LOGIN\r\n", b"QUIT": b"221 bye\r\n"}
        super().__init__(b"220 plain ESMTP\r\n", replies, hangup_on)


def test_never_auth_in_cleartext(caplog: pytest.LogCaptureFixture) -> None:
    server = RecordingServer()
    sender = SmtpSender(sender_settings(server.port, smtp_username="user", smtp_password=PASSWORD))
    try:
        with pytest.raises(TransientDelivery, match="cleartext"):
            sender.send(message(), "sender@example.com", ["ann@example.com"])
    finally:
        sender.close()
        server.close()
    assert b"EHLO" in server.received.upper()
    assert b"AUTH" not in server.received.upper()
    assert b"MAIL FROM" not in server.received.upper()
    assert "refusing to send SMTP AUTH credentials in cleartext" in caplog.text
    assert PASSWORD not in caplog.text


def test_server_hanging_up_at_data_is_transient() -> None:
    server = RecordingServer(hangup_on=b"DATA")
    sender = SmtpSender(sender_settings(server.port))
    before = open_fds()
    try:
        with pytest.raises(TransientDelivery, match="SMTPServerDisconnected"):
            sender.send(message(), "sender@example.com", ["ann@example.com"])
    finally:
        sender.close()
        server.close()
    assert b"RCPT TO" in server.received.upper()
    assert open_fds() <= before


@pytest.mark.parametrize("offered", [True, False])
def test_an_smtputf8_message_goes_only_to_a_server_that_offers_it(
    offered: bool, pipelining: bool
) -> None:
    handler = ScriptedHandler(pipelining=pipelining)
    controller = Controller(
        handler, hostname="127.0.0.1", port=free_port(), enable_SMTPUTF8=offered
    )
    controller.start()
    sender = SmtpSender(sender_settings(controller.port))
    data = "From: a@example.com\r\nTo: jörg@example.com\r\nSubject: hi\r\n\r\nhallo\r\n"
    try:
        if offered:
            result = sender.send(
                data.encode(), "a@example.com", ["jörg@example.com"], smtputf8=True
            )
            assert result.code == 250
        else:
            with pytest.raises(PermanentDelivery, match="SMTPUTF8"):
                sender.send(data.encode(), "a@example.com", ["jörg@example.com"], smtputf8=True)
    finally:
        sender.close()
        controller.stop()
    assert [r.rcpt_tos for r in handler.received] == ([("jörg@example.com",)] if offered else [])


class LenientServer(LineServer):
    """Offers PIPELINING, refuses every recipient (550) and yet answers DATA with 354 - as
    RFC 2920 allows - then refuses the lone "." a client must send (554)."""

    def __init__(self) -> None:
        replies = {
            b"EHLO": b"250-lenient\r\n250 PIPELINING\r\n",
            b"RCPT": b"550 5.1.1 unknown\r\n",
            b"DATA": b"354 go ahead\r\n",
            b".": b"554 5.5.1 no valid recipients\r\n",
            b"QUIT": b"221 bye\r\n",
        }
        super().__init__(b"220 lenient ESMTP\r\n", replies)


def test_a_data_taken_with_every_recipient_refused_is_ended_with_a_lone_dot() -> None:
    server = LenientServer()
    sender = SmtpSender(sender_settings(server.port))
    try:
        with pytest.raises(PermanentDelivery, match="unknown") as failure:
            sender.send(message(), "sender@example.com", ["nobody@example.com"])
        assert failure.value.smtp_code == 550
    finally:
        sender.close()
        server.close()
    # the envelope in one write, then the dot alone - never the message - and a reset
    assert b"RCPT TO:<nobody@example.com>\r\nDATA\r\n.\r\nrset\r\n" in server.received
    assert b"X-Email-Id" not in server.received
