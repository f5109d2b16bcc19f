"""One reused SMTP connection, and the mapping of everything smtplib raises onto
``TransientDelivery`` (retry later) or ``PermanentDelivery`` (fail now).

A connection per message halves throughput (FIELD-NOTES), so the sender keeps one open:
it reconnects after the server closed it, after a 421, after any error that leaves the
session in doubt, and probes with NOOP when it sat idle (servers drop idle clients
silently). ``settings.smtp_timeout`` is the socket timeout, so it bounds the connect,
the greeting, every command and the final reply after DATA.

A transaction can also be split where the server has not yet accepted anything:
``begin`` sends the envelope and the whole message but the final ``.``, ``finish`` sends
the dot and reads the verdict, ``abort`` closes the connection, which makes the server
throw the unfinished message away. The worker records the previous send while the next
one is begun, and finishes it only after that record is committed. The socket has
``TCP_NODELAY``: the lone dot must not wait for the ACK of the body before it. To a server
that offers PIPELINING (RFC 2920), MAIL, the RCPTs and DATA go in one write: a message is
two round trips (``begin``, ``finish``), not four.

TLS always goes through ``ssl.create_default_context``: smtplib's own default for
``starttls()`` and ``SMTP_SSL`` verifies nothing. AUTH is only ever sent inside TLS;
credentials configured on a cleartext connection are a configuration error, reported
loudly and treated as transient so that nothing is lost while an operator fixes it.
Problems of the connection or its configuration (TLS, AUTH, greeting) are transient
for the same reason; only the server's 5xx about one message is permanent. They raise
``SmtpUnavailable``, so that the worker can stop taking messages until ``probe`` opens a
session again, instead of spending every queued email's attempts on a server that is down.
"""

from __future__ import annotations

import contextlib
import logging
import re
import smtplib
import socket
import ssl
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from services.core.errors import PermanentDelivery, TransientDelivery
from services.core.settings import Settings

log = logging.getLogger(__name__)

IDLE_PROBE_SECONDS = 10.0
_LINE_START_DOT = re.compile(rb"(?m)^\.")  # dot-stuffing (RFC 5321 4.5.2), as smtplib does


class SmtpUnavailable(TransientDelivery):
    """No usable session with the server (connect, greeting, TLS, AUTH): nothing to do
    with the message itself."""


@dataclass(frozen=True, slots=True)
class SendResult:
    """The server accepted the message (final reply ``code``) for all but ``refused``."""

    code: int
    refused: dict[str, str] = field(default_factory=dict)  # recipient -> "code text"


