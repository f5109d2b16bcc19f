"""Broker faults (FAULTS.md, "Broker"): RabbitMQ stopped, a long outage, the node
killed mid-drain, a hung node and a resource alarm.

These scenarios stop, kill, freeze and starve the broker, so they never touch the
shared one: the module boots a private RabbitMQ node (tests/support/rabbit_node.py) on
loopback ports of its own and points every process of the test at it. Whatever a test
does to that node, it is running again (app started, no alarm, not frozen) afterwards,
and it is stopped and deleted when the module ends.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pika
import pytest
import sqlalchemy as sa
from pydantic import SecretStr
from sqlalchemy.engine import Engine

from services.core.broker import RECONNECT_MAX_SECONDS, connection_parameters
from services.core.messages import DeliveryMessage
from services.core.schema import outbox
from services.core.settings import Settings
from tests.conftest import API_KEY
from tests.faults.ledger import SCALE, Ledger, scaled, settle
from tests.faults.scenario import bodies, quiesce, unpublished, wait_until
from tests.support.proxy import FaultProxy
from tests.support.rabbit_node import RabbitNode, available
from tests.support.smtp_sink import SmtpSink
from tests.support.stack import Process, Stack

MIB = 1024


# --- the private node -------------------------------------------------------------------


@pytest.fixture(scope="module")
def rabbit_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitNode]:
    why = available()
    if why is not None:
        pytest.skip(f"no private RabbitMQ node: {why}")
    with RabbitNode.booted(tmp_path_factory.mktemp("rabbit")) as node:
        yield node


@pytest.fixture
def node(rabbit_node: RabbitNode) -> Iterator[RabbitNode]:
    """The private node, running again after the test whatever it did to it."""
    rabbit_node.ensure_running()
    try:
        yield rabbit_node
    finally:
        rabbit_node.ensure_running()


@pytest.fixture
def settings(settings: Settings, node: RabbitNode) -> Settings:
    """The suite's settings, with every process pointed at the private node."""
    return settings.model_copy(update={"rabbitmq_url": SecretStr(node.url)})


# --- helpers ------------------------------------------------------------------------------


def published_rows(engine: Engine) -> dict[int, tuple[str, int]]:
    """Outbox rows flagged published: id -> (email id, version)."""
    with engine.connect() as conn:
        return {
            r.id: (r.email_id, r.version)
            for r in conn.execute(
                sa.select(outbox.c.id, outbox.c.email_id, outbox.c.version).where(
                    outbox.c.published_at.is_not(None)
                )
            )
        }


def held(engine: Engine) -> int:
    """Unpublished rows under a relay's lease right now."""
    with engine.connect() as conn:
        return int(
            conn.execute(
                sa.select(sa.func.count()).where(
                    outbox.c.published_at.is_(None),
                    outbox.c.claimed_by.is_not(None),
                    outbox.c.available_at > sa.func.utc_timestamp(6),
                )
            ).scalar_one()
        )


def republished(engine: Engine) -> int:
    """Rows that took more than one publish attempt."""
    with engine.connect() as conn:
        return int(
            conn.execute(
                sa.select(sa.func.count()).where(outbox.c.publish_attempts > 1)
            ).scalar_one()
        )


def queue_contents(url: str, queue: str) -> list[tuple[str, int]]:
    """Every message in the queue as (email id, version), left in the queue (unacked,
    then handed back when the channel closes). Only meaningful with no consumer."""
    connection = pika.BlockingConnection(connection_parameters(url))
    found: list[tuple[str, int]] = []
    try:
        channel = connection.channel()
        while True:
            method, _properties, body = channel.basic_get(queue, auto_ack=False)
            if method is None:
                break
            message = DeliveryMessage.decode(body)
            found.append((message.email_id, message.version))
    finally:
        connection.close()
    return found


def rss_kib(process: Process) -> int:
    for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {process.kind} {process.pid}")


def connected_times(relay: Process) -> int:
    return relay.log().count("rabbitmq connected at")


