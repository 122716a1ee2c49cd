"""Real clusters for the queue's tests: a redis-server of the test's own, a PostgreSQL database behind an optional
proxy that can cut it, `fervid worker` processes, and the rows a clean in-process run gives to compare with.

Its fixtures (`redis`, `cluster`, `proxied`) reach every test through `pytest_plugins` in conftest.py.
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
from sqlalchemy import select

from fervid.worker.queue.supervisor import threads_per_worker
from fervid.worker.settings import Settings
from fervid.worker.store.db import open_database
from fervid.worker.store.schema import EMOTIONS, ENDED, Face, Frame, Job, Segment, Status
from tests.conftest import ROOT, free_port, shared_path


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

    def start_workers(self, n: int = 1, env: dict | None = None, args: tuple[str, ...] = ()) -> subprocess.Popen:
        log = open(self.tmp / f"worker{len(self.workers)}.log", "w")
        p = subprocess.Popen([sys.executable, "-m", "fervid.cli", "worker", "--gpus", "none", "--concurrency", str(n),
                              *args], cwd=ROOT, env=self.env | (env or {}), stdout=log, stderr=subprocess.STDOUT,
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
                   concurrency: int = 1, args: tuple[str, ...] = ()) -> list[tuple]:  # fmt: skip
    """The rows a clean, uninterrupted `fervid analyze` of the same job gives: the same segments (so the frames go
    through the models in the same batches) and the threads of a worker started with `concurrency` (float sums
    differ in their last digits between thread counts, by up to ~3e-4 in a probability)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    db = f"sqlite:///{tmp_path / 'reference.db'}"
    threads = str(threads_per_worker(concurrency))
    env = os.environ | {"OMP_NUM_THREADS": threads, "FERVID_SEGMENT_S": str(segment_s)}
    proc = subprocess.run([sys.executable, "-m", "fervid.cli", "analyze", str(video), "--fps", str(settings.sample_fps),
                           "--device", "cpu", "--db", db, *args], cwd=ROOT, env=env, capture_output=True, text=True,
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


@pytest.fixture
def proxied(tmp_path, pg_url, redis):
    """A cluster whose workers reach PostgreSQL through a proxy that the test can cut."""
    proxy = TcpProxy()
    c = Cluster(tmp_path, pg_url, redis, db_url=pg_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}"))
    yield c, proxy
    c.stop()
    proxy.close()


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