class SmtpSender:
    """Sends messages over one kept-open connection. Thread-safe (one call at a time);
    ``begin`` .. ``finish`` / ``abort`` belong to one caller."""

    def __init__(self, settings: Settings, *, idle_probe_seconds: float = IDLE_PROBE_SECONDS):
        self._settings = settings
        self._idle_probe_seconds = idle_probe_seconds
        self._conn: smtplib.SMTP | None = None
        self._last_used = 0.0
        self._lock = threading.Lock()
        self._refused: dict[str, str] | None = None  # set between begin and finish

    @property
    def begun(self) -> bool:
        """A transaction is begun and neither finished nor aborted."""
        return self._refused is not None

    def send(
        self,
        data: bytes,
        envelope_from: str,
        recipients: Sequence[str],
        *,
        smtputf8: bool = False,
    ) -> SendResult:
        """One SMTP transaction for a composed message (``services.worker.compose``)."""
        self.begin(data, envelope_from, recipients, smtputf8=smtputf8)
        return self.finish()

    def begin(
        self,
        data: bytes,
        envelope_from: str,
        recipients: Sequence[str],
        *,
        smtputf8: bool = False,
    ) -> None:
        """MAIL, RCPT, DATA and the message, all but the final ``.``: nothing is accepted
        yet. Raises as ``send`` does when the server refuses before that."""
        with self._lock:
            if self._refused is not None:
                raise RuntimeError("an SMTP transaction is already begun")
            conn = self._open()
            self._last_used = time.monotonic()
            with self._delivery_errors():
                options: list[str] = []
                if smtputf8:
                    if not conn.has_extn("smtputf8"):
                        raise smtplib.SMTPNotSupportedError(
                            "an address needs SMTPUTF8, which the server does not offer"
                        )
                    options = ["SMTPUTF8", "BODY=8BITMIME"]
                refused = _open_data(conn, envelope_from, recipients, len(data), options)
                body = _LINE_START_DOT.sub(b"..", data)
                conn.send(body if body.endswith(b"\r\n") else body + b"\r\n")
                self._refused = {rcpt: _text(reply) for rcpt, reply in refused.items()}

    def finish(self) -> SendResult:
        """The final ``.`` of the begun message, and the server's verdict."""
        with self._lock:
            refused, self._refused = self._refused, None
            if refused is None or self._conn is None:
                raise RuntimeError("no SMTP transaction begun")
            conn = self._conn
            with self._delivery_errors():
                conn.send(b".\r\n")
                code, reply = conn.getreply()
                if code != 250:
                    _end_refused(conn, code)
                    raise smtplib.SMTPDataError(code, reply)
            self._last_used = time.monotonic()
            return SendResult(code, refused)

    def abort(self) -> None:
        """Give up the begun message: the connection is closed before its final ``.``,
        so the server discards it (RFC 5321 4.1.1.4); the next send reconnects."""
        with self._lock:
            self._refused = None
            self._drop()

    @contextlib.contextmanager
    def _delivery_errors(self) -> Iterator[None]:
        """smtplib's exceptions as ``TransientDelivery`` / ``PermanentDelivery``; the
        connection is dropped whenever its state is in doubt."""
        try:
            yield
        except smtplib.SMTPRecipientsRefused as exc:
            self._drop_if_closed()
            raise _recipients_error(exc.recipients) from exc
        except smtplib.SMTPResponseException as exc:  # sender refused, DATA refused
            if exc.smtp_code == 421:
                self._drop()
            else:
                self._drop_if_closed()
            raise _reply_error(exc.smtp_code, exc.smtp_error) from exc
        except smtplib.SMTPNotSupportedError as exc:  # an SMTPUTF8 address, no support
            raise PermanentDelivery(f"server cannot take this message: {exc}") from exc
        except (smtplib.SMTPException, OSError) as exc:  # disconnects, timeouts
            self._drop()
            raise TransientDelivery(f"SMTP connection failed: {_describe(exc)}") from exc

    def probe(self) -> str | None:
        """Open a session if none is open: None when there is one, else why not."""
        with self._lock:
            try:
                self._open()
            except SmtpUnavailable as exc:
                return str(exc)
            self._last_used = time.monotonic()
            return None

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                with contextlib.suppress(smtplib.SMTPException, OSError):
                    self._conn.quit()
            self._drop()

    def _open(self) -> smtplib.SMTP:
        """A usable connection, or ``SmtpUnavailable``: nothing here is about the message."""
        try:
            return self._connection()
        except TransientDelivery as exc:  # AUTH refused or rejected
            self._drop()
            raise SmtpUnavailable(str(exc), exc.smtp_code) from exc
        except (smtplib.SMTPException, OSError) as exc:  # refused, timeout, TLS, no STARTTLS
            self._drop()
            if isinstance(exc, ssl.SSLError):
                log.error(
                    "TLS with SMTP server %s:%d failed, nothing sent: %s "
                    "(untrusted or wrong-host certificate? SMTP_CA_FILE adds a CA)",
                    self._settings.smtp_host,
                    self._settings.smtp_port,
                    exc,
                )
            raise SmtpUnavailable(f"SMTP connection failed: {_describe(exc)}") from exc

    def _connection(self) -> smtplib.SMTP:
        """The open connection, after a NOOP if it idled; else a new one."""
        if self._conn is not None and self._conn.sock is not None:
            if time.monotonic() - self._last_used < self._idle_probe_seconds:
                return self._conn
            try:
                if self._conn.noop()[0] == 250:
                    return self._conn
            except (smtplib.SMTPException, OSError):
                pass
        self._drop()
        self._conn = self._connect()
        return self._conn

    def _connect(self) -> smtplib.SMTP:
        s = self._settings
        context = None
        if s.smtp_security != "none":
            context = ssl.create_default_context(cafile=s.smtp_ca_file or None)
        # Connecting in the constructor is what gives SMTP_SSL the host name to verify;
        # smtplib closes the socket itself when the connect or the greeting fails.
        conn = (
            smtplib.SMTP_SSL(s.smtp_host, s.smtp_port, context=context, timeout=s.smtp_timeout)
            if s.smtp_security == "tls"
            else smtplib.SMTP(s.smtp_host, s.smtp_port, timeout=s.smtp_timeout)
        )
        try:
            if conn.sock is not None:  # connected by the constructor
                conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.ehlo()
            if s.smtp_security == "starttls":
                conn.starttls(context=context)
                conn.ehlo()
            if s.smtp_username:
                self._login(conn)
        except BaseException:
            conn.close()
            raise
        log.info(
            "SMTP connected to %s:%d (security=%s, auth=%s)",
            s.smtp_host,
            s.smtp_port,
            s.smtp_security,
            "yes" if s.smtp_username else "no",
        )
        return conn

    def _login(self, conn: smtplib.SMTP) -> None:
        s = self._settings
        if not isinstance(conn.sock, ssl.SSLSocket):
            log.error(
                "refusing to send SMTP AUTH credentials in cleartext to %s:%d: "
                "set SMTP_SECURITY=starttls or tls",
                s.smtp_host,
                s.smtp_port,
            )
            raise TransientDelivery("SMTP AUTH refused over a cleartext connection")
        try:
            conn.login(s.smtp_username, s.smtp_password.get_secret_value())
        except smtplib.SMTPAuthenticationError as exc:
            log.error("SMTP AUTH rejected for user %s: %s", s.smtp_username, _describe(exc))
            raise TransientDelivery(f"SMTP AUTH rejected: {_describe(exc)}", exc.smtp_code) from exc

    def _drop_if_closed(self) -> None:
        if self._conn is not None and self._conn.sock is None:
            self._drop()

    def _drop(self) -> None:
        self._refused = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _open_data(
    conn: smtplib.SMTP,
    envelope_from: str,
    recipients: Sequence[str],
    size: int,
    options: list[str],
) -> dict[str, tuple[int, bytes]]:
    """MAIL, a RCPT per recipient and DATA, as ``smtplib.SMTP.sendmail`` sends them; once
    the server waits for the message (354), the recipients it refused. A server that
    offers PIPELINING gets the three in one write (``_pipelined``)."""
    if conn.does_esmtp and conn.has_extn("size"):
        options = [f"size={size}", *options]
    if conn.does_esmtp and conn.has_extn("pipelining"):
        return _pipelined(conn, envelope_from, recipients, options)
    code, reply = conn.mail(envelope_from, options)
    if code != 250:
        _end_refused(conn, code)
        raise smtplib.SMTPSenderRefused(code, reply, envelope_from)
    refused: dict[str, tuple[int, bytes]] = {}
    for rcpt in recipients:
        code, reply = conn.rcpt(rcpt)
        if code not in (250, 251):
            refused[rcpt] = (code, reply)
        if code == 421:
            conn.close()
            raise smtplib.SMTPRecipientsRefused(refused)
    if len(refused) == len(recipients):
        _end_refused(conn, 0)
        raise smtplib.SMTPRecipientsRefused(refused)
    code, reply = conn.docmd("data")
    if code != 354:
        _end_refused(conn, code)
        raise smtplib.SMTPDataError(code, reply)
    return refused


