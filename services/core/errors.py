"""The error tree. Everything the package raises on purpose derives from one base.

    SchedulerError
    ├── NotFound              the email does not exist for this API key
    ├── Conflict              the email's status forbids the change (cancel sent, ...)
    ├── IdempotencyError
    │   ├── IdempotencyMismatch   same key, other body
    │   └── IdempotencyInFlight   same key, first request not finished
    ├── PoisonMessage         a broker message nobody can process -> dead-letter queue
    └── DeliveryError         one SMTP attempt failed
        ├── TransientDelivery     connection trouble, 4xx: retry with backoff
        └── PermanentDelivery     5xx: fail now

HTTP status codes and ack/nack/reject decisions are made from these types at the
edges (``api``, ``worker``), never below them.
"""

from __future__ import annotations


class SchedulerError(Exception):
    """Base of every error this package raises on purpose."""


class NotFound(SchedulerError):
    pass


class Conflict(SchedulerError):
    pass


class IdempotencyError(SchedulerError):
    pass


class IdempotencyMismatch(IdempotencyError):
    pass


class IdempotencyInFlight(IdempotencyError):
    pass


class PoisonMessage(SchedulerError):
    pass


class DeliveryError(SchedulerError):
    def __init__(self, message: str, smtp_code: int | None = None) -> None:
        super().__init__(message)
        self.smtp_code = smtp_code


class TransientDelivery(DeliveryError):
    pass


class PermanentDelivery(DeliveryError):
    pass
