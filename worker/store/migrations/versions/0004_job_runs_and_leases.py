"""reliable queue: job runs (generations), segment leases and deaths, settings stored on the job

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("run", sa.Integer(), nullable=False, server_default="1"))
        batch_op.add_column(sa.Column("score_threshold", sa.Float(), nullable=False, server_default="0.9"))
        batch_op.add_column(sa.Column("min_face", sa.Integer(), nullable=False, server_default="48"))
        batch_op.add_column(sa.Column("max_faces", sa.Integer(), nullable=False, server_default="64"))
        batch_op.alter_column("model", existing_type=sa.String(length=64), type_=sa.Text())
        batch_op.alter_column("frame_count", existing_type=sa.Integer(), type_=sa.BigInteger())
    with op.batch_alter_table("segments", schema=None) as batch_op:
        batch_op.add_column(sa.Column("run", sa.Integer(), nullable=False, server_default="1"))
        batch_op.add_column(sa.Column("deaths", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("lease_owner", sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("enqueued_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index("ix_segments_status_lease", ["status", "lease_until"])


def downgrade() -> None:
    with op.batch_alter_table("segments", schema=None) as batch_op:
        batch_op.drop_index("ix_segments_status_lease")
        for c in ("enqueued_at", "lease_until", "lease_owner", "deaths", "run"):
            batch_op.drop_column(c)
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.alter_column("frame_count", existing_type=sa.BigInteger(), type_=sa.Integer())
        batch_op.alter_column("model", existing_type=sa.Text(), type_=sa.String(length=64))
        for c in ("max_faces", "min_face", "score_threshold", "run"):
            batch_op.drop_column(c)
