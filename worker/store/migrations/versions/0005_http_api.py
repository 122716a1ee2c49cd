"""HTTP API (fervid serve): job tags, callbacks and their deliveries, idempotency keys; the cancelled state is
a new value of the existing status columns (String(16)), which needs no change

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("tag", sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column("callback_url", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("webhook_status", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("webhook_next_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("webhook_deliveries", sa.JSON(), nullable=True))
        batch_op.create_index("ix_jobs_tag", ["tag"])
    op.create_table(
        "idempotency_keys",
        sa.Column("scope", sa.String(length=64), nullable=False),
        sa.Column("key", sa.String(length=200), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("response", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("scope", "key"),
    )


def downgrade() -> None:
    op.drop_table("idempotency_keys")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_tag")
        for c in ("webhook_deliveries", "webhook_next_at", "webhook_status", "callback_url", "tag"):
            batch_op.drop_column(c)
