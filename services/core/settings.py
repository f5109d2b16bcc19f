"""Every setting of every process, read from the environment (or a ``.env`` file).

Built once when a process starts and passed in; never read at import time. Secrets are
``SecretStr`` (and URLs with passwords are shown masked) so a ``repr`` or a log line
never carries one.
"""

from __future__ import annotations

from typing import Annotated, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def mask_url(url: str) -> str:
    """``scheme://user:***@host/db`` - a URL fit for a log line."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", frozen=True)

    database_url: SecretStr = SecretStr("mysql+pymysql://root@127.0.0.1:3306/emailsched")
    rabbitmq_url: SecretStr = SecretStr("amqp://guest:guest@127.0.0.1:5672/%2F")
    redis_url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")

    smtp_host: str = "127.0.0.1"
    smtp_port: int = Field(1025, ge=1, le=65535)
    smtp_username: str = ""
    smtp_password: SecretStr = SecretStr("")
    smtp_security: Literal["none", "starttls", "tls"] = "none"
    smtp_ca_file: str = ""
    smtp_timeout: float = Field(30.0, gt=0)
    mail_from: str = ""

    api_host: str = "127.0.0.1"
    api_port: int = Field(8080, ge=1, le=65535)
    api_workers: int = Field(1, ge=1, le=64)
    api_threads: int = Field(4, ge=1, le=64)
    api_access_log: bool = False
    api_keys: Annotated[tuple[SecretStr, ...], NoDecode] = ()
    max_request_bytes: int = Field(1_048_576, ge=1024)

    email_queue: str = Field("emails", min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.:-]+$")
    max_attempts: int = Field(5, ge=1, le=100)
    retry_backoff_seconds: float = Field(30.0, ge=0)
    retry_backoff_max_seconds: float = Field(3600.0, ge=0)

    relay_poll_interval: float = Field(1.0, gt=0)
    relay_batch_size: int = Field(500, ge=1, le=10_000)
    lease_seconds: float = Field(60.0, gt=0)

    worker_prefetch: int = Field(50, ge=1, le=1000)

    log_level: str = "INFO"

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(key.strip() for key in value.split(",") if key.strip())
        return value

    @field_validator("api_keys")
    @classmethod
    def _refuse_weak_keys(cls, keys: tuple[SecretStr, ...]) -> tuple[SecretStr, ...]:
        for key in keys:
            secret = key.get_secret_value()
            if secret.lower() in {"changeme", "changethis", "secret", "password"}:
                raise ValueError("API_KEYS holds a placeholder key; generate a real one")
        return keys

    @property
    def dlq_name(self) -> str:
        return f"{self.email_queue}.dlq"

    @property
    def redis_enabled(self) -> bool:
        return bool(self.redis_url.get_secret_value().strip())
