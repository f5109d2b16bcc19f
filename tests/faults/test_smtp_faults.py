"""SMTP faults (FAULTS.md, "Worker and SMTP"): transient and permanent replies, a server
that is stopped or silent, TLS that must not be trusted.

Every scenario runs the real api, relay and worker processes and settles the ledger.
"""

from __future__ import annotations

import ipaddress
import ssl
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sqlalchemy.engine import Engine

from services.core.schema import attempts, emails
from tests.conftest import API_KEY
from tests.faults.ledger import Ledger, iso, scaled, settle
from tests.faults.scenario import quiesce, wait_until
from tests.support.proxy import FaultProxy
from tests.support.smtp_sink import AuthRecorder, SmtpSink
from tests.support.stack import Process, Stack


def body(to: str, send_at: datetime) -> dict[str, Any]:
    return {"to": [to], "subject": "ledger", "text": "x", "send_at": iso(send_at)}


def parse(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def attempt_errors(db: Engine) -> list[str]:
    with db.connect() as conn:
        return [
            r.error or ""
            for r in conn.execute(
                sa.select(attempts.c.error)
                .where(attempts.c.outcome == "transient_error")
                .order_by(attempts.c.id)
            )
        ]


# --- 3. transient replies -------------------------------------------------------------


BACKOFF = 1.0  # RETRY_BACKOFF_SECONDS for this test: delays 1, 2, 4 s (+ equal jitter)
TRANSIENT = ("421 4.3.2 shutting down", "450 4.2.1 mailbox busy", "451 4.3.0 try later")


def test_transient_replies_retry_on_the_backoff_schedule(
    stack: Stack, db: Engine, smtp_sink: SmtpSink
) -> None:
    per_k, plain = scaled(4), scaled(100)
    stack.start_api()
    stack.start("relay")
    stack.start(
        "worker",
        RETRY_BACKOFF_SECONDS=str(BACKOFF),
        RETRY_BACKOFF_MAX_SECONDS="60",
        MAX_ATTEMPTS="5",
    )
    now = datetime.now(UTC)
    requests: list[dict[str, Any]] = []
    failures: dict[str, list[int]] = {}  # recipient -> the codes of its k failures
    for k in (1, 2, 3):
        for i in range(per_k):
            to = f"t{k}-{i}@example.com"
            replies = [TRANSIENT[(i + j) % 3] for j in range(k)]
            smtp_sink.script(to, *replies)
            failures[to] = [int(reply[:3]) for reply in replies]
            # half of them are due later: retries must respect send_at as well
            requests.append(body(to, now + timedelta(seconds=2 * (i % 2))))
    requests += [body(f"plain{i}@example.com", now) for i in range(plain)]
    ledger = Ledger()
    client = stack.client(API_KEY)
    ledger.submit(client, requests, batch=50)
    quiesce(stack, ledger, db, timeout=90)
    figures = settle("451/450/421 for the first k attempts", ledger, db, smtp_sink)
    figures.assert_guarantees()

    # one SMTP transaction per attempt, no more
    assert smtp_sink.handler.transactions == plain + sum(len(c) + 1 for c in failures.values())
    worst_late = 0.0
    for email_id in ledger.accepted:
        resource = client.get(f"/v1/emails/{email_id}").json()
        codes = failures.get(resource["to"][0], [])
        k = len(codes)
        assert resource["status"] == "sent"
        assert resource["attempts"] == k + 1, resource
        if not k:
            continue
        items = client.get(f"/v1/emails/{email_id}/attempts").json()["items"]
        assert [a["outcome"] for a in items] == ["transient_error"] * k + ["sent"]
        assert [a["smtp_code"] for a in items] == [*codes, 250]
        for number in range(1, k + 1):
            delay = BACKOFF * 2 ** (number - 1)
            gap = (
                parse(items[number]["started_at"]) - parse(items[number - 1]["finished_at"])
            ).total_seconds()
            # equal jitter: never before half the delay (both ends on the database clock)
            assert gap >= delay / 2 - 0.001, (number, gap, delay, items)
            # ... and not much after the full delay: a relay poll, a queue hop, and at most
            # the wait behind the plain emails queued at the start (drained at >= 100/s)
            assert gap <= delay + 1.5 + plain / 100, (number, gap, delay, items)
            worst_late = max(worst_late, gap - delay)
    print(f"retry gaps: worst {worst_late:+.3f}s after the full delay")


# --- 4. permanent replies -------------------------------------------------------------


PERMANENT = ("550 5.1.1 mailbox unknown", "553 5.1.3 bad destination", "554 5.7.1 rejected")


def test_permanent_replies_fail_at_once_visibly(
    stack: Stack, db: Engine, smtp_sink: SmtpSink
) -> None:
    per_code, plain = scaled(5), scaled(100)
    stack.start_api()
    stack.start("relay")
    stack.start("worker")
    now = datetime.now(UTC)
    requests, expected = [], {}
    for reply in PERMANENT:
        for i in range(per_code):
            to = f"p{reply[:3]}-{i}@example.com"
            smtp_sink.script(to, reply)
            expected[to] = reply
            requests.append(body(to, now))
    requests += [body(f"plain{i}@example.com", now) for i in range(plain)]
    ledger = Ledger()
    client = stack.client(API_KEY)
    ledger.submit(client, requests, batch=50)
    quiesce(stack, ledger, db)
    settle("550/553/554", ledger, db, smtp_sink).assert_guarantees()

    assert smtp_sink.handler.transactions == plain + len(expected)  # one each, no retry
    seen: Counter[str] = Counter()
    for email_id in ledger.accepted:
        resource = client.get(f"/v1/emails/{email_id}").json()
        scripted = expected.get(resource["to"][0])
        if scripted is None:
            assert resource["status"] == "sent"
            continue
        reply = scripted
        seen[reply[:3]] += 1
        assert resource["status"] == "failed"
        assert resource["attempts"] == 1
        assert reply in resource["last_error"], resource  # "550 5.1.1 mailbox unknown"
        items = client.get(f"/v1/emails/{email_id}/attempts").json()["items"]
        assert len(items) == 1
        assert items[0]["outcome"] == "permanent_error"
        assert items[0]["smtp_code"] == int(reply[:3])
        assert reply[4:] in items[0]["error"]
    assert seen == Counter({code[:3]: per_code for code in PERMANENT})


# --- 5. SMTP server stopped or silent -------------------------------------------------


@dataclass
class Usage:
    fds: int
    threads: int


def usage(process: Process) -> Usage:
    fds = len(list(Path(f"/proc/{process.pid}/fd").iterdir()))
    status = Path(f"/proc/{process.pid}/status").read_text()
    threads = int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("Threads:")))
    return Usage(fds, threads)


