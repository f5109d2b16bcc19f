"""The real processes, started the way compose and `make up` start them
(``python -m services.api|relay|worker``), with settings passed as environment variables.

Every process is ours: we stop it by PID (SIGTERM, then SIGKILL if it hangs) and keep its
output in a log file that a failing test prints.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from pydantic import SecretStr

from services.core.settings import Settings
from tests.support.smtp_sink import free_port

ROOT = Path(__file__).resolve().parents[2]


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that makes a process build exactly ``settings``."""
    env: dict[str, str] = {}
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        elif isinstance(value, tuple):
            value = ",".join(
                v.get_secret_value() if isinstance(v, SecretStr) else str(v) for v in value
            )
        env[name.upper()] = str(value)
    return env


@dataclass
class Process:
    kind: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, signum: int) -> None:
        if self.alive():
            os.kill(self.pid, signum)

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM and wait; SIGKILL after ``timeout``. Returns the exit code."""
        self.signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(10)
            raise AssertionError(f"{self.kind} ignored SIGTERM for {timeout}s") from None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@dataclass
class Stack:
    settings: Settings
    workdir: Path
    processes: list[Process] = field(default_factory=list)
    clients: list[httpx.Client] = field(default_factory=list)
    api_url: str = ""

    def start(self, kind: str, *, crash: str | None = None, **extra_env: str) -> Process:
        """Start ``python -m services.<kind>``; with ``crash="after-250 3"`` the same
        process with a test-only crash hook planted (see tests/support/crashing.py)."""
        env = {**os.environ, **settings_env(self.settings), **extra_env}
        env.pop("CI", None)  # the processes must not behave differently under CI
        command = [sys.executable, "-m", f"services.{kind}"]
        if crash is not None:
            command = [sys.executable, "-m", "tests.support.crashing", kind, *crash.split()]
            env.update(EMAILSCHED_TESTING="1", PYTHONPATH=str(ROOT))
        log_path = self.workdir / f"{kind}-{len(self.processes)}.log"
        with log_path.open("wb") as out:
            popen = subprocess.Popen(
                command, cwd=self.workdir, env=env, stdout=out, stderr=subprocess.STDOUT
            )
        process = Process(kind, popen, log_path)
        self.processes.append(process)
        return process

    def start_api(self) -> Process:
        port = free_port()
        process = self.start("api", API_PORT=str(port), API_HOST="127.0.0.1")
        self.api_url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if not process.alive():
                raise AssertionError(f"api exited:\n{process.log()}")
            try:
                with httpx.Client(timeout=1) as probe:
                    if probe.get(self.api_url + "/healthz").status_code == 200:
                        return process
            except httpx.TransportError:
                time.sleep(0.1)
        raise AssertionError(f"api did not answer /healthz:\n{process.log()}")

    def client(self, api_key: str) -> httpx.Client:
        """An API client for ``api_key``; closed when the stack ends."""
        client = httpx.Client(
            base_url=self.api_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=10
        )
        self.clients.append(client)
        return client

    def stop_all(self) -> dict[str, int]:
        codes = {}
        for process in self.processes:
            if process.alive():
                codes[f"{process.kind}:{process.pid}"] = process.stop()
        return codes

    def logs(self) -> str:
        return "\n".join(f"--- {p.kind} ({p.pid}) ---\n{p.log()}" for p in self.processes)


@contextmanager
def running_stack(settings: Settings, workdir: Path) -> Iterator[Stack]:
    stack = Stack(settings, workdir)
    try:
        yield stack
    except BaseException:
        sys.stderr.write(stack.logs()[-20_000:])
        raise
    finally:
        for client in stack.clients:
            client.close()
        for process in stack.processes:
            if process.alive():
                process.popen.kill()
                process.popen.wait(10)
