"""The one message on the broker: "deliver email ``email_id`` as of ``version``".

It carries no content. The worker reads the email from MySQL and sends it only while
the email's version still equals the message's, so a message published before a cancel,
a reschedule or another worker's claim is dropped.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from services.core.errors import PoisonMessage

CONTENT_TYPE = "application/json"
# Email ids are UUIDs (services.core.ids). Anything else names no email; refusing it here
# keeps it away from Redis and MySQL (a lone surrogate in a JSON string, for one, cannot
# even be encoded for them).
_EMAIL_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@dataclass(frozen=True, slots=True)
class DeliveryMessage:
    email_id: str
    version: int

    def encode(self) -> bytes:
        return json.dumps({"email_id": self.email_id, "version": self.version}).encode()

    @property
    def message_id(self) -> str:
        return f"{self.email_id}:{self.version}"

    @classmethod
    def decode(cls, body: bytes) -> DeliveryMessage:
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PoisonMessage(f"not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise PoisonMessage("not a JSON object")
        email_id, version = data.get("email_id"), data.get("version")
        if not isinstance(email_id, str) or not _EMAIL_ID.fullmatch(email_id):
            raise PoisonMessage(f"email_id missing or malformed: {str(email_id)[:40]!a}")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise PoisonMessage("version missing or malformed")
        return cls(email_id=email_id, version=version)