@pytest.mark.parametrize("fault", ["stopped", "silent"])
def test_smtp_stopped_or_silent_times_out_retries_and_leaks_nothing(
    stack: Stack, db: Engine, smtp_sink: SmtpSink, fault: str
) -> None:
    warm, dropped, n, outage = scaled(30), scaled(15), scaled(200), 8.0
    with FaultProxy(smtp_sink.port) as proxy:
        stack.start_api()
        stack.start("relay")
        worker = stack.start(
            "worker",
            SMTP_PORT=str(proxy.port),
            SMTP_TIMEOUT="1",
            MAX_ATTEMPTS="100",  # an outage must not exhaust them here
        )
        ledger = Ledger()
        client = stack.client(API_KEY)
        ledger.submit(client, [body(f"w{i}@example.com", datetime.now(UTC)) for i in range(warm)])
        quiesce(stack, ledger, db)
        before = usage(worker)
        # live sessions dropped: the server hangs up after DATA, or says 421 (the client
        # must then close the socket itself)
        for i in range(dropped):
            smtp_sink.script(f"d{i}@example.com", "close" if i % 2 else "421 4.3.2 going down")
        ledger.submit(
            client, [body(f"d{i}@example.com", datetime.now(UTC)) for i in range(dropped)]
        )
        quiesce(stack, ledger, db)
        earlier = len(attempt_errors(db))

        if fault == "stopped":
            proxy.cut()  # refuses (resets) every connection: a server that is down
        else:
            proxy.blackhole()  # accepts TCP, never says a word: a hung server
        started = time.monotonic()
        ledger.submit(client, [body(f"u{i}@example.com", datetime.now(UTC)) for i in range(n)])
        delivered_at_fault = len(smtp_sink.received)
        peak = before
        while time.monotonic() - started < outage:
            time.sleep(0.5)
            now = usage(worker)
            peak = Usage(max(peak.fds, now.fds), max(peak.threads, now.threads))
        errors = attempt_errors(db)[earlier:]
        assert len(smtp_sink.received) <= delivered_at_fault + 1  # at most the one in hand
        assert errors, "no attempt failed during the outage"
        assert all(e.startswith("SMTP connection failed") for e in errors), errors[:5]
        # the worker pauses and probes instead of spending every email's attempts
        assert len(errors) <= 3, f"{len(errors)} attempts spent during the outage"
        probes = worker.log().count("SMTP server still unavailable")
        assert probes >= 2, worker.log()[-2000:]  # ... and keeps probing
        if fault == "silent":  # the timeout fired (it would hang forever without one)
            assert "timed out" in errors[-1], errors
        proxy.restore()
        quiesce(stack, ledger, db, timeout=120)
        after = usage(worker)

    figures = settle(f"SMTP {fault} {outage:.0f} s", ledger, db, smtp_sink)
    figures.assert_guarantees()
    with db.connect() as conn:
        assert (
            conn.execute(sa.select(sa.func.count()).where(emails.c.status != "sent")).scalar_one()
            == 0
        )
    print(f"{fault}: {len(errors)} failed attempts; fds/threads {before} -> peak {peak} -> {after}")
    assert after.fds <= before.fds + 2, (before, peak, after)
    assert after.threads <= before.threads, (before, peak, after)
    assert peak.fds <= before.fds + 4, (before, peak, after)  # not one per failed attempt