def _pipelined(
    conn: smtplib.SMTP, envelope_from: str, recipients: Sequence[str], options: list[str]
) -> dict[str, tuple[int, bytes]]:
    """RFC 2920: MAIL, the RCPTs and DATA in one write, then their replies in order - one
    round trip instead of two plus one per recipient. Refusals end as ``_open_data``'s
    do, after every reply is read (so the next transaction's replies stay in step), and
    a DATA the server took although nothing else was accepted is ended with the lone "."
    RFC 2920 asks for, which such a server refuses."""
    if any(option.lower() == "smtputf8" for option in options):
        conn.command_encoding = "utf-8"  # as smtplib.SMTP.mail does
    extra = "".join(f" {option}" for option in options)
    # The envelope's addresses are addr-specs as compose.py writes them (email-validator
    # refuses quoted local parts and comments): written between <> as they stand.
    # smtplib.quoteaddr would give the same after parsing each again with
    # email.utils.parseaddr, which compose.py avoids - 5 % of a worker's CPU per email.
    commands = [
        f"MAIL FROM:<{envelope_from}>{extra}",
        *(f"RCPT TO:<{rcpt}>" for rcpt in recipients),
        "DATA",
    ]
    if any("\r" in command or "\n" in command for command in commands):
        raise ValueError("a line break inside an SMTP command")  # as smtplib.SMTP.putcmd
    conn.send("".join(f"{command}\r\n" for command in commands))
    mail = conn.getreply()
    if mail[0] == 421:  # the server hangs up: no more replies come
        conn.close()
        raise smtplib.SMTPSenderRefused(*mail, envelope_from)
    refused: dict[str, tuple[int, bytes]] = {}
    for rcpt in recipients:
        code, reply = conn.getreply()
        if code not in (250, 251):
            refused[rcpt] = (code, reply)
        if code == 421:
            conn.close()
            raise smtplib.SMTPRecipientsRefused(refused)
    data = conn.getreply()
    if mail[0] == 250 and len(refused) < len(recipients) and data[0] == 354:
        return refused
    if data[0] == 354:  # taken, although nothing else was: end it, empty
        conn.send(".\r\n")
        data = conn.getreply()
    _end_refused(conn, data[0])
    if mail[0] != 250:
        raise smtplib.SMTPSenderRefused(*mail, envelope_from)
    if len(refused) == len(recipients):
        raise smtplib.SMTPRecipientsRefused(refused)
    raise smtplib.SMTPDataError(*data)