class SteadyLoad:
    """A thread posting ``rate`` emails a second (batches of ``batch``, due at once)
    until stopped: the API under load while the broker is away."""

    def __init__(self, ledger: Ledger, stack: Stack, rate: float, batch: int = 20) -> None:
        self.ledger, self.client, self.rate, self.batch = ledger, stack.client(API_KEY), rate, batch
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> SteadyLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        interval = self.batch / self.rate
        next_at = time.monotonic()
        while not self._stop.is_set():
            self.ledger.submit(
                self.client,
                bodies(self.batch, datetime.now(UTC)),
                batch=self.batch,
                threads=1,
            )
            self.sent += self.batch
            next_at += interval
            self._stop.wait(max(0.0, next_at - time.monotonic()))


# --- scenarios ----------------------------------------------------------------------------


def test_broker_stopped_while_emails_fall_due(
    stack: Stack, db: Engine, smtp_sink: SmtpSink, node: RabbitNode, request: pytest.FixtureRequest
) -> None:
    """stop_app for 12-30 s while emails fall due and the API keeps accepting: no API
    error, the relay is publishing again within seconds of start_app, all delivered."""
    outage = min(30.0, 12.0 * max(1.0, SCALE))
    stack.start_api()
    # Relay and worker reach the node through proxies that note every connection attempt.
    relay_proxy, worker_proxy = FaultProxy(node.port).start(), FaultProxy(node.port).start()
    request.addfinalizer(relay_proxy.stop)
    request.addfinalizer(worker_proxy.stop)
    stack.start("worker", RABBITMQ_URL=node.url.replace(f":{node.port}/", f":{worker_proxy.port}/"))
    relay = stack.start(
        "relay", RABBITMQ_URL=node.url.replace(f":{node.port}/", f":{relay_proxy.port}/")
    )
    wait_until(lambda: connected_times(relay) == 1, 20, "relay connected")
    ledger = Ledger()
    client = stack.client(API_KEY)

    # Emails falling due all through the outage, accepted before it...
    ledger.submit(
        client, bodies(scaled(600), datetime.now(UTC) + timedelta(seconds=2), spread_seconds=outage)
    )
    node.stop_app()
    stopped = time.monotonic()
    # ...and more accepted during it, due at once: the API does not need the broker.
    with SteadyLoad(ledger, stack, rate=scaled(600) / outage):
        time.sleep(max(0.0, outage - (time.monotonic() - stopped)))
    during = len(ledger.accepted)
    assert ledger.api_errors == [], ledger.api_errors[:5]
    before = len(smtp_sink.received)
    node.start_app()
    started = time.monotonic()
    # However long the outage, both keep trying at least every RECONNECT_MAX_SECONDS (a
    # back-off grown to minutes would leave a broker that is back unused for minutes).
    for name, proxy in (("relay", relay_proxy), ("worker", worker_proxy)):
        tries = [at for at in proxy.attempts if stopped + 4.0 <= at <= started]
        assert tries, f"{name} did not try the broker once in the outage"
        gaps = [later - earlier for earlier, later in itertools.pairwise([*tries, started])]
        assert max(gaps) <= RECONNECT_MAX_SECONDS + 1.0, (
            f"{name} retried the broker {len(tries)} times, gaps {[round(g, 1) for g in gaps]}"
        )

    reconnect = wait_until(lambda: connected_times(relay) >= 2, 30, "relay reconnected")
    first = wait_until(lambda: len(smtp_sink.received) > before, 30, "a delivery after start_app")
    drained = wait_until(lambda: unpublished(db) == 0, 60, "outbox drained after start_app")
    print(
        f"\nbroker stopped {outage:.0f}s, {during} accepted meanwhile: relay reconnected "
        f"{reconnect:.1f}s after start_app, first delivery {first:.1f}s, outbox drained "
        f"{(time.monotonic() - started):.1f}s"
    )
    assert reconnect < 3.0, f"relay took {reconnect:.1f}s to reconnect after start_app"
    assert first < 5.0, f"first delivery {first:.1f}s after start_app"
    assert drained < 5.0 + len(ledger.accepted) / 500
    quiesce(stack, ledger, db, timeout=120)
    figures = settle(f"broker stopped {outage:.0f} s", ledger, db, smtp_sink)
    assert ledger.api_errors == []
    figures.assert_guarantees()


