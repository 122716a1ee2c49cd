"""The emotion timeline's tables (SQLAlchemy 2.0 ORM), and the vocabulary stored in them: job and segment states,
and the emotions' column names. Alembic migrations in worker/store/migrations create the tables.
"""

from __future__ import annotations

import datetime as dt
from enum import StrEnum

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    SmallInteger,
    String,
    Text,
    func,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from fervid.model.config import CLASSES
from fervid.worker.settings import Options, Settings

# The emotion columns of `faces` and of every timeline and export: the model's classes, in its output order, as
# lower-case column names. Derived here only; everything else in the worker reads EMOTIONS.
EMOTIONS: tuple[str, ...] = tuple(c.lower() for c in CLASSES)


class Status(StrEnum):
    """The state of a job, or of one of its segments: queued -> running -> done | failed | cancelled, only forward.

    Cancelled (by a user) ends a job like failed does: its segments that had not ended are cancelled with it, so
    no worker starts them, and a running one's write is discarded (its lease and its job are no longer active).

    The values are what the `status` columns hold (a StrEnum compares equal to them, so rows read back as plain
    strings still match)."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


ACTIVE = (Status.QUEUED, Status.RUNNING)  # a job or segment that has not ended
ENDED = (Status.DONE, Status.FAILED, Status.CANCELLED)


class Base(DeclarativeBase):
    pass


class Job(Base):
    """One video analysed with one set of settings. Rerunning the same job replaces its frames and faces."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # What identifies "the same job": content hash + settings + models (see worker.queue.jobs.job_key).
    job_key: Mapped[str] = mapped_column(String(64), unique=True)
    path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    status: Mapped[str] = mapped_column(String(16), default=Status.QUEUED, index=True)
    error: Mapped[str | None] = mapped_column(Text)
    # Video properties, as read from the container.
    duration_s: Mapped[float | None] = mapped_column(Float)
    fps: Mapped[float | None] = mapped_column(Float)
    frame_count: Mapped[int | None] = mapped_column(BigInteger)
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    codec: Mapped[str | None] = mapped_column(String(16))
    # Settings.
    sample_fps: Mapped[float] = mapped_column(Float)
    start_s: Mapped[float] = mapped_column(Float, default=Settings.start_s)
    end_s: Mapped[float | None] = mapped_column(Float)
    model: Mapped[str] = mapped_column(Text)  # a shipped model's name, or the absolute path of a weights file
    score_threshold: Mapped[float] = mapped_column(Float, default=Settings.score_threshold)
    min_face: Mapped[int] = mapped_column(Integer, default=Settings.min_face)
    max_faces: Mapped[int] = mapped_column(Integer, default=Settings.max_faces)
    model_sha256: Mapped[str] = mapped_column(String(64))
    detector: Mapped[str] = mapped_column(String(64))
    # Each submit that starts the job over (--force, or after a failure) is a new run; messages carry the run
    # they were queued for, and those of an older run are dropped.
    run: Mapped[int] = mapped_column(Integer, default=1)
    # Progress and results.
    frames_analyzed: Mapped[int] = mapped_column(Integer, default=0)
    faces_found: Mapped[int] = mapped_column(Integer, default=0)
    timings: Mapped[dict | None] = mapped_column(JSON)
    worker: Mapped[str | None] = mapped_column(String(128))
    # Queue settings (fervid submit): higher priority runs first; long videos run as segments of segment_s.
    priority: Mapped[int] = mapped_column(Integer, default=Options.priority)
    segment_s: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    # Set by HTTP clients (fervid serve): a label to find jobs by, and a URL told when the job ends.
    tag: Mapped[str | None] = mapped_column(String(128), index=True)
    callback_url: Mapped[str | None] = mapped_column(Text)
    # The callback's delivery: None (nothing to send yet), pending (due at webhook_next_at), delivered or failed;
    # every attempt is appended to webhook_deliveries ({at, attempt, status_code, error}).
    webhook_status: Mapped[str | None] = mapped_column(String(16))
    webhook_next_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    webhook_deliveries: Mapped[list | None] = mapped_column(JSON)


class IdempotencyKey(Base):
    """An HTTP request's Idempotency-Key and the answer it got, so that a repeated request gets the same one.
    `scope` separates callers (a hash of their token); `response` is None while the first request is in flight."""

    __tablename__ = "idempotency_keys"

    scope: Mapped[str] = mapped_column(String(64), primary_key=True)
    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    status_code: Mapped[int | None] = mapped_column(Integer)
    response: Mapped[dict | None] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Segment(Base):
    """A time range of a queued job, run as one task; the job is done when all of its segments are."""

    __tablename__ = "segments"

    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    idx: Mapped[int] = mapped_column(Integer, primary_key=True)
    start_s: Mapped[float] = mapped_column(Float)
    end_s: Mapped[float | None] = mapped_column(Float)  # None: to the end of the video
    run: Mapped[int] = mapped_column(Integer, default=1)
    status: Mapped[str] = mapped_column(String(16), default=Status.QUEUED)
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # each start; the latest one is the lease's token
    deaths: Mapped[int] = mapped_column(Integer, default=0)  # starts that never ended (the worker died)
    lease_owner: Mapped[str | None] = mapped_column(String(128))  # host:pid of the process running it
    lease_until: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    enqueued_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))  # None: no message sent yet
    frames: Mapped[int] = mapped_column(Integer, default=0)
    faces: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(128))
    gpu: Mapped[str | None] = mapped_column(String(32))
    error: Mapped[str | None] = mapped_column(Text)
    timings: Mapped[dict | None] = mapped_column(JSON)
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (Index("ix_segments_status_lease", "status", "lease_until"),)


class Frame(Base):
    """An analysed frame; frames without faces have n_faces = 0, so the timeline shows gaps, not holes."""

    __tablename__ = "frames"

    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    frame_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    time_ms: Mapped[float] = mapped_column(Float)
    n_faces: Mapped[int] = mapped_column(SmallInteger)

    __table_args__ = (Index("ix_frames_job_time", "job_id", "time_ms"),)


class Face(Base):
    """A face in an analysed frame: box, landmarks, detection score, the 7 probabilities and the top emotion."""

    __tablename__ = "faces"

    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    frame_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    face: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    time_ms: Mapped[float] = mapped_column(Float)
    track: Mapped[int | None] = mapped_column(Integer)  # the person, across frames (worker.store.rows)
    x1: Mapped[float] = mapped_column(Float)
    y1: Mapped[float] = mapped_column(Float)
    x2: Mapped[float] = mapped_column(Float)
    y2: Mapped[float] = mapped_column(Float)
    det_score: Mapped[float] = mapped_column(Float)
    landmarks: Mapped[list] = mapped_column(JSON)  # [[x, y] * 5]: eyes, nose, mouth corners
    # ...and one probability column per name in EMOTIONS, added below the class.
    emotion: Mapped[str] = mapped_column(String(16))  # the most probable of EMOTIONS

    __table_args__ = (
        Index("ix_faces_job_time", "job_id", "time_ms"),
        Index("ix_faces_job_track_time", "job_id", "track", "time_ms"),
    )


# The probability columns, from EMOTIONS rather than spelled out again (declarative maps columns added to a mapped
# class as if they had been declared in it).
for _emotion in EMOTIONS:
    setattr(Face, _emotion, mapped_column(_emotion, Float, nullable=False))
