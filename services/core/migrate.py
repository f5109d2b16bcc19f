"""``make migrate``: create the database if it is missing, then upgrade to head."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.engine import make_url

from services.core.db import create_db_engine, database_name
from services.core.logs import configure_logging
from services.core.settings import Settings, mask_url

log = logging.getLogger(__name__)


def _pyproject() -> Path:
    """Alembic is configured in pyproject.toml (``[tool.alembic]``), next to ``db/``: the
    repository root, or the working directory of an installed copy (the image's /app)."""
    for root in (Path(__file__).resolve().parents[2], Path.cwd()):
        if (root / "pyproject.toml").is_file() and (root / "db" / "migrations").is_dir():
            return root / "pyproject.toml"
    raise SystemExit("pyproject.toml with db/migrations not found: run from the project root")


def alembic_config(url: str) -> Config:
    config = Config(toml_file=str(_pyproject()))
    config.cmd_opts = argparse.Namespace(x=[f"url={url}"])
    return config


def create_database(url: str) -> None:
    name = database_name(url)
    server = create_db_engine(make_url(url).set(database="").render_as_string(hide_password=False))
    with server.begin() as conn:
        quoted = conn.dialect.identifier_preparer.quote(name)
        conn.execute(sa.text(f"CREATE DATABASE IF NOT EXISTS {quoted} CHARACTER SET utf8mb4"))
    server.dispose()


def migrate(url: str) -> None:
    create_database(url)
    command.upgrade(alembic_config(url), "head")


def main() -> None:
    settings = Settings()
    configure_logging(settings.log_level)
    url = settings.database_url.get_secret_value()
    log.info("migrating %s", mask_url(url))
    migrate(url)
    log.info("database at head")


if __name__ == "__main__":
    main()