# --- 6. TLS ---------------------------------------------------------------------------


@dataclass
class Pki:
    ca: Path
    good_cert: Path  # for 127.0.0.1, signed by ca
    wrong_cert: Path  # for wrong.example, signed by ca
    key: Path


def make_pki(directory: Path) -> Pki:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "emailsched test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )

    def leaf(name: x509.GeneralName, cn: str) -> x509.Certificate:
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([name]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), False
            )
            .sign(key, hashes.SHA256())
        )

    pem = serialization.Encoding.PEM
    pki = Pki(
        directory / "ca.pem", directory / "good.pem", directory / "wrong.pem", directory / "k.pem"
    )
    pki.ca.write_bytes(ca.public_bytes(pem))
    pki.good_cert.write_bytes(
        leaf(x509.IPAddress(ipaddress.ip_address("127.0.0.1")), "127.0.0.1").public_bytes(pem)
    )
    pki.wrong_cert.write_bytes(
        leaf(x509.DNSName("wrong.example"), "wrong.example").public_bytes(pem)
    )
    pki.key.write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return pki


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


def tls_sink(security: str, cert: Path, key: Path, auth: AuthRecorder) -> SmtpSink:
    context = server_context(cert, key)
    # AUTH advertised even in cleartext, so that a client that sent it would be caught
    kwargs: dict[str, Any] = {"authenticator": auth, "auth_require_tls": False}
    if security == "starttls":
        kwargs["tls_context"] = context
    else:
        kwargs["ssl_context"] = context
    return SmtpSink(**kwargs)


