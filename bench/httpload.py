"""The API load generator's client: keep-alive HTTP/1.1 over plain sockets.

The load generator shares the machine's two cores with the API it measures, so its
client must cost as little CPU as possible: httpx spent about a millisecond of Python
per request (and tens of milliseconds building an SSL context for every new client),
which the server then did not have. Here a request is rendered to bytes once and each
call is one ``sendall`` and a read of the status line, the headers and a
``Content-Length`` body - what wrk-style tools do. It speaks only what the API answers
(HTTP/1.1, ``Content-Length`` bodies); anything else raises.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit


class HttpConnection:
    """One keep-alive connection; reconnects when the server closed the last one."""

    def __init__(self, host: str, port: int, timeout: float = 30.0) -> None:
        self._address = (host, port)
        self._timeout = timeout
        self._sock: socket.socket | None = None
        self._reader: Any = None

    def _connect(self) -> socket.socket:
        sock = socket.create_connection(self._address, timeout=self._timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock, self._reader = sock, sock.makefile("rb")
        return sock

    def request(self, raw: bytes) -> tuple[int, bytes]:
        """Send a rendered request; (status, body) of the reply. A kept-alive connection
        the server has closed meanwhile (uvicorn drops idle ones after 5 s) is noticed
        before any reply byte arrives, and the request goes again on a new one."""
        reused = self._sock is not None
        try:
            return self._exchange(raw)
        except (ConnectionResetError, BrokenPipeError):
            self.close()
            if not reused:
                raise
            return self._exchange(raw)

    def _exchange(self, raw: bytes) -> tuple[int, bytes]:
        sock = self._sock or self._connect()
        try:
            sock.sendall(raw)
            return self._read_reply()
        except OSError:
            self.close()
            raise

    def _read_reply(self) -> tuple[int, bytes]:
        status_line = self._reader.readline(65537)
        if not status_line:
            raise ConnectionResetError("the server closed the connection")
        parts = status_line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise ConnectionError(f"not an HTTP/1.x status line: {status_line!r}")
        status, length, close = int(parts[1]), None, False
        while True:
            line = self._reader.readline(65537)
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                raise ConnectionError("chunked replies are not supported")
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
        body = self._reader.read(length) if length else b""
        if close:
            self.close()
        return status, body

    def close(self) -> None:
        if self._sock is not None:
            self._reader.close()
            self._sock.close()
        self._sock = self._reader = None


class HttpLoad:
    """Rendered requests and a pool of keep-alive connections, one per concurrent caller."""

    def __init__(self, base_url: str, api_key: str) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or parts.hostname is None or parts.port is None:
            raise ValueError(f"need http://host:port, got {base_url!r}")
        self._host, self._port = parts.hostname, parts.port
        self._api_key = api_key
        self._free: list[HttpConnection] = []
        self._all: list[HttpConnection] = []
        self._lock = threading.Lock()

    def render_post(self, path: str, payload: Any) -> bytes:
        body = json.dumps(payload).encode()
        head = (
            f"POST {path} HTTP/1.1\r\n"
            f"Host: {self._host}:{self._port}\r\n"
            f"Authorization: Bearer {self._api_key}\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body

    def render_get(self, path: str) -> bytes:
        return f"GET {path} HTTP/1.1\r\nHost: {self._host}:{self._port}\r\n\r\n".encode()

    @contextmanager
    def connection(self) -> Iterator[HttpConnection]:
        """A pooled connection for the caller's thread, returned afterwards."""
        with self._lock:
            conn = self._free.pop() if self._free else None
        if conn is None:
            conn = HttpConnection(self._host, self._port)
            with self._lock:
                self._all.append(conn)
        try:
            yield conn
        finally:
            with self._lock:
                self._free.append(conn)

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                conn.close()
            self._all.clear()
            self._free.clear()