def test_long_broker_outage_under_steady_load(
    stack: Stack, db: Engine, smtp_sink: SmtpSink, node: RabbitNode
) -> None:
    """A long outage (25 s here, minutes under `make faults`) with the API accepting a
    steady stream: the outbox grows, the relay's memory stays flat, all drains after."""
    outage = 25.0 * max(1.0, SCALE)
    rate = 40.0 * max(1.0, SCALE**0.5)
    stack.start_api()
    stack.start("worker")
    relay = stack.start("relay")
    wait_until(lambda: connected_times(relay) == 1, 20, "relay connected")
    ledger = Ledger()
    node.stop_app()
    stopped = time.monotonic()
    samples: list[tuple[float, int, int]] = []  # (seconds into the outage, RSS KiB, held)
    with SteadyLoad(ledger, stack, rate=rate) as load:
        while time.monotonic() - stopped < outage:
            time.sleep(1.0)
            samples.append((time.monotonic() - stopped, rss_kib(relay), held(db)))
    assert ledger.api_errors == [], ledger.api_errors[:5]
    # The relay claims nothing while the broker is away (a lease taken just before the
    # stop has run out after 5 s): the backlog stays in MySQL, not in the relay.
    holding = [(round(at), n) for at, _, n in samples if at >= stack.settings.lease_seconds + 1]
    assert all(n == 0 for _, n in holding), f"relay holds rows while down: {holding}"
    backlog = unpublished(db)
    assert backlog >= 0.8 * load.sent, (backlog, load.sent)  # the outbox grew...
    # ...and the relay kept none of it: its RSS after the warm-up (connection attempts,
    # first failures logged) stays within a small bound to the end.
    warm = [rss for at, rss, _ in samples if at >= 5.0]
    growth_mib = (max(warm) - warm[0]) / MIB
    print(
        f"\noutage {outage:.0f}s at {rate:.0f}/s: backlog {backlog}, relay RSS "
        f"{warm[0] / MIB:.1f} -> max {max(warm) / MIB:.1f} MiB ({growth_mib:+.2f} MiB)"
    )
    assert growth_mib < 4.0, f"relay RSS grew {growth_mib:.1f} MiB during the outage"

    node.start_app()
    drained = wait_until(lambda: unpublished(db) == 0, 30 + backlog / 200, "backlog drained")
    print(f"backlog of {backlog} published {drained:.1f}s after start_app")
    assert drained < 5.0 + backlog / 500, f"backlog {backlog} took {drained:.1f}s"
    quiesce(stack, ledger, db, timeout=120 + backlog / 100)
    figures = settle(f"broker outage {outage:.0f} s under load", ledger, db, smtp_sink)
    figures.assert_guarantees()


def test_broker_killed_during_a_drain(
    stack: Stack, db: Engine, smtp_sink: SmtpSink, node: RabbitNode
) -> None:
    """kill -9 of the node while the relay publishes and the worker sends: unconfirmed
    rows are published again (duplicates in the queue allowed), none at the SMTP server."""
    n = scaled(1500)
    stack.start_api()
    stack.start("worker")
    relay = stack.start("relay")
    wait_until(lambda: connected_times(relay) == 1, 20, "relay connected")
    ledger = Ledger()
    # Due over 10 s: the relay is publishing (rows waiting, confirms pending) at the kill.
    ledger.submit(
        stack.client(API_KEY),
        bodies(n, datetime.now(UTC) + timedelta(seconds=1), spread_seconds=10.0),
        batch=100,
    )
    wait_until(
        lambda: len(published_rows(db)) >= n // 3 and smtp_sink.received, 60, "a third published"
    )
    node.kill()
    left = unpublished(db)
    assert left > 0, "the relay had published everything before the kill"
    time.sleep(2.0)
    node.boot()
    quiesce(stack, ledger, db, timeout=120)
    again = republished(db)
    print(f"\nkilled with {left} rows unpublished; {again} rows published again afterwards")
    assert "rabbitmq connection lost" in relay.log()
    assert again > 0, "no row was in flight at the kill: the scenario tested nothing"
    figures = settle("broker killed (kill -9) mid-drain", ledger, db, smtp_sink)
    figures.assert_guarantees(max_dup=0)


