"""The whole pipeline with the real processes: REST -> MySQL -> relay -> RabbitMQ ->
worker -> SMTP, checked the way a user would see it (the API and the SMTP server)."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from tests.conftest import API_KEY
from tests.support.smtp_sink import SmtpSink
from tests.support.stack import Stack

TERMINAL = {"sent", "failed", "cancelled"}


def iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def parse(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def email(
    to: str = "ann@example.com", send_at: datetime | None = None, **extra: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {"to": [to], "subject": "Hello", "text": "Hi there.\n.\nBye", **extra}
    if send_at is not None:
        body["send_at"] = iso(send_at)
    return body


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def statuses(client: httpx.Client, ids: list[str]) -> dict[str, dict[str, Any]]:
    return {i: client.get(f"/v1/emails/{i}").json() for i in ids}


def wait_terminal(client: httpx.Client, ids: list[str], timeout: float = 30) -> dict[str, Any]:
    found: dict[str, Any] = {}

    def done() -> bool:
        found.update(
            statuses(client, [i for i in ids if found.get(i, {}).get("status") not in TERMINAL])
        )
        return all(found[i]["status"] in TERMINAL for i in ids)

    wait_for(done, timeout, "every email to end sent, failed or cancelled")
    return found


def start_all(stack: Stack, relays: int = 1, workers: int = 1) -> httpx.Client:
    stack.start_api()
    for _ in range(relays):
        stack.start("relay")
    for _ in range(workers):
        stack.start("worker")
    return stack.client(API_KEY)


def test_each_email_arrives_once_and_never_before_send_at(
    stack: Stack, smtp_sink: SmtpSink
) -> None:
    client = start_all(stack)
    soon = datetime.now(UTC) + timedelta(seconds=2)
    ids = [client.post("/v1/emails", json=email()).json()["id"] for _ in range(5)]
    ids += [
        client.post("/v1/emails", json=email(send_at=soon + timedelta(milliseconds=50 * i))).json()[
            "id"
        ]
        for i in range(20)
    ]
    final = wait_terminal(client, ids)
    assert {final[i]["status"] for i in ids} == {"sent"}
    arrivals = smtp_sink.by_email_id()
    assert sorted(arrivals) == sorted(ids)
    for email_id in ids:
        (arrival,) = arrivals[email_id]
        assert arrival.arrived_at >= parse(final[email_id]["send_at"])
        assert arrival.message_id == final[email_id]["message_id"]
        assert (
            arrival.message.get_payload(decode=True).replace(b"\r\n", b"\n")
            == b"Hi there.\n.\nBye\n"
        )
        assert final[email_id]["attempts"] == 1


def test_cancelled_email_is_never_delivered(stack: Stack, smtp_sink: SmtpSink) -> None:
    client = start_all(stack)
    email_id = client.post(
        "/v1/emails", json=email(send_at=datetime.now(UTC) + timedelta(seconds=2))
    ).json()["id"]
    assert client.post(f"/v1/emails/{email_id}/cancel").json()["status"] == "cancelled"
    control = client.post(
        "/v1/emails", json=email(send_at=datetime.now(UTC) + timedelta(seconds=3))
    ).json()["id"]
    wait_terminal(client, [control])
    time.sleep(0.5)
    assert email_id not in smtp_sink.by_email_id()
    assert client.get(f"/v1/emails/{email_id}").json()["status"] == "cancelled"


def test_rescheduled_email_arrives_at_the_new_time_not_the_old(
    stack: Stack, smtp_sink: SmtpSink
) -> None:
    client = start_all(stack)
    old = datetime.now(UTC) + timedelta(seconds=1.5)
    new = old + timedelta(seconds=3)
    email_id = client.post("/v1/emails", json=email(send_at=old)).json()["id"]
    response = client.patch(f"/v1/emails/{email_id}", json={"send_at": iso(new)})
    assert response.status_code == 200, response.text
    wait_terminal(client, [email_id])
    (arrival,) = smtp_sink.by_email_id()[email_id]
    assert arrival.arrived_at >= new


def test_transient_replies_are_retried_and_permanent_ones_fail(
    stack: Stack, smtp_sink: SmtpSink
) -> None:
    smtp_sink.script("flaky@example.com", "451 4.3.0 try later", "451 4.3.0 try later")
    smtp_sink.script("gone@example.com", "550 5.1.1 no such user")
    client = start_all(stack)
    flaky = client.post("/v1/emails", json=email("flaky@example.com")).json()["id"]
    gone = client.post("/v1/emails", json=email("gone@example.com")).json()["id"]
    final = wait_terminal(client, [flaky, gone])

    assert (final[flaky]["status"], final[flaky]["attempts"]) == ("sent", 3)
    history = client.get(f"/v1/emails/{flaky}/attempts").json()["items"]
    assert [(a["number"], a["outcome"], a["smtp_code"]) for a in history] == [
        (1, "transient_error", 451),
        (2, "transient_error", 451),
        (3, "sent", 250),
    ]
    assert len(smtp_sink.by_email_id()[flaky]) == 1

    assert final[gone]["status"] == "failed"
    assert final[gone]["attempts"] == 1
    assert "550" in final[gone]["last_error"]
    assert gone not in smtp_sink.by_email_id()


def test_two_relays_and_two_workers_send_each_email_once(stack: Stack, smtp_sink: SmtpSink) -> None:
    client = start_all(stack, relays=2, workers=2)
    send_at = datetime.now(UTC) + timedelta(seconds=2)
    ids: list[str] = []
    for start in range(0, 300, 100):
        batch = [email(f"user{n}@example.com", send_at=send_at) for n in range(start, start + 100)]
        response = client.post("/v1/emails/batch", json={"emails": batch})
        assert response.status_code == 201, response.text
        ids += [item["id"] for item in response.json()["items"]]
    final = wait_terminal(client, ids, timeout=60)
    assert {final[i]["status"] for i in ids} == {"sent"}
    arrivals = smtp_sink.by_email_id()
    assert {i: len(arrivals.get(i, [])) for i in ids} == dict.fromkeys(ids, 1)
    assert min(a.arrived_at for i in ids for a in arrivals[i]) >= send_at
