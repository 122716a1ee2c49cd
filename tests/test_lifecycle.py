"""The job lifecycle against a real PostgreSQL (and SQLite), step by step: finishing that was interrupted, stale
runs, lost leases, deaths and the poison limit, concurrent submits, the database retry policy, bad settings.

The faults are made directly (a message of an older run, a lease that ran out, a row left half-finished), so each
test shows exactly one rule; tests/test_queue_faults.py and tests/test_chaos.py show the same rules with real
workers, Redis and kills.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import threading
import time

import numpy as np
import pytest
from sqlalchemy import func, select, text, update
from sqlalchemy.exc import DataError, IntegrityError, OperationalError, ProgrammingError

from fervid.errors import FervidError
from fervid.worker.pipeline.frames_to_rows import SegmentRows, StageTimes
from fervid.worker.queue import jobs as jobs_mod
from fervid.worker.queue.jobs import (
    Outcome,
    claim_segment,
    commit_segment,
    run_segment,
    segment_bounds,
    submit,
)
from fervid.worker.queue.sweeper import finish_stuck, reclaim_expired, unsent
from fervid.worker.settings import QueuePolicy, Settings
from fervid.worker.store.db import open_database, retry_delays, with_db_retry
from fervid.worker.store.schema import Face, Job, Segment, Status
from tests.conftest import ROOT, free_port, row_counts, run_cli, shared_path, wait_for

CLIP = "pyfeat_single_face.mp4"  # 2.4 s, one face: 12 frames at 5 fps; 3 segments of 1 s
POLICY = QueuePolicy()


@pytest.fixture(params=["postgresql", "sqlite"])
def sessions(request, tmp_path, monkeypatch):
    monkeypatch.setenv("FERVID_MEDIA_ROOTS", str(shared_path("videos")))
    if request.param == "sqlite":
        return open_database(f"sqlite:///{tmp_path / 't.db'}")
    return open_database(request.getfixturevalue("pg_url"))


@pytest.fixture
def pg_sessions(pg_url, monkeypatch):
    monkeypatch.setenv("FERVID_MEDIA_ROOTS", str(shared_path("videos")))
    return open_database(pg_url)


def _submit(sessions, force=False):
    return submit(sessions, shared_path("videos", CLIP), Settings(sample_fps=5), segment_s=1, force=force,
                  policy=POLICY)  # fmt: skip


def _run_all(sessions, sub, analyzer) -> list[str]:
    return [run_segment(sessions, sub.job_id, i, sub.run, lambda _m, _s: analyzer, POLICY) for i in sub.segments]


def _job(sessions, job_id) -> Job:
    with sessions() as s:
        return s.get(Job, job_id)


def _expire(sessions, job_id, idx) -> None:
    with sessions.begin() as s:
        s.execute(update(Segment).where(Segment.job_id == job_id, Segment.idx == idx)
                  .values(lease_until=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)))  # fmt: skip


def test_a_job_runs_through_its_segments(sessions, analyzer):
    sub = _submit(sessions)
    assert len(sub.segments) == 3 and sub.run == 1
    assert _run_all(sessions, sub, analyzer) == [Outcome.DONE] * 3
    job = _job(sessions, sub.job_id)
    assert job.status == Status.DONE and row_counts(sessions, sub.job_id) == (12, 12)
    assert job.frames_analyzed == 12 and job.timings["tracks"] == 1
    with sessions() as s:
        assert set(s.scalars(select(Face.track).where(Face.job_id == sub.job_id))) == {0}


def _unfinish(sessions, job_id) -> None:
    """The state an interrupted finish leaves: every segment done, the job still running, no tracks."""
    with sessions.begin() as s:
        s.execute(update(Job).where(Job.id == job_id).values(status=Status.RUNNING, finished_at=None, timings=None))
        s.execute(update(Face).where(Face.job_id == job_id).values(track=None))


def test_an_interrupted_finish_is_completed_by_a_redelivery_or_the_sweeper(sessions, analyzer):
    sub = _submit(sessions)
    _run_all(sessions, sub, analyzer)
    _unfinish(sessions, sub.job_id)
    # A redelivered message of the last segment finds it done, and finishes the job instead of returning.
    assert run_segment(sessions, sub.job_id, 2, sub.run, lambda _m, _s: analyzer, POLICY) == Outcome.DONE
    job = _job(sessions, sub.job_id)
    assert job.status == Status.DONE and job.timings["tracks"] == 1
    # With no message left at all, the sweeper finds it.
    _unfinish(sessions, sub.job_id)
    assert finish_stuck(sessions) == [sub.job_id]
    assert _job(sessions, sub.job_id).status == Status.DONE and finish_stuck(sessions) == []
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(Face).where(Face.job_id == sub.job_id,
                                                                    Face.track.is_(None))) == 0  # fmt: skip


def test_messages_of_an_older_run_are_dropped(sessions, analyzer):
    first = _submit(sessions)
    old = claim_segment(sessions, first.job_id, 0, first.run, POLICY)  # an old task, in flight
    assert not isinstance(old, str)
    second = _submit(sessions, force=True)  # submit --force: a new run of the same job
    assert second.job_id == first.job_id and second.run == first.run + 1
    # A queued message of the old run does nothing...
    assert run_segment(sessions, first.job_id, 1, first.run, lambda _m, _s: analyzer, POLICY) == Outcome.STALE
    # ...and the old task's write is discarded: it neither writes its rows nor marks the new run's segment done.
    rows = SegmentRows()
    rows.add([0], [0.0], [])
    assert commit_segment(sessions, old, rows, StageTimes(), POLICY) == Outcome.STALE
    assert row_counts(sessions, first.job_id) == (0, 0)
    with sessions() as s:
        assert {sg.status for sg in s.scalars(select(Segment).where(Segment.job_id == first.job_id))} == {Status.QUEUED}
    assert _run_all(sessions, second, analyzer) == [Outcome.DONE] * 3
    assert _job(sessions, first.job_id).status == Status.DONE and row_counts(sessions, first.job_id) == (12, 12)


def test_a_failed_job_never_turns_back(sessions, analyzer):
    sub = _submit(sessions)
    claim = claim_segment(sessions, sub.job_id, 0, sub.run, POLICY)
    assert jobs_mod.fail_segment(sessions, claim, "a bad frame", POLICY) == Outcome.FAILED
    assert run_segment(sessions, sub.job_id, 1, sub.run, lambda _m, _s: analyzer, POLICY) == Outcome.SKIPPED
    assert finish_stuck(sessions) == []
    job = _job(sessions, sub.job_id)
    assert job.status == Status.FAILED and job.error == "a bad frame"


def test_a_lease_taken_over_discards_the_old_attempt(sessions, analyzer):
    sub = _submit(sessions)
    slow = claim_segment(sessions, sub.job_id, 0, sub.run, POLICY)  # a worker that stopped renewing its lease
    _expire(sessions, sub.job_id, 0)
    assert reclaim_expired(sessions, POLICY) == [(sub.job_id, sub.run, 0)]
    assert _run_all(sessions, sub, analyzer) == [Outcome.DONE] * 3
    rows = SegmentRows()
    rows.add([0], [0.0], [])
    assert commit_segment(sessions, slow, rows, StageTimes(), POLICY) == Outcome.SUPERSEDED
    assert row_counts(sessions, sub.job_id) == (12, 12)
    with sessions() as s:
        seg = s.get(Segment, (sub.job_id, 0))
        assert seg.deaths == 1 and seg.attempts == 2


def test_a_live_lease_is_not_taken_and_a_dead_owner_is(sessions, analyzer):
    sub = _submit(sessions)
    with sessions.begin() as s:  # another machine's process, lease still running: a duplicate message waits
        s.execute(update(Segment).where(Segment.job_id == sub.job_id, Segment.idx == 0).values(
            status=Status.RUNNING, lease_owner="elsewhere:1", attempts=1,
            lease_until=dt.datetime.now(dt.UTC) + dt.timedelta(seconds=60)))  # fmt: skip
    assert claim_segment(sessions, sub.job_id, 0, sub.run, POLICY) == Outcome.DUPLICATE
    import socket

    with sessions.begin() as s:  # a process of this machine that no longer exists: taken over at once
        s.execute(update(Segment).where(Segment.job_id == sub.job_id, Segment.idx == 0)
                  .values(lease_owner=f"{socket.gethostname()}:{2**22 + 12345}"))  # fmt: skip
    claim = claim_segment(sessions, sub.job_id, 0, sub.run, POLICY)
    assert not isinstance(claim, str) and claim.token == 2
    with sessions() as s:
        assert s.get(Segment, (sub.job_id, 0)).deaths == 1


def test_the_third_death_fails_the_job_with_the_reason(sessions):
    sub = _submit(sessions)
    for death in (1, 2, 3):
        assert not isinstance(claim_segment(sessions, sub.job_id, 1, sub.run, POLICY), str)
        _expire(sessions, sub.job_id, 1)
        sent = reclaim_expired(sessions, POLICY)
        assert sent == ([(sub.job_id, sub.run, 1)] if death < 3 else [])
    job = _job(sessions, sub.job_id)
    assert job.status == Status.FAILED
    assert job.error.startswith("the worker died 3 times on segment 1 (0:01–0:02)"), job.error
    assert POLICY.max_deaths == 3


def test_a_segment_never_sent_is_sent_by_the_sweeper(sessions):
    sub = _submit(sessions)  # recorded; the messages were never sent (submit killed, or Redis down)
    assert unsent(sessions, POLICY) == []  # within the grace period: its submit may still be sending
    with sessions.begin() as s:
        s.execute(update(Job).where(Job.id == sub.job_id).values(
            created_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=POLICY.enqueue_grace_s + 1)))  # fmt: skip
    assert sorted(unsent(sessions, POLICY)) == [(sub.job_id, sub.run, i) for i in range(3)]
    jobs_mod.mark_enqueued(sessions, sub.job_id, sub.run, [0, 1, 2], POLICY)
    assert unsent(sessions, POLICY) == []


def test_two_submits_at_once_make_one_job(pg_sessions, monkeypatch):
    """The second submit of the same video, while the first one's transaction is still open, waits for it and
    says "already submitted" (it used to raise IntegrityError and drop the rest of its batch)."""
    add = jobs_mod._add_segments

    def waiting_for_a_lock() -> bool:
        with pg_sessions() as s:
            return bool(s.scalar(text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                      "AND datname = current_database()")))  # fmt: skip

    def held_add(*args, **kwargs):
        # Only the submit that created the job row gets here (the other one waits on that row's key): its
        # transaction stays open until the other submit is seen waiting for it.
        wait_for(waiting_for_a_lock, 60, "the second submit waiting for the first one's transaction")
        return add(*args, **kwargs)

    monkeypatch.setattr(jobs_mod, "_add_segments", held_add)
    results = []
    threads = [threading.Thread(target=lambda: results.append(_submit(pg_sessions))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.duplicate for r in results) == [False, True]
    assert results[0].job_id == results[1].job_id
    with pg_sessions() as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 1


def test_the_default_retry_policy_covers_five_minutes_of_outage():
    delays = list(retry_delays(QueuePolicy()))
    assert sum(delays) * 0.8 >= 300  # even with the largest jitter
    assert max(delays) <= QueuePolicy().db_retry_max_delay_s and delays[0] <= 1


def test_transient_errors_are_retried_and_permanent_ones_are_not(monkeypatch):
    monkeypatch.setattr(time, "sleep", lambda _s: None)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 4:
            raise OperationalError("SELECT 1", {}, Exception("connection refused"))
        return "ok"

    assert with_db_retry(flaky, QueuePolicy(), "testing") == "ok" and len(calls) == 4
    for exc in (IntegrityError, DataError, ProgrammingError):
        calls.clear()

        def permanent(exc=exc):
            calls.append(1)
            raise exc("INSERT", {}, Exception("no"))

        with pytest.raises(exc):
            with_db_retry(permanent, QueuePolicy(), "testing")
        assert len(calls) == 1


def test_lease_and_sweep_defaults_recover_within_two_minutes():
    p = QueuePolicy()
    assert p.lease_s + p.sweep_s <= 120 and p.heartbeat_s * 3 <= p.lease_s


@pytest.mark.parametrize(
    "args, message",
    [
        (["--start", "nan"], "--start must be a finite number"),
        (["--end", "inf"], "--end must be a finite number"),
        (["--fps", "nan"], "--fps must be"),
        (["--segment", "nan"], "--segment must be a finite number"),
        (["--segment", "0"], "--segment must be a finite number"),
        (["--max-faces", "0"], "--max-faces must be"),
    ],
)
def test_bad_numbers_are_one_line_errors(args, message, tmp_path):
    proc = run_cli("submit", str(shared_path("videos", CLIP)), *args, "--db", f"sqlite:///{tmp_path / 'x.db'}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("fervid: error:") and message in proc.stderr and proc.stderr.count("\n") == 1


def test_segments_per_job_are_capped():
    with pytest.raises(FervidError, match="would be 83,334 segments, more than the 10,000 allowed"):
        segment_bounds(0.0, None, 5e6, 60.0, QueuePolicy().max_segments)
    assert len(segment_bounds(0.0, None, 3600.0, 60.0, QueuePolicy().max_segments)) == 60


def test_a_frame_count_past_32_bits_is_stored(pg_sessions):
    sub = _submit(pg_sessions)
    with pg_sessions.begin() as s:
        s.execute(update(Job).where(Job.id == sub.job_id).values(frame_count=2**40))
    assert _job(pg_sessions, sub.job_id).frame_count == 2**40


def test_a_crowd_keeps_the_largest_faces(analyzer):
    """A frame of 1,000 faces gives at most max_faces rows (the largest), not 1,000."""
    import cv2

    photo = cv2.imread(str(shared_path("images", "0-f1-su-ph.jpg")))
    face = photo[80:504, 96:422]  # the face with a margin
    cell = 80
    frame = np.full((25 * cell, 40 * cell, 3), 128, np.uint8)
    for r in range(25):
        for c in range(40):
            frame[r * cell : (r + 1) * cell, c * cell : (c + 1) * cell] = cv2.resize(face, (cell, cell))
    frame[:240, :240] = cv2.resize(face, (240, 240))  # the largest face
    gray = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)[None]
    times = StageTimes()
    found = analyzer.process(frame[None], gray, times, dataclasses.replace(Settings(), max_faces=1000))[0]
    assert len(found.scores) > 500  # the detector does see a crowd
    kept = analyzer.process(frame[None], gray, times, Settings())[0]
    assert len(kept.scores) == Settings().max_faces == 64
    areas = (kept.boxes[:, 2] - kept.boxes[:, 0]) * (kept.boxes[:, 3] - kept.boxes[:, 1])
    assert areas.max() > 150 * 150  # the big face is among them


def test_the_lease_is_renewed_while_the_segment_runs_and_lost_when_taken(sessions):
    sub = _submit(sessions)
    claim = claim_segment(sessions, sub.job_id, 0, sub.run, POLICY)
    with sessions() as s:
        first = s.get(Segment, (sub.job_id, 0)).lease_until
    lease = jobs_mod.Lease(sessions, claim, dataclasses.replace(POLICY, heartbeat_s=0.2))
    lease.progress = (7, 3)
    lease.start()

    def renewed() -> bool:
        with sessions() as s:
            seg = s.get(Segment, (sub.job_id, 0))
            return seg.lease_until > first and (seg.frames, seg.faces) == (7, 3)

    try:
        wait_for(renewed, 10, "the lease renewed, with the progress")
        assert not lease.lost.is_set()
        with sessions.begin() as s:  # judged dead and started elsewhere meanwhile
            s.execute(update(Segment).where(Segment.job_id == sub.job_id, Segment.idx == 0)
                      .values(attempts=Segment.attempts + 1))  # fmt: skip
        assert lease.lost.wait(5)
    finally:
        lease.stop()


def test_a_worker_waits_for_a_database_that_is_not_up_yet():
    """A worker started before its database (a deploy, a restart) retries with backoff instead of failing the
    message it holds; after the policy's time it gives up with a one-line reason."""
    from fervid.worker.store.db import DatabaseUnavailable, open_database_waiting

    port = free_port()
    t0 = time.monotonic()
    with pytest.raises(DatabaseUnavailable, match="is unreachable"):
        open_database_waiting(dataclasses.replace(QueuePolicy(), db_retry_s=2.0),
                              f"postgresql+psycopg://postgres@127.0.0.1:{port}/x")  # fmt: skip
    assert 1.5 <= time.monotonic() - t0 < 30


def test_a_worker_without_media_roots_refuses_to_start():
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "FERVID_MEDIA_ROOTS"}
    proc = subprocess.run([sys.executable, "-m", "fervid.cli", "worker", "--gpus", "none"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2 and "FERVID_MEDIA_ROOTS is not set" in proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
