"""initial timeline schema

Revision ID: 0001
Revises:
Create Date: 2026-11-27 21:57:00.783762
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_key", sa.String(length=64), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("duration_s", sa.Float(), nullable=True),
        sa.Column("fps", sa.Float(), nullable=True),
        sa.Column("frame_count", sa.Integer(), nullable=True),
        sa.Column("width", sa.Integer(), nullable=True),
        sa.Column("height", sa.Integer(), nullable=True),
        sa.Column("codec", sa.String(length=16), nullable=True),
        sa.Column("sample_fps", sa.Float(), nullable=False),
        sa.Column("start_s", sa.Float(), nullable=False),
        sa.Column("end_s", sa.Float(), nullable=True),
        sa.Column("model", sa.String(length=64), nullable=False),
        sa.Column("model_sha256", sa.String(length=64), nullable=False),
        sa.Column("detector", sa.String(length=64), nullable=False),
        sa.Column("frames_analyzed", sa.Integer(), nullable=False),
        sa.Column("faces_found", sa.Integer(), nullable=False),
        sa.Column("timings", sa.JSON(), nullable=True),
        sa.Column("worker", sa.String(length=128), nullable=True),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.text("(CURRENT_TIMESTAMP)"), nullable=False
        ),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("job_key"),
    )
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_jobs_sha256"), ["sha256"], unique=False)
        batch_op.create_index(batch_op.f("ix_jobs_status"), ["status"], unique=False)

    op.create_table(
        "faces",
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("frame_index", sa.Integer(), nullable=False),
        sa.Column("face", sa.SmallInteger(), nullable=False),
        sa.Column("time_ms", sa.Float(), nullable=False),
        sa.Column("x1", sa.Float(), nullable=False),
        sa.Column("y1", sa.Float(), nullable=False),
        sa.Column("x2", sa.Float(), nullable=False),
        sa.Column("y2", sa.Float(), nullable=False),
        sa.Column("det_score", sa.Float(), nullable=False),
        sa.Column("landmarks", sa.JSON(), nullable=False),
        sa.Column("angry", sa.Float(), nullable=False),
        sa.Column("disgust", sa.Float(), nullable=False),
        sa.Column("fear", sa.Float(), nullable=False),
        sa.Column("happy", sa.Float(), nullable=False),
        sa.Column("sad", sa.Float(), nullable=False),
        sa.Column("surprise", sa.Float(), nullable=False),
        sa.Column("neutral", sa.Float(), nullable=False),
        sa.Column("emotion", sa.String(length=16), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("job_id", "frame_index", "face"),
    )
    with op.batch_alter_table("faces", schema=None) as batch_op:
        batch_op.create_index("ix_faces_job_time", ["job_id", "time_ms"], unique=False)

    op.create_table(
        "frames",
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("frame_index", sa.Integer(), nullable=False),
        sa.Column("time_ms", sa.Float(), nullable=False),
        sa.Column("n_faces", sa.SmallInteger(), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("job_id", "frame_index"),
    )
    with op.batch_alter_table("frames", schema=None) as batch_op:
        batch_op.create_index("ix_frames_job_time", ["job_id", "time_ms"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("frames", schema=None) as batch_op:
        batch_op.drop_index("ix_frames_job_time")

    op.drop_table("frames")
    with op.batch_alter_table("faces", schema=None) as batch_op:
        batch_op.drop_index("ix_faces_job_time")

    op.drop_table("faces")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_jobs_status"))
        batch_op.drop_index(batch_op.f("ix_jobs_sha256"))

    op.drop_table("jobs")