def test_hung_broker_and_resource_alarm(
    stack: Stack, db: Engine, smtp_sink: SmtpSink, node: RabbitNode
) -> None:
    """SIGSTOP the node past the relay's confirm timeout, then a memory alarm: the relay
    gives up on its publishes instead of hanging, flags nothing it has no confirm for,
    and publishes everything once the broker is back. No worker runs until the end, so
    the queue shows exactly what reached the broker."""
    url = stack.settings.rabbitmq_url.get_secret_value()
    queue = stack.settings.email_queue
    stack.start_api()
    relay = stack.start("relay")
    wait_until(lambda: connected_times(relay) == 1, 20, "relay connected")
    ledger = Ledger()
    client = stack.client(API_KEY)
    hang = 8.0  # longer than the relay's confirm timeout (half the 5 s lease, see publisher)

    # 1. Hung broker: rows fall due before, during and after the freeze. They start falling
    # due once the API has surely taken them all (200/s at least), so that many are still
    # to come when the broker freezes.
    n = scaled(600)
    start = datetime.now(UTC) + timedelta(seconds=1 + n / 200)
    ledger.submit(client, bodies(n, start, spread_seconds=6.0))
    wait_until(lambda: len(published_rows(db)) > 0, 30 + n / 200, "publishing under way")
    node.freeze()
    frozen_at = time.monotonic()
    assert unpublished(db) > n / 4, "too few rows left to fall due during the freeze"
    try:
        time.sleep(1.5)  # confirms that arrived before the freeze get recorded
        flagged = set(published_rows(db))
        time.sleep(max(0.0, hang - (time.monotonic() - frozen_at)))
        # A frozen broker confirms nothing: not one more row may have been flagged.
        assert set(published_rows(db)) == flagged, "rows flagged published without a confirm"
        # The relay gave up on its publishes (and did not hang waiting for them).
        assert relay.alive()
        assert "no publisher confirm within" in relay.log()
    finally:
        node.thaw()
    wait_until(lambda: unpublished(db) == 0, 60, "everything published after the thaw")

    # 2. Resource alarm: the broker blocks publishers.
    before_alarm = len(published_rows(db))
    node.memory_alarm()
    try:
        ledger.submit(client, bodies(scaled(300), datetime.now(UTC), spread_seconds=3.0), batch=100)
        wait_until(lambda: "blocked this connection" in relay.log(), 20, "relay sees the alarm")
        time.sleep(hang)
        assert relay.alive()
        assert unpublished(db) > 0  # held back, not flagged
    finally:
        node.clear_memory_alarm()
    wait_until(lambda: unpublished(db) == 0, 60, "everything published after the alarm")
    assert len(published_rows(db)) > before_alarm

    # Every row flagged published has its message in the queue (duplicates allowed).
    in_queue = set(queue_contents(url, queue))
    missing = [row for row in published_rows(db).values() if row not in in_queue]
    assert missing == [], f"{len(missing)} rows flagged published, not in the queue"

    stack.start("worker")
    quiesce(stack, ledger, db, timeout=120)
    figures = settle("hung broker (SIGSTOP) + memory alarm", ledger, db, smtp_sink)
    figures.assert_guarantees(max_dup=0)
