"""PostgreSQL's write path: rows go in through COPY, streamed by a thread beside the frame loop into one
transaction per segment. Against a real PostgreSQL, with the product's default queue policy: the stored rows are
exactly those of the INSERT path; a stream whose connection is killed mid-segment loses and duplicates nothing;
a stalled database holds the frame loop back after the default queue of batches, and the job then ends right.
"""

from __future__ import annotations

import threading
import time

import psycopg
import pytest
from sqlalchemy import select, text

from fervid.worker.queue.jobs import Outcome, run_segment, submit
from fervid.worker.settings import QueuePolicy, Settings
from fervid.worker.store.db import open_database
from fervid.worker.store.schema import EMOTIONS, Face, Frame, Job, Segment, Status
from tests.conftest import shared_path, wait_for

CLIP = "liveportrait_d6.mp4"  # one face; 3 fps gives ~100 frames: with batches of 4, some 25 COPYs per segment
SETTINGS = Settings(sample_fps=3)
BATCH = 4
POLICY = QueuePolicy()  # the shipped defaults: write_queue, leases, retries


@pytest.fixture
def pg(pg_url, monkeypatch):
    monkeypatch.setenv("FERVID_MEDIA_ROOTS", str(shared_path("videos")))
    return open_database(pg_url), pg_url.replace("postgresql+psycopg://", "postgresql://")


def every_row(sessions, job_id: int) -> tuple[list, list]:
    """Every stored column of the job's frames and faces, in order."""
    face_cols = [c for c in Face.__table__.columns if c.name != "job_id"]
    with sessions() as s:
        frames = s.execute(select(Frame.frame_index, Frame.time_ms, Frame.n_faces).where(Frame.job_id == job_id)
                           .order_by(Frame.frame_index)).all()  # fmt: skip
        faces = s.execute(select(*face_cols).where(Face.job_id == job_id).order_by(Face.frame_index, Face.face)).all()
    return [tuple(r) for r in frames], [tuple(r) for r in faces]


def run_job(sessions, analyzer, on_progress=None) -> int:  # noqa: ANN001
    sub = submit(sessions, shared_path("videos", CLIP), SETTINGS, segment_s=3600, policy=POLICY)
    outcome = run_segment(sessions, sub.job_id, sub.segments[0], sub.run, lambda _m, _s: analyzer, POLICY,
                          on_progress=on_progress, batch_size=BATCH)  # fmt: skip
    assert outcome == Outcome.DONE
    with sessions() as s:
        job = s.get(Job, sub.job_id)
        assert job.status == Status.DONE, job.error
    return sub.job_id


@pytest.fixture(scope="module")
def reference(tmp_path_factory, analyzer):
    """The same job on SQLite, whose rows go in through INSERTs at the end of the segment."""
    mp = pytest.MonkeyPatch()
    mp.setenv("FERVID_MEDIA_ROOTS", str(shared_path("videos")))
    try:
        sessions = open_database(f"sqlite:///{tmp_path_factory.mktemp('ref') / 'ref.db'}")
        return every_row(sessions, run_job(sessions, analyzer))
    finally:
        mp.undo()


def test_copied_rows_are_the_inserted_rows(pg, analyzer, reference):
    sessions, _ = pg
    frames, faces = every_row(sessions, run_job(sessions, analyzer))
    assert len(faces) > 50 and frames == reference[0]
    assert faces == reference[1]  # every column, floats and the landmarks' JSON included, bit for bit
    emotion = [c.name for c in Face.__table__.columns if c.name != "job_id"].index("emotion")
    assert {f[emotion] for f in faces} <= set(EMOTIONS)
    with sessions() as s:
        seg = s.scalars(select(Segment)).one()
        assert seg.timings["write"] < seg.timings["compute"]


def test_a_stream_killed_mid_segment_loses_and_duplicates_nothing(pg, analyzer, reference, caplog):
    """The streaming connection is terminated by the server while the segment is still being computed: nothing
    of it is committed, and the rows held in memory are written at the end, once."""
    sessions, url = pg
    killed: list[int] = []
    stop = threading.Event()

    def killer() -> None:
        with psycopg.connect(url, autocommit=True) as admin:
            while not stop.is_set() and not killed:
                pids = admin.execute("SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                                     "AND query LIKE 'COPY faces%' AND pid <> pg_backend_pid()").fetchall()  # fmt: skip
                for (pid,) in pids:
                    if admin.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()[0]:
                        killed.append(pid)
                time.sleep(0.01)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    try:
        job_id = run_job(sessions, analyzer)
    finally:
        stop.set()
        t.join()
    assert killed, "the streaming connection was never seen"
    assert "streamed write failed" in caplog.text
    assert every_row(sessions, job_id) == reference


def test_a_stalled_database_holds_the_frame_loop_after_the_default_queue(pg, analyzer, reference):
    """While another transaction holds the faces table, the stream cannot write: the frame loop computes at most
    the default queue's batches ahead, then waits; once the table is free the job ends with the right rows."""
    sessions, url = pg
    done: list[int] = []
    result: list[int] = []
    with psycopg.connect(url) as blocker:
        blocker.execute("LOCK TABLE faces IN SHARE MODE")  # conflicts with the stream's DELETE and COPY
        runner = threading.Thread(target=lambda: result.append(run_job(sessions, analyzer, done.append)), daemon=True)
        runner.start()

        def stalled() -> int | None:
            before = sum(done)
            time.sleep(1.0)
            return before if before and sum(done) == before else None

        held = wait_for(stalled, timeout=120, what="the frame loop to wait for the database")
        # The queue's batches, the one being put, and the one the decoder thread has ready.
        assert held <= (POLICY.write_queue + 2) * BATCH, held
        assert held < len(reference[0])
        blocker.rollback()
    runner.join(timeout=300)
    assert result, "the segment did not end"
    assert every_row(sessions, result[0]) == reference
    with sessions() as s:
        assert s.execute(text("SELECT count(*) FROM faces")).scalar() == len(reference[1])
