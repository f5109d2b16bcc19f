"""A private RabbitMQ node that a fault test may stop, kill, freeze or starve at will.

The shared broker (127.0.0.1:5672) serves other tests and benchmarks at the same time,
so the broker scenarios never touch it: they boot a second node of the same
installation, on loopback ports of its own, with its own name, data and logs in a
temporary directory, its own Erlang cookie (``HOME`` points there) and no plugins (so
no management listener to clash with). Booting takes ~8 s here, so one node serves a
whole test module.

    with RabbitNode.booted(tmp_dir) as node:
        node.url                       # amqp://guest:guest@127.0.0.1:<port>/%2F
        node.stop_app(); node.start_app()
        node.kill(); node.boot()        # kill -9 the Erlang VM, then start it again
        node.freeze(); node.thaw()      # SIGSTOP / SIGCONT
        node.memory_alarm(); node.clear_memory_alarm()

Only the OS process of this node is ever signalled (its pid comes from the node's own
pid file); ``close`` stops it and deletes its directory.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pika

from services.core.broker import connection_parameters
from tests.support.smtp_sink import free_port

# The Debian wrappers in /usr/sbin switch to the `rabbitmq` user and drop the
# environment; the scripts they call take it as it is.
SBIN = Path(os.environ.get("RABBITMQ_SBIN", "/usr/lib/rabbitmq/bin"))
BOOT_SECONDS = 120.0
DEFAULT_WATERMARK = "0.4"


def available() -> str | None:
    """None when a private node can be booted here, else why not."""
    for tool in ("rabbitmq-server", "rabbitmqctl"):
        if not (SBIN / tool).exists():
            return f"{SBIN / tool} not found (set RABBITMQ_SBIN)"
    return None


class RabbitNode:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.name = f"emailsched_faults_{secrets.token_hex(4)}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"
        self.pid_file = base / "beam.pid"
        home = base / "home"
        home.mkdir(parents=True, exist_ok=True)
        (base / "enabled_plugins").write_text("[].\n")
        (base / "rabbitmq-env.conf").write_text("")  # not /etc/rabbitmq's NODENAME & co
        (base / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{self.port}\n")
        self.env = {
            **os.environ,
            "HOME": str(home),  # its own Erlang cookie, shared with our rabbitmqctl calls
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(base / "log"),
            "RABBITMQ_PID_FILE": str(self.pid_file),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
            "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }
        self.env.pop("ERL_FLAGS", None)
        self.beam_pid: int | None = None
        self._frozen = False

    @classmethod
    @contextlib.contextmanager
    def booted(cls, base: Path) -> Iterator[RabbitNode]:
        node = cls(base)
        try:
            node.boot()
            yield node
        finally:
            node.close()

    # --- life cycle ----------------------------------------------------------------

    def boot(self) -> None:
        """Start the Erlang VM (detached) and wait until AMQP answers."""
        subprocess.run(
            [str(SBIN / "rabbitmq-server"), "-detached"],
            env=self.env,
            cwd=self.base,
            check=True,
            capture_output=True,
            timeout=60,
        )
        deadline = time.monotonic() + BOOT_SECONDS
        # await_startup fails at once while the VM has not registered its name yet.
        while self.ctl("await_startup", "--timeout", "5", check=False, timeout=30).returncode:
            if time.monotonic() > deadline:
                raise AssertionError(f"node {self.name} did not boot:\n{self.log_tail()}")
            time.sleep(0.5)
        self.beam_pid = int(self.pid_file.read_text().strip())
        self.wait_ready()

    def close(self) -> None:
        """Stop the node whatever state it is in (frozen, app stopped, dead); delete it."""
        try:
            if self.beam_pid is not None and _alive(self.beam_pid):
                self.thaw()
                stopped = self.ctl("stop", check=False, timeout=60).returncode == 0
                if not stopped and _alive(self.beam_pid):
                    os.kill(self.beam_pid, signal.SIGKILL)
                _wait_gone(self.beam_pid, 30)
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    def stop_app(self) -> None:
        self.ctl("stop_app")

    def start_app(self) -> None:
        self.ctl("start_app", timeout=120)
        self.wait_ready()

    def kill(self) -> None:
        """kill -9 the node's Erlang VM (nothing flushed, no goodbye to clients)."""
        assert self.beam_pid is not None
        os.kill(self.beam_pid, signal.SIGKILL)
        _wait_gone(self.beam_pid, 30)
        self.beam_pid = None
        self._frozen = False

    def freeze(self) -> None:
        """SIGSTOP the VM: sockets stay open, nothing answers (a hung broker)."""
        assert self.beam_pid is not None
        os.kill(self.beam_pid, signal.SIGSTOP)
        self._frozen = True

    def thaw(self) -> None:
        if self._frozen and self.beam_pid is not None:
            os.kill(self.beam_pid, signal.SIGCONT)
        self._frozen = False

    def memory_alarm(self) -> None:
        """A watermark no node can stay under: publishers get blocked."""
        self.ctl("set_vm_memory_high_watermark", "0.0000001")

    def clear_memory_alarm(self) -> None:
        self.ctl("set_vm_memory_high_watermark", DEFAULT_WATERMARK)

    def ensure_running(self) -> None:
        """Whatever a test did, leave the node running, its app started, no alarm."""
        self.thaw()
        if self.beam_pid is None or not _alive(self.beam_pid):
            self.boot()
            return
        self.ctl("start_app", check=False, timeout=120)
        self.ctl("set_vm_memory_high_watermark", DEFAULT_WATERMARK, check=False)
        self.wait_ready()

    # --- helpers -------------------------------------------------------------------

    def ctl(
        self, *args: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(SBIN / "rabbitmqctl"), "-n", self.name, *args],
            env=self.env,
            cwd=self.base,
            check=check,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                pika.BlockingConnection(connection_parameters(self.url)).close()
                return
            except pika.exceptions.AMQPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def log_tail(self, chars: int = 4000) -> str:
        log = self.base / "log" / f"{self.name}.log"
        return log.read_text(errors="replace")[-chars:] if log.exists() else "(no log)"

    def rss_kib(self) -> int:
        assert self.beam_pid is not None
        return _rss_kib(self.beam_pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is gone for our purposes
    with contextlib.suppress(OSError):
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    return True


def _wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")
