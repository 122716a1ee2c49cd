"""The queue through faults, one at a time, with the product's default timeouts: workers killed or stopped, Redis
restarted, without persistence or down at submit, PostgreSQL cut for 90 s or refusing writes, messages of an older
run. Real Redis, PostgreSQL and `fervid worker` processes (tests/cluster.py).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

import pytest
from sqlalchemy import select, text

from fervid.worker.settings import Settings
from fervid.worker.store.schema import ENDED, Job, Segment, Status
from tests.cluster import (
    Cluster,
    RedisServer,
    assert_same_rows,
    pid_of,
    reference_rows,
    rows_of,
    running_segment,
    submitted_ids,
)
from tests.conftest import row_counts, shared_path, wait_for

pytestmark = pytest.mark.slow


def test_worker_killed_mid_segment(cluster, tmp_path):
    video = shared_path("videos", "pyfeat_WolfgangLanger_Pexels.mp4")
    cluster.start_workers(2)
    ids = submitted_ids(cluster.cli("submit", str(video), "--fps", "10", "--segment", "10"))
    # Wait until a segment is being processed, then kill the whole worker process running it (SIGKILL).
    victim = None
    deadline = time.time() + 120
    while victim is None and time.time() < deadline:
        with cluster.sessions() as s:
            seg = s.scalar(select(Segment).where(Segment.job_id == ids[0], Segment.status == Status.RUNNING))
            if seg is not None:
                victim = int(seg.worker.rsplit(":", 1)[1])
        time.sleep(0.1)
    assert victim, "no segment started"
    parent = int(subprocess.run(["ps", "-o", "ppid=", "-p", str(victim)], capture_output=True, text=True).stdout)
    os.kill(victim, signal.SIGKILL)
    os.kill(parent, signal.SIGKILL)
    job = cluster.wait(ids, timeout=300)[ids[0]]
    assert job.status == Status.DONE, job.error
    with cluster.sessions() as s:
        attempts = sum(sg.attempts for sg in s.scalars(select(Segment).where(Segment.job_id == ids[0])))
    assert attempts >= 3  # the killed segment ran twice
    assert_same_rows(rows_of(cluster.sessions, ids[0]), reference_rows(tmp_path, video, Settings(sample_fps=10), 10, 2))


def test_redis_restart_loses_no_job(cluster, redis):
    videos = [shared_path("videos", n) for n in ("pyfeat_single_face.mp4", "liveportrait_d0.mp4",
                                                 "pyfeat_noface_face.mov")]  # fmt: skip
    ids = submitted_ids(cluster.cli("submit", *map(str, videos), "--fps", "4"))
    cluster.start_workers(1)
    running_segment(cluster.sessions, ids)  # one running, the others queued in Redis
    redis.stop()
    time.sleep(3)  # how long Redis stays down
    redis.start()
    jobs = cluster.wait(ids, timeout=300)
    assert all(j.status == Status.DONE for j in jobs.values()), {i: j.error for i, j in jobs.items()}


def test_redis_without_persistence_loses_messages_and_the_sweeper_recovers_them(tmp_path, pg_url):
    """A Redis that keeps nothing on disk restarts empty: the queued messages are gone. Nobody runs a command:
    the workers' sweeper notices (its marker key vanished, fewer messages than queued segments) and sends
    them again."""
    server = RedisServer(tmp_path)
    c = Cluster(tmp_path, pg_url, server)
    try:
        ids = submitted_ids(c.cli("submit", str(shared_path("videos", "pyfeat_single_face.mp4")),
                                  str(shared_path("videos", "liveportrait_d0.mp4")), "--fps", "4"))  # fmt: skip
        server.stop()
        for f in tmp_path.glob("appendonly*"):  # as a Redis that keeps nothing on disk
            shutil.rmtree(f) if f.is_dir() else f.unlink()
        server.start()
        import redis as redis_client

        assert redis_client.Redis(port=server.port).dbsize() == 0  # the queued messages are gone
        c.start_workers(1)
        jobs = c.wait(ids, timeout=180)
        assert all(j.status == Status.DONE for j in jobs.values())
        assert "no queued or running job" in c.cli("requeue").stdout
    finally:
        c.stop()
        server.stop()


def test_submit_while_redis_is_down_is_sent_when_it_is_back(cluster, redis):
    redis.stop()
    proc = cluster.cli("submit", str(shared_path("videos", "pyfeat_single_face.mp4")))
    assert proc.returncode == 1 and "recorded but not yet queued" in proc.stdout, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    ids = [int(proc.stdout.split("job ")[1].split()[0])]
    redis.start()
    cluster.start_workers(1)
    assert cluster.wait(ids, timeout=180)[ids[0]].status == Status.DONE


def test_a_90_second_database_outage_is_survived_with_the_default_policy(proxied, tmp_path):
    c, proxy = proxied
    video = shared_path("videos", "liveportrait_d6.mp4")
    c.start_workers(1)
    ids = submitted_ids(c.cli("submit", str(video), "--fps", "5", "--segment", "10"))
    running_segment(c.sessions, ids)
    proxy.cut()  # every connection dropped, new ones refused: the workers compute on and retry their writes
    time.sleep(90)
    proxy.mend()
    job = c.wait(ids, timeout=240)[ids[0]]
    assert job.status == Status.DONE, job.error
    assert_same_rows(rows_of(c.sessions, ids[0]), reference_rows(tmp_path, video, Settings(sample_fps=5), 10))


def test_permanent_database_error_fails_the_job_at_once(proxied):
    """An error no retry can heal (here a constraint that every face row violates) fails the job with the
    database's own message, at once: not "database unreachable" after minutes of recomputation."""
    c, _ = proxied
    with c.sessions.begin() as s:
        s.execute(text("ALTER TABLE faces ADD CONSTRAINT reject_all CHECK (det_score < 0) NOT VALID"))
    c.start_workers(1)
    t0 = time.time()
    ids = submitted_ids(c.cli("submit", str(shared_path("videos", "liveportrait_d6.mp4")), "--fps", "5"))
    job = c.wait(ids, timeout=120)[ids[0]]
    assert job.status == Status.FAILED and "reject_all" in job.error and "IntegrityError" in job.error, job.error
    assert time.time() - t0 < 90
    with c.sessions() as s:
        seg = s.scalars(select(Segment).where(Segment.job_id == ids[0])).one()
        assert seg.attempts == 1  # computed once, not retried
    assert row_counts(c.sessions, ids[0]) == (0, 0)


