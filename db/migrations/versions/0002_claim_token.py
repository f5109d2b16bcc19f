"""emails.claim_token: which worker batch holds an email while it is `sending`.

A worker claims many emails with one UPDATE and reads back the rows carrying its token.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("emails", sa.Column("claim_token", sa.CHAR(length=16), nullable=True))


def downgrade() -> None:
    op.drop_column("emails", "claim_token")
