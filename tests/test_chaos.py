"""Every fault at once, on two real workers with the product's default timeouts (tests/cluster.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from sqlalchemy import func, select

from fervid.worker.queue.jobs import as_utc, utcnow
from fervid.worker.settings import Settings
from fervid.worker.store.schema import Segment, Status
from tests.cluster import (
    Cluster,
    RedisServer,
    TcpProxy,
    assert_same_rows,
    pid_of,
    ppid,
    reference_rows,
    rows_of,
    running_segment,
    submitted_ids,
)
from tests.conftest import shared_path

pytestmark = pytest.mark.slow


CHAOS_WORKLOAD = [  # (clip, fps, segment seconds): about 3,400 frames in 27 segments
    ("pyfeat_WolfgangLanger_Pexels.mp4", "0", "4"),
    ("liveportrait_d6.mp4", "15", "5"),
    ("liveportrait_d6.mp4", "0", "6"),
    ("liveportrait_d6.mp4", "20", "8"),
    ("pyfeat_noface_face.mov", "10", "2"),
    ("liveportrait_d0.mp4", "0", "60"),
    ("pyfeat_single_face.mp4", "0", "60"),
]


def test_chaos_every_job_ends_done_with_the_rows_of_a_clean_run(tmp_path, pg_url):
    """Two real workers, Redis with append-only persistence, PostgreSQL behind a proxy, the product's default
    timeouts, and one of each fault: a pool child killed, a worker's main process killed, PostgreSQL cut for 30 s,
    Redis restarted, a whole worker tree killed, a worker stopped as `docker stop` does, a pool child frozen for
    90 s (its lease runs out, its segment is queued again and redone, by another worker or, when none was free
    first, by the child itself as a new attempt after it wakes; what it computed while frozen is dropped). Every
    job must end done within 3 minutes of the last fault, with exactly the rows of a clean in-process run, without
    any command."""
    (tmp_path / "redis").mkdir()
    redis = RedisServer(tmp_path / "redis")
    proxy = TcpProxy()
    c = Cluster(tmp_path, pg_url, redis, db_url=pg_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}"))
    faults: list[str] = []

    def log(what: str) -> None:
        faults.append(f"{time.time() - t0:6.1f} s: {what}")

    try:
        ids = []
        for clip, fps, seg in CHAOS_WORKLOAD:
            ids += submitted_ids(c.cli("submit", str(shared_path("videos", clip)), "--fps", fps, "--segment", seg))
        assert len(ids) == len(CHAOS_WORKLOAD)
        t0 = time.time()
        trees = [c.start_workers(1), c.start_workers(1)]

        seg = running_segment(c.sessions, ids)
        child = pid_of(seg.lease_owner)
        os.kill(child, signal.SIGKILL)
        log(f"killed pool child {child} (job {seg.job_id} segment {seg.idx})")

        seg = running_segment(c.sessions, ids, not_owned_by={child})
        main = ppid(pid_of(seg.lease_owner))
        os.kill(main, signal.SIGKILL)
        log(f"killed worker main process {main} (job {seg.job_id} segment {seg.idx} running under it)")

        running_segment(c.sessions, ids, not_owned_by={child})
        proxy.cut()
        log("PostgreSQL cut")
        time.sleep(30)
        proxy.mend()
        log("PostgreSQL back")

        redis.stop()
        log("Redis stopped")
        time.sleep(3)
        redis.start()
        log("Redis restarted")

        seg = running_segment(c.sessions, ids, not_owned_by={child})
        victim = next(t for t in trees if t.poll() is None and t.pid == ppid(ppid(pid_of(seg.lease_owner))))
        os.killpg(victim.pid, signal.SIGKILL)
        trees.remove(victim)
        log(f"killed worker tree {victim.pid} (job {seg.job_id} segment {seg.idx})")
        trees.append(c.start_workers(1))

        other = trees[0]
        seg = running_segment(c.sessions, ids, worker=other.pid, timeout=180)
        other.send_signal(signal.SIGTERM)
        try:
            other.wait(10)
            log(f"stopped worker {other.pid} (job {seg.job_id} segment {seg.idx}); it exited in time")
        except subprocess.TimeoutExpired:
            os.killpg(other.pid, signal.SIGKILL)
            log(f"stopped worker {other.pid}: still there after 10 s, killed")
        trees.append(c.start_workers(1))

        seg = running_segment(c.sessions, ids, not_owned_by={child})
        frozen, frozen_seg = pid_of(seg.lease_owner), (seg.job_id, seg.idx)
        frozen_at = utcnow()
        os.kill(frozen, signal.SIGSTOP)  # hung (a stalled disk, a debugger): alive, but its lease is not renewed
        log(f"froze pool child {frozen} (job {seg.job_id} segment {seg.idx})")
        time.sleep(90)
        os.kill(frozen, signal.SIGCONT)
        thawed_at = utcnow()
        log(f"thawed pool child {frozen}")
        last_fault = time.time()

        jobs = c.wait(ids, timeout=180)
        took = time.time() - last_fault
        print("\n".join(faults) + f"\nall jobs ended {took:.0f} s after the last fault")
        assert all(j.status == Status.DONE for j in jobs.values()), {i: (j.status, j.error) for i, j in jobs.items()}
        assert took < 180
        with c.sessions() as s:
            assert s.scalar(select(func.count()).select_from(Segment).where(Segment.status != Status.DONE)) == 0
            deaths = s.scalar(select(func.sum(Segment.deaths)))
            thawed = s.get(Segment, frozen_seg)
        assert deaths >= 3, faults  # the killed child, the killed tree and the frozen child, at least
        # Its lease ran out and the segment was done by a new attempt, claimed after the freeze; by the child
        # itself only once it was awake (when no other worker was free first).
        assert thawed.deaths >= 1 and thawed.attempts >= 2 and as_utc(thawed.started_at) > frozen_at
        if pid_of(thawed.worker) == frozen:
            assert as_utc(thawed.started_at) > thawed_at, (thawed.started_at, thawed_at, faults)
        for (clip, fps, seg), job_id in zip(CHAOS_WORKLOAD, ids, strict=True):
            want = reference_rows(tmp_path, shared_path("videos", clip), Settings(sample_fps=float(fps)), float(seg))
            assert_same_rows(rows_of(c.sessions, job_id), want)
    finally:
        c.stop()
        proxy.close()
        redis.stop()
