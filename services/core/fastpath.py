"""Redis, the optional fast path. Never the source of truth: every method here may fail
or find nothing, and the system stays correct (only slower). ``REDIS_URL=""`` turns it off.

- wake-ups: the API announces "an email is due now"; relays listening poll at once
  instead of waiting for their next interval.
- versions: after a worker records an outcome it remembers the email's version; a
  message carrying an older version is then dropped without a database round trip.
  Versions only grow, so a stale cache can only make the worker ask MySQL.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import redis

log = logging.getLogger(__name__)

VERSION_TTL_SECONDS = 24 * 3600
_QUIET_SECONDS = 30.0  # one warning per this many seconds while Redis is down
_BACKOFF_SECONDS = 5.0  # after a failure, skip Redis this long: a dead Redis costs nothing


class FastPath:
    def __init__(self, url: str, namespace: str) -> None:
        self._client = (
            redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
            if url.strip()
            else None
        )
        self._prefix = f"emailsched:{namespace}:"
        self._last_warning = 0.0
        self._down_until = 0.0

    @property
    def enabled(self) -> bool:
        return self._client is not None

    def _usable(self) -> redis.Redis | None:
        if self._client is None or time.monotonic() < self._down_until:
            return None
        return self._client

    @property
    def wakeup_channel(self) -> str:
        return self._prefix + "wakeup"

    def notify_due(self) -> None:
        client = self._usable()
        if client is None:
            return
        try:
            client.publish(self.wakeup_channel, b"1")
        except redis.RedisError as exc:
            self._warn(exc)

    def wakeups(self, timeout: float) -> Iterator[bool]:
        """Yield True on each wake-up, False on each ``timeout`` without one.

        Reconnects by itself; while Redis is away it yields False every ``timeout``.
        """
        while True:
            if self._client is None:
                time.sleep(timeout)
                yield False
                continue
            try:
                pubsub = self._client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call,unused-ignore]
                pubsub.subscribe(self.wakeup_channel)
                try:
                    while True:
                        yield pubsub.get_message(timeout=timeout) is not None
                finally:
                    pubsub.close()
            except redis.RedisError as exc:
                self._warn(exc)
                time.sleep(timeout)
                yield False

    def known_versions(self, email_ids: list[str]) -> dict[str, int]:
        """The versions remembered for these emails (one round trip); absent ones left out."""
        client = self._usable()
        if client is None or not email_ids:
            return {}
        try:
            values = client.mget([self._prefix + "v:" + email_id for email_id in email_ids])
        except redis.RedisError as exc:
            self._warn(exc)
            return {}
        known: dict[str, int] = {}
        for email_id, value in zip(email_ids, values, strict=True):
            try:
                if isinstance(value, bytes | str):
                    known[email_id] = int(value)
            except ValueError:
                continue
        return known

    def remember_versions(self, versions: dict[str, int]) -> None:
        client = self._usable()
        if client is None or not versions:
            return
        try:
            with client.pipeline(transaction=False) as pipe:
                for email_id, version in versions.items():
                    pipe.set(self._prefix + "v:" + email_id, version, ex=VERSION_TTL_SECONDS)
                pipe.execute()
        except redis.RedisError as exc:
            self._warn(exc)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def _warn(self, exc: Exception) -> None:
        now = time.monotonic()
        self._down_until = now + _BACKOFF_SECONDS
        if now - self._last_warning >= _QUIET_SECONDS:
            self._last_warning = now
            log.warning("redis unavailable, continuing without the fast path: %s", exc)
