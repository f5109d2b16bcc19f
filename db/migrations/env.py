"""Alembic environment: the URL comes from the same settings every process reads.

``-x url=...`` overrides it (the migration tests use a scratch database).
"""

from __future__ import annotations

from alembic import context

from services.core.db import create_db_engine
from services.core.schema import metadata
from services.core.settings import Settings


def database_url() -> str:
    override = context.get_x_argument(as_dictionary=True).get("url")
    return override or Settings().database_url.get_secret_value()


def run_migrations_offline() -> None:
    context.configure(url=database_url(), target_metadata=metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = create_db_engine(database_url(), pool_size=1)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=metadata, compare_type=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
