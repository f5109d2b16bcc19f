"""Settings: the defaults promised by the contract, environment parsing, no leaked secrets."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from services.core.settings import Settings, mask_url

ROOT = Path(__file__).resolve().parents[2]

# The settings table of the contract (README "Settings"): name -> default.
CONTRACT_DEFAULTS: dict[str, object] = {
    "DATABASE_URL": "mysql+pymysql://root@127.0.0.1:3306/emailsched",
    "RABBITMQ_URL": "amqp://guest:guest@127.0.0.1:5672/%2F",
    "REDIS_URL": "redis://127.0.0.1:6379/0",
    "SMTP_HOST": "127.0.0.1",
    "SMTP_PORT": 1025,
    "SMTP_USERNAME": "",
    "SMTP_PASSWORD": "",
    "SMTP_SECURITY": "none",
    "SMTP_CA_FILE": "",
    "MAIL_FROM": "",
    "API_KEYS": (),
    "EMAIL_QUEUE": "emails",
    "MAX_ATTEMPTS": 5,
    "RETRY_BACKOFF_SECONDS": 30,
    "RETRY_BACKOFF_MAX_SECONDS": 3600,
    "RELAY_POLL_INTERVAL": 1.0,
    "RELAY_BATCH_SIZE": 500,
    "LEASE_SECONDS": 60,
    "MAX_REQUEST_BYTES": 1_048_576,
    "API_HOST": "127.0.0.1",
    "API_PORT": 8080,
}

SECRETS = {
    "database": "db-pass-5ecret",
    "rabbitmq": "mq-pass-5ecret",
    "redis": "redis-pass-5ecret",
    "smtp": "smtp-pass-5ecret",
    "key1": "api-key-5ecret-one",
    "key2": "api-key-5ecret-two",
}


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings read the environment case-insensitively: none of the runner's may leak in."""
    fields = {name.upper() for name in Settings.model_fields}
    for name in list(os.environ):
        if name.upper() in fields:
            monkeypatch.delenv(name)


def plain(value: object) -> object:
    if hasattr(value, "get_secret_value"):
        return value.get_secret_value()
    if isinstance(value, tuple):
        return tuple(plain(item) for item in value)
    return value


def test_every_contract_setting_is_a_field() -> None:
    fields = {name.upper() for name in Settings.model_fields}
    assert set(CONTRACT_DEFAULTS) <= fields


@pytest.mark.parametrize(("name", "default"), sorted(CONTRACT_DEFAULTS.items()))
def test_default_matches_contract(name: str, default: object) -> None:
    settings = Settings(_env_file=None)
    assert plain(getattr(settings, name.lower())) == default


def test_values_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMTP_PORT", "2525")
    monkeypatch.setenv("SMTP_SECURITY", "starttls")
    monkeypatch.setenv("RELAY_POLL_INTERVAL", "0.25")
    monkeypatch.setenv("EMAIL_QUEUE", "emails_eu")
    settings = Settings(_env_file=None)
    assert settings.smtp_port == 2525
    assert settings.smtp_security == "starttls"
    assert settings.relay_poll_interval == 0.25
    assert settings.dlq_name == "emails_eu.dlq"


def test_api_keys_are_a_comma_separated_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("API_KEYS", f" {SECRETS['key1']} ,{SECRETS['key2']},, ")
    settings = Settings(_env_file=None)
    assert plain(settings.api_keys) == (SECRETS["key1"], SECRETS["key2"])


def test_a_placeholder_api_key_is_refused() -> None:
    with pytest.raises(ValidationError):
        Settings(_env_file=None, api_keys="changeme")


def test_an_unknown_smtp_security_is_refused() -> None:
    with pytest.raises(ValidationError):
        Settings(_env_file=None, smtp_security="ssl")


def test_empty_redis_url_turns_redis_off() -> None:
    assert Settings(_env_file=None).redis_enabled
    assert not Settings(_env_file=None, redis_url="").redis_enabled


def test_the_env_file_is_read(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text(f"API_KEYS={SECRETS['key1']}\nMAIL_FROM=me@example.com\n", encoding="utf-8")
    settings = Settings(_env_file=env_file)
    assert plain(settings.api_keys) == (SECRETS["key1"],)
    assert settings.mail_from == "me@example.com"


def test_no_secret_in_repr_str_or_json() -> None:
    settings = Settings(
        _env_file=None,
        database_url=f"mysql+pymysql://root:{SECRETS['database']}@db:3306/emailsched",
        rabbitmq_url=f"amqp://app:{SECRETS['rabbitmq']}@mq:5672/%2F",
        redis_url=f"redis://:{SECRETS['redis']}@cache:6379/0",
        smtp_username="mailer",
        smtp_password=SECRETS["smtp"],
        api_keys=f"{SECRETS['key1']},{SECRETS['key2']}",
    )
    shown = "\n".join(
        [
            repr(settings),
            str(settings),
            f"{settings}",
            settings.model_dump_json(),
            repr(settings.model_dump()),
        ]
    )
    for secret in SECRETS.values():
        assert secret not in shown
    assert plain(settings.smtp_password) == SECRETS["smtp"]  # still usable where needed


def test_mask_url_hides_only_the_password() -> None:
    url = f"amqp://app:{SECRETS['rabbitmq']}@mq:5672/%2F"
    assert mask_url(url) == "amqp://app:***@mq:5672/%2F"
    assert mask_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


def test_every_setting_is_documented_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^\|\s*`([A-Z_]+)`", readme, flags=re.MULTILINE))
    documented |= set(re.findall(r"^\|\s*`[A-Z_]+`,\s*`([A-Z_]+)`", readme, flags=re.MULTILINE))
    missing = {name.upper() for name in Settings.model_fields} - documented
    assert not missing, f"settings missing from the README table: {sorted(missing)}"