def test_a_segment_that_kills_its_worker_fails_the_job_after_three_deaths(cluster):
    """As an out-of-memory kill or a decoder crash would: the pool child dies each time it runs the segment."""
    cluster.start_workers(1)
    ids = submitted_ids(cluster.cli("submit", str(shared_path("videos", "pyfeat_WolfgangLanger_Pexels.mp4")),
                                    "--fps", "0", "--segment", "100"))  # fmt: skip
    killed: set[int] = set()
    deadline = time.time() + 240
    while time.time() < deadline:
        with cluster.sessions() as s:
            job = s.get(Job, ids[0])
            seg = s.get(Segment, (ids[0], 0))
        if job.status in ENDED:
            break
        if seg.status == Status.RUNNING and pid_of(seg.lease_owner) not in killed:
            os.kill(pid_of(seg.lease_owner), signal.SIGKILL)
            killed.add(pid_of(seg.lease_owner))
        time.sleep(0.1)
    assert job.status == Status.FAILED and len(killed) == 3, (job.status, killed)
    assert job.error.startswith("the worker died 3 times on segment 0 (0:00–end)"), job.error
    assert seg.deaths == 3 and seg.status == Status.FAILED
    assert row_counts(cluster.sessions, ids[0]) == (0, 0)


def test_messages_of_an_older_run_are_dropped_by_workers(cluster, tmp_path):
    video = shared_path("videos", "pyfeat_WolfgangLanger_Pexels.mp4")
    first = submitted_ids(cluster.cli("submit", str(video), "--fps", "5", "--segment", "5"))  # 4 messages, run 1
    again = submitted_ids(cluster.cli("submit", str(video), "--fps", "5", "--segment", "5", "--force"))  # run 2
    assert first == again
    cluster.start_workers(1)
    job = cluster.wait(first)[first[0]]
    assert job.status == Status.DONE and job.run == 2, job.error
    with cluster.sessions() as s:
        segs = s.scalars(select(Segment).where(Segment.job_id == first[0])).all()
    assert len(segs) == 4 and all(sg.run == 2 and sg.attempts == 1 and sg.status == Status.DONE for sg in segs)
    assert_same_rows(rows_of(cluster.sessions, first[0]),
                     reference_rows(tmp_path, video, Settings(sample_fps=5), 5))  # fmt: skip
    log = tmp_path / "worker0.log"
    wait_for(lambda: log.read_text().count("(run 1): stale") >= 4, 30, f"4 stale messages dropped: {log}")
    assert log.read_text().count("(run 1): stale") == 4, log.read_text()[-3000:]


def test_a_stopping_worker_hands_its_segment_back(cluster, tmp_path):
    """docker stop: SIGTERM to the worker's first process, SIGKILL 10 s later. The segment is handed back (not
    counted as a death) and the worker is gone before the SIGKILL; another worker finishes the job."""
    video = shared_path("videos", "liveportrait_d6.mp4")
    # A short heartbeat: the segment's progress shows in the database within a second of each batch.
    w = cluster.start_workers(1, env={"FERVID_HEARTBEAT_S": "0.5"})
    # Every frame (1,008) in one segment: long enough on any CPU that the SIGTERM lands while it runs.
    ids = submitted_ids(cluster.cli("submit", str(video), "--fps", "0", "--segment", "100"))
    seg = running_segment(cluster.sessions, ids)

    def computing() -> bool:  # the models are loaded and batches go through them
        with cluster.sessions() as s:
            return s.get(Segment, (seg.job_id, seg.idx)).frames > 0

    wait_for(computing, 120, "the running segment's first batch")
    t0 = time.time()
    w.send_signal(signal.SIGTERM)
    try:
        w.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(w.pid, signal.SIGKILL)
        pytest.fail("the worker did not stop within docker stop's 10 s")
    with cluster.sessions() as s:
        seg = s.get(Segment, (ids[0], 0))
        assert seg.status == Status.QUEUED and seg.deaths == 0 and seg.attempts == 1 and seg.lease_owner is None
    stopped = time.time() - t0
    cluster.start_workers(1)
    job = cluster.wait(ids)[ids[0]]
    assert job.status == Status.DONE, job.error
    with cluster.sessions() as s:
        seg = s.get(Segment, (ids[0], 0))
        assert seg.deaths == 0 and seg.attempts == 2
    assert_same_rows(rows_of(cluster.sessions, ids[0]), reference_rows(tmp_path, video, Settings(sample_fps=0), 100))
    assert stopped < 10
