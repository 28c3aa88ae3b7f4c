"""spend_ledger

Revision ID: 0002
Revises: 0001
Create Date: 2025-01-02 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the column types as of this revision (models.py may move on).
_TS = sa.DateTime(timezone=True)
# Exact money: NUMERIC on PostgreSQL, an integer count of 1e-10 USD on SQLite (models.USD).
_USD = sa.Numeric(20, 10).with_variant(sa.BigInteger(), "sqlite")
_INDEXES = {
    "ix_spend_ledger_created_at": ["created_at"],
    "ix_spend_ledger_key_id_created_at": ["key_id", "created_at"],
    "ix_spend_ledger_team_created_at": ["team", "created_at"],
    "ix_spend_ledger_model_created_at": ["model", "created_at"],
}


def upgrade() -> None:
    op.create_table(
        "spend_ledger",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("key_id", sa.String(128), nullable=True),
        sa.Column("team", sa.String(200), nullable=True),
        sa.Column("model", sa.String(256), nullable=True),
        sa.Column("provider", sa.String(128), nullable=True),
        sa.Column("upstream_model", sa.String(256), nullable=True),
        sa.Column("route", sa.String(256), nullable=False),
        sa.Column("tokens_in", sa.Integer(), nullable=False),
        sa.Column("tokens_out", sa.Integer(), nullable=False),
        sa.Column("cached_tokens", sa.Integer(), nullable=True),
        sa.Column("cost_usd", _USD, nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("cache_status", sa.String(16), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
    )
    for name, columns in _INDEXES.items():
        op.create_index(name, "spend_ledger", columns)


def downgrade() -> None:
    for name in reversed(_INDEXES):
        op.drop_index(name, table_name="spend_ledger")
    op.drop_table("spend_ledger")
