"""A loopback TCP proxy that a test puts between a process and MySQL, RabbitMQ or SMTP,
and then breaks on purpose.

    proxy = FaultProxy(target_port=3306); proxy.start()   # listen on proxy.port
    proxy.cut()        # refuse new connections and reset the open ones (link down)
    proxy.cut(reset_after=0.1)  # accept, then reset (a balancer with nothing behind it)
    proxy.restore()    # forward again
    proxy.delay = 0.2  # add 200 ms to every chunk, both ways
    proxy.blackhole()  # accept, then never forward a byte (a hung peer / half-open link)
    proxy.client_chunks = []  # record each read from a client: what went in one write

It runs its own asyncio loop in a daemon thread; every method is thread-safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Coroutine
from typing import Any

from tests.support.smtp_sink import free_port


class FaultProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self.delay = 0.0
        self._mode = "pass"  # pass | cut | blackhole
        self._reset_after = 0.0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.connections = 0
        self.attempts: list[float] = []  # time.monotonic() of every connection accepted
        self.client_chunks: list[bytes] | None = None  # a list: every read from a client

    def start(self) -> FaultProxy:
        self._thread.start()
        self._call(self._start())
        return self

    def stop(self) -> None:
        self._call(self._close_all())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def cut(self, reset_after: float = 0.0) -> None:
        self._mode = "cut"
        self._reset_after = reset_after
        self._call(self._reset_all())

    def blackhole(self) -> None:
        self._mode = "blackhole"

    def restore(self) -> None:
        self._mode = "pass"

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- inside the loop -------------------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, None]) -> None:
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def _close_all(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._reset_all()

    async def _reset_all(self) -> None:
        for writer in list(self._writers):
            _reset(writer)
        self._writers.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.attempts.append(time.monotonic())
        if self._mode == "cut":
            if self._reset_after:
                await asyncio.sleep(self._reset_after)
            _reset(writer)
            return
        self.connections += 1
        self._writers.add(writer)
        if self._mode == "blackhole":
            with contextlib.suppress(ConnectionError):
                await reader.read()  # swallow until the client gives up
            self._writers.discard(writer)
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            _reset(writer)
            return
        self._writers.add(up_writer)
        await asyncio.gather(
            self._pipe(reader, up_writer, self.client_chunks),
            self._pipe(up_reader, writer),
            return_exceptions=True,
        )
        for w in (writer, up_writer):
            self._writers.discard(w)
            w.close()

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        record: list[bytes] | None = None,
    ) -> None:
        try:
            while chunk := await reader.read(65536):
                if record is not None:
                    record.append(chunk)
                if self._mode == "blackhole":
                    continue  # a link that went silent mid-stream
                if self.delay:
                    await asyncio.sleep(self.delay)
                writer.write(chunk)
                await writer.drain()
        finally:
            with contextlib.suppress(OSError):
                writer.write_eof()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST rather than FIN: what a peer sees when the link or host dies."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
    writer.close()