def _end_refused(conn: smtplib.SMTP, code: int) -> None:
    """After a refusal, as smtplib does: a 421 ends the session, anything else the
    transaction (RSET)."""
    if code == 421:
        conn.close()
    else:
        with contextlib.suppress(smtplib.SMTPServerDisconnected):
            conn.rset()


def _text(reply: bytes | str | tuple[int, bytes]) -> str:
    if isinstance(reply, tuple):
        return f"{reply[0]} {_text(reply[1])}"
    return reply.decode("utf-8", "replace") if isinstance(reply, bytes) else reply


def _describe(exc: BaseException) -> str:
    if isinstance(exc, smtplib.SMTPResponseException):
        return f"{exc.smtp_code} {_text(exc.smtp_error)}"
    return f"{type(exc).__name__}: {exc}"


def _reply_error(code: int, text: bytes | str) -> TransientDelivery | PermanentDelivery:
    """5xx: the server will never take it; 4xx or anything odd: try again later."""
    kind = PermanentDelivery if 500 <= code <= 599 else TransientDelivery
    return kind(_text(text), code)


def _recipients_error(
    refused: dict[str, tuple[int, bytes]],
) -> TransientDelivery | PermanentDelivery:
    """Every recipient refused: permanent only when every refusal was permanent."""
    codes = [code for code, _ in refused.values()]
    temporary = [code for code in codes if not 500 <= code <= 599]
    detail = "; ".join(f"{rcpt}: {_text(reply)}" for rcpt, reply in refused.items())
    if temporary:
        return TransientDelivery(f"all recipients refused: {detail}", temporary[0])
    return PermanentDelivery(f"all recipients refused: {detail}", codes[0])
