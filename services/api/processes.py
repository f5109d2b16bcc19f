"""``API_WORKERS`` > 1: that many server processes, each listening on a socket of its own.

uvicorn's own supervisor binds one socket and hands it to every process. The kernel then
wakes the process that most recently waited in ``accept``, and it takes every connection
queued by then: eight keep-alive clients connecting together landed 7 and 1 on two
processes, so one core served nearly all the load while the other idled. Here each
process binds the address itself with ``SO_REUSEPORT`` and the kernel spreads new
connections over the processes by a hash of their addresses and ports (Linux; nginx's
``reuseport`` and gunicorn's ``reuse_port`` do the same).

The supervisor passes SIGTERM and SIGINT on, waits while each process finishes its
requests (uvicorn's graceful shutdown), and returns; a process that ends on its own is
replaced.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import socket
import time
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any

import uvicorn

from services.api.app import app_from_environment

log = logging.getLogger("services.api")

_SPAWN = multiprocessing.get_context("spawn")
RESTART_PAUSE_SECONDS = 1.0
STOP_MARGIN_SECONDS = 10.0  # beyond the graceful shutdown, before a process is killed


def listener(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` in the port's ``SO_REUSEPORT`` group."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def serve(workers: int, options: dict[str, Any], graceful_seconds: float) -> int:
    """Run ``workers`` server processes until SIGTERM or SIGINT; 0 once all have ended.

    ``options`` are uvicorn's; each process builds its app from the environment.
    """
    listener(options["host"], options["port"]).close()  # the address can be had, or OSError
    stop: list[int] = []

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop.append(signum)

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    processes = [_start(options) for _ in range(workers)]
    while not stop:
        ended = set(wait([p.sentinel for p in processes], timeout=0.5))
        for index, process in enumerate(processes):
            if process.sentinel in ended and not stop:
                # The sentinel is ready once the process has closed its files, a moment
                # before it can be reaped: until then its exit code reads None.
                process.join()
                log.error(
                    "api process %s ended with status %s; starting another",
                    process.pid,
                    process.exitcode,
                )
                time.sleep(RESTART_PAUSE_SECONDS)
                processes[index] = _start(options)
    log.info("api stopping on %s", signal.Signals(stop[0]).name)
    for process in processes:
        if process.is_alive():
            process.terminate()  # SIGTERM: uvicorn finishes the requests in flight
    for process in processes:
        process.join(graceful_seconds + STOP_MARGIN_SECONDS)
        if process.is_alive():
            log.error("api process %s did not stop in time; killing it", process.pid)
            process.kill()
            process.join()
    return 0


def _start(options: dict[str, Any]) -> BaseProcess:
    process = _SPAWN.Process(target=_serve_one, args=(options,), name="api-server")
    process.start()
    return process


def _serve_one(options: dict[str, Any]) -> None:
    """One server process: its own app, its own listener; exits 0 after a stop signal."""
    signal.signal(signal.SIGTERM, _exit_cleanly)
    signal.signal(signal.SIGINT, _exit_cleanly)
    app = app_from_environment()
    sock = listener(options["host"], options["port"])
    uvicorn.Server(uvicorn.Config(app, **options)).run(sockets=[sock])


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    # uvicorn raises the signal again after its graceful shutdown, for the handler that
    # was there before it: stopping on request is a clean stop.
    raise SystemExit(0)