def run_phase(
    stack: Stack, db: Engine, sink: SmtpSink, *, security: str, ca_file: str, expect: str
) -> str:
    """A worker that must fail TLS: a transient attempt, then probes; nothing reaches ``sink``."""
    before = len(attempt_errors(db))

    def failed_again() -> bool:
        assert sink.received == [], f"delivered over untrusted TLS ({security}, {expect})"
        # an attempt failed (transient), then the worker paused and probed again, twice
        probes = worker.log().count("SMTP server still unavailable")
        return len(attempt_errors(db)) > before and probes >= 2

    worker = stack.start(
        "worker",
        SMTP_PORT=str(sink.port),
        SMTP_SECURITY=security,
        SMTP_CA_FILE=ca_file,
        SMTP_USERNAME="mailer",
        SMTP_PASSWORD="s3cret-password",
    )
    wait_until(failed_again, 30, f"{expect} attempts")
    assert worker.stop() == 0
    errors = attempt_errors(db)[before:]
    assert all(expect in e for e in errors), errors[:3]
    log = worker.log()
    assert " ERROR " in log, log[-2000:]  # loudly,
    assert expect in log, log[-2000:]  # with the reason
    assert "s3cret-password" not in log
    return log


@pytest.mark.parametrize("security", ["starttls", "tls"])
def test_untrusted_tls_sends_nothing_and_no_credentials(
    stack: Stack, db: Engine, smtp_sink: SmtpSink, tmp_path: Path, security: str
) -> None:
    pki = make_pki(tmp_path)
    n = scaled(20)
    wrong_auth, good_auth = AuthRecorder(), AuthRecorder()
    with (
        tls_sink(security, pki.wrong_cert, pki.key, wrong_auth) as wrong,
        tls_sink(security, pki.good_cert, pki.key, good_auth) as good,
    ):
        stack.settings = stack.settings.model_copy(
            update={
                "max_attempts": 100,
                "retry_backoff_seconds": 0.3,
                "retry_backoff_max_seconds": 1,
            }
        )
        stack.start_api()
        stack.start("relay")
        ledger = Ledger()
        ledger.submit(
            stack.client(API_KEY), [body(f"r{i}@example.com", datetime.now(UTC)) for i in range(n)]
        )
        if security == "starttls":  # cleartext with credentials: refused by the worker itself
            run_phase(
                stack,
                db,
                wrong,
                security="none",
                ca_file="",
                expect="AUTH refused over a cleartext connection",
            )
        # a certificate nobody vouches for (the system store does not hold our CA)
        run_phase(
            stack, db, wrong, security=security, ca_file="", expect="CERTIFICATE_VERIFY_FAILED"
        )
        # a trusted CA, but the certificate names another host
        run_phase(stack, db, wrong, security=security, ca_file=str(pki.ca), expect="mismatch")
        assert wrong.received == []
        assert wrong.handler.transactions == 0
        assert wrong_auth.attempts == []  # no AUTH, in cleartext or otherwise
        with db.connect() as conn:
            left = Counter(r.status for r in conn.execute(sa.select(emails.c.status)))
        assert set(left) <= {"pending", "queued", "sending"}, left  # retried as transient

        # fixed: the right host, and its CA trusted through SMTP_CA_FILE
        fixed = stack.start(
            "worker",
            SMTP_PORT=str(good.port),
            SMTP_SECURITY=security,
            SMTP_CA_FILE=str(pki.ca),
            SMTP_USERNAME="mailer",
            SMTP_PASSWORD="s3cret-password",
        )
        quiesce(stack, ledger, db, timeout=60)
        figures = settle(f"TLS {security}: untrusted, wrong host, then fixed", ledger, db, good)
        figures.assert_guarantees()
        assert good_auth.attempts
        assert all(a.tls for a in good_auth.attempts), good_auth.attempts
        assert {a.login for a in good_auth.attempts} == {"mailer"}
        assert fixed.stop() == 0  # before the sinks go: no connection left open on them
