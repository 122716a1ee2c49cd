"""face tracks: a track id per face, indexed per job and track

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("faces", schema=None) as batch_op:
        batch_op.add_column(sa.Column("track", sa.Integer(), nullable=True))
        batch_op.create_index("ix_faces_job_track_time", ["job_id", "track", "time_ms"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("faces", schema=None) as batch_op:
        batch_op.drop_index("ix_faces_job_track_time")
        batch_op.drop_column("track")
