"""Many writers at once: N worker processes streaming face rows into one PostgreSQL through the real write path.

    python -m scripts.bench_writes [--writers 1 2 4 8 16] [--rate 2000] [--faces-per-frame 1]
        [--segment-frames 600] [--job-segments 10] [--seconds 20] [--batch 16]

A load simulation, not a test. It initdb's a throw-away PostgreSQL cluster in a temporary directory (loopback
only, a free port, fsync on, synchronous_commit on, pg_stat_statements when the server has it) and, for each N,
a fresh database migrated by `open_database`. Each writer is its own process (multiprocessing spawn, as the queue's
workers are) that does what `worker.queue.jobs.run_segment` does, with the models replaced by synthetic rows:
it creates its own jobs (a Job and its queued Segments, as `submit` makes them), then per segment
`claim_segment`, a `Lease`, a `RowStream` fed with `SegmentRows` batches of `--batch` frames (random boxes,
landmarks and probabilities, `--faces-per-frame` faces a frame) paced at `--rate` frames/s, and
`commit_segment(..., stream)`. The last segment of a job also finishes it (linking tracks: an UPDATE of every face
of the job), as in production.

The pacing models a GPU: within a segment, frame k is ready at (segment start + k / rate); a put that blocks (the
stream's queue is full: the database is behind) delays the frames after it, and claiming and committing a
segment hold the frame loop as they do in a worker. `--rate 0` writes as fast as the writers can (the ceiling).

Per N it prints: rows/s committed (frame rows + face rows, all writers, from the start signal to the last commit),
each writer's frames/s against its rate and the share of its time the database held it, p50/p99/max segment commit
time (from the last put to `commit_segment` returning), PostgreSQL CPU-seconds per million rows (from /proc: the
postmaster's utime+stime+cutime+cstime plus its live children's utime+stime, read before the start and after every
writer's connections have closed and their backends been reaped), the writers' own CPU-seconds per million rows,
WAL bytes per million rows (pg_current_wal_lsn difference; full-page images from pg_stat_wal), and the statements
that took the most time (pg_stat_statements). Markdown, for BENCHMARKS.md. Run as root, the server runs as the
`postgres` user (`--pg-user`), since PostgreSQL refuses to run as root.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import logging
import multiprocessing as mp
import os
import pwd
import queue
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psycopg

from fervid.model.device import cpu_name
from fervid.worker.settings import Options, QueuePolicy
from scripts.bench_models import command_line

SEGMENT_S = 60.0  # video seconds per segment: the product's default (QueuePolicy.segment_s)
CLK_TCK = os.sysconf("SC_CLK_TCK")
# A client backend's process title names its client ("postgres: postgres bench_n4 127.0.0.1(50312) idle");
# background processes (checkpointer, walwriter, autovacuum ...) do not.
CLIENT_TITLE = re.compile(r"\d+\.\d+\.\d+\.\d+\(\d+\)|\[local\]")


# ------------------------------------------------------------------------------------------- the throw-away server


class Cluster:
    """A PostgreSQL cluster of its own in a temporary directory, stopped and removed by `close`."""

    def __init__(self, user: str, shared_buffers: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="fervid-bench-writes-"))
        self.data, self.log = self.dir / "data", self.dir / "server.log"
        self.port = free_port()
        self.user = user if os.geteuid() == 0 else None  # PostgreSQL will not run as root
        self.started = False
        try:
            self._init(shared_buffers)
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise

    def _init(self, shared_buffers: str) -> None:
        if self.user:
            pw = pwd.getpwnam(self.user)
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        self._run(["initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
        self.pgss = has_pg_stat_statements()
        conf = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.dir}'",
            "max_connections": "300",  # up to 3 per writer (frame loop, stream, lease) and this script's own
            # Honest durability: every commit waits for its WAL to reach the disk.
            "fsync": "on",
            "synchronous_commit": "on",
            "full_page_writes": "on",
            "shared_buffers": shared_buffers,
            # A 20-30 s window must not contain a checkpoint forced by WAL volume; each N starts after a CHECKPOINT,
            # and the time-based one (5 min) is longer than a window.
            "max_wal_size": "'8GB'",
            "track_io_timing": "on",
            "shared_preload_libraries": "'pg_stat_statements'" if self.pgss else "''",
        }
        with open(self.data / "postgresql.conf", "a") as f:
            f.write("\n# scripts/bench_writes.py\n" + "".join(f"{k} = {v}\n" for k, v in conf.items()))

    def _run(self, cmd: list[str]) -> str:
        if self.user:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}")
        return done.stdout

    def start(self) -> None:
        try:
            self._run(["pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start"])
        except RuntimeError:
            print(self.log.read_text()[-3000:] if self.log.exists() else "(no server log)", file=sys.stderr)
            raise
        self.started = True

    def postmaster(self) -> int:
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def connect(self, dbname: str = "postgres") -> psycopg.Connection:
        return psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", dbname=dbname, autocommit=True)

    def url(self, dbname: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{dbname}"

    def close(self) -> None:
        try:
            if self.started:
                self._run(["pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop"])
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def has_pg_stat_statements() -> bool:
    """Whether the server's library directory has pg_stat_statements (a missing preload library stops the server
    from starting, so look before asking for it)."""
    exe = shutil.which("postgres")
    candidates = [Path(exe).resolve().parent.parent / "lib"] if exe else []
    try:
        candidates.append(Path(subprocess.run(["pg_config", "--pkglibdir"], capture_output=True, text=True,
                                               check=True).stdout.strip()))  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        pass
    return any((d / "pg_stat_statements.so").exists() for d in candidates)


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (which may hold spaces): [state, ppid, ...]."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()


def _children(ppid: int) -> list[tuple[int, list[str]]]:
    out = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None and int(fields[1]) == ppid:
                out.append((int(entry.name), fields))
    return out


def server_cpu_s(postmaster: int) -> float:
    """CPU seconds the server has used: the postmaster's own and its reaped children's (cutime, cstime), plus its
    live children's (backends, checkpointer, walwriter, autovacuum ...). A backend that exits moves its time from
    the second sum to the first, so differences of this count every process of the interval once."""
    fields = _stat(postmaster)
    if fields is None:
        raise RuntimeError("the PostgreSQL postmaster is gone")
    # After the state and ppid: pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime cutime cstime.
    ticks = sum(int(v) for v in fields[11:15])
    ticks += sum(int(f[11]) + int(f[12]) for _, f in _children(postmaster))
    return ticks / CLK_TCK


def client_backends(postmaster: int) -> list[int]:
    pids = []
    for pid, _ in _children(postmaster):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if CLIENT_TITLE.search(title):
            pids.append(pid)
    return pids


def wait_reaped(postmaster: int, pids: list[int] | None = None, timeout: float = 30.0) -> None:
    """Wait until the given backends (default: every client backend) have exited and been reaped, so their CPU
    time is in the postmaster's cutime/cstime and not lost between two reads."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        live = {pid for pid, _ in _children(postmaster)}
        left = (set(pids) & live) if pids is not None else set(client_backends(postmaster))
        if not left:
            return
        time.sleep(0.05)
    print(f"warning: backends {sorted(left)} still there after {timeout:.0f} s", file=sys.stderr)


# ------------------------------------------------------------------------------------------------- the writers


@dataclass(frozen=True)
class WriterConfig:
    number: int
    url: str
    rate: float  # frames/s; 0: as fast as possible
    faces_per_frame: int
    segment_frames: int
    job_segments: int
    batch: int
    seconds: float
    tag: str  # makes job keys unique across the script's runs


def _face_pool(rng: np.random.Generator, n: int, k: int) -> list[Any]:
    """`n` frames of `k` synthetic faces each (FrameFaces), reused round-robin: the values only need to look
    like a detector's and a classifier's output, not to differ between frames."""
    from fervid.worker.pipeline.frames_to_rows import FrameFaces

    pool = []
    for _ in range(n):
        x1 = rng.uniform(0, 1700, k)
        y1 = rng.uniform(0, 850, k)
        w = rng.uniform(48, 220, k)
        boxes = np.stack([x1, y1, x1 + w, y1 + w * 1.2], 1).astype(np.float32)
        lms = (boxes[:, None, :2] + rng.uniform(0.2, 0.8, (k, 5, 2)) * w[:, None, None]).astype(np.float32)
        logits = rng.normal(size=(k, 7))
        probs = (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).astype(np.float32)
        pool.append(FrameFaces(boxes, rng.uniform(0.9, 1.0, k).astype(np.float32), lms, probs))
    return pool


def _new_job(sessions: Any, cfg: WriterConfig, seq: int, policy: QueuePolicy) -> int:
    """A queued job of `job_segments` segments, as `submit` records one (its Job row, then `_add_segments`)."""
    from fervid.model.config import DETECTOR
    from fervid.worker.pipeline.video import VideoInfo
    from fervid.worker.queue.jobs import _add_segments
    from fervid.worker.store.schema import Job, Status

    key = f"bench-writes-{cfg.tag}-{cfg.number}-{os.getpid()}-{seq}"
    duration = cfg.job_segments * SEGMENT_S
    info = VideoInfo(path=Path(f"/bench/{key}.mp4"), width=1920, height=1080, fps=30.0,
                     frame_count=int(duration * 30), duration_s=duration, codec="h264")  # fmt: skip
    with sessions.begin() as s:
        job = Job(job_key=hashlib.sha256(key.encode()).hexdigest(), sha256=hashlib.sha256(key.encode()).hexdigest(),
                  path=str(info.path), size_bytes=0, status=Status.QUEUED, run=1, priority=Options.priority,
                  # Segments of `segment_frames` sampled frames each over SEGMENT_S seconds of video.
                  sample_fps=cfg.segment_frames / SEGMENT_S, start_s=0.0, end_s=None, model="small",
                  model_sha256="0" * 64, detector=DETECTOR, frames_analyzed=0, faces_found=0)  # fmt: skip
        s.add(job)
        s.flush()
        idxs = _add_segments(s, job, info, SEGMENT_S, policy)
        assert len(idxs) == cfg.job_segments, idxs
        return job.id


def writer(cfg: WriterConfig, ready: Any, go: Any, start_at: Any, results: Any) -> None:
    """One worker process: jobs and segments through claim_segment / RowStream / commit_segment until the window
    ends (the segment under way then is finished and counted), then its numbers on `results`."""
    logging.basicConfig(level=logging.WARNING, format=f"writer {cfg.number}: %(name)s: %(message)s")
    from fervid.worker.pipeline.frames_to_rows import SegmentRows, StageTimes
    from fervid.worker.queue.jobs import Claim, Lease, Outcome, claim_segment, commit_segment
    from fervid.worker.store.db import open_database
    from fervid.worker.store.stream import RowStream

    policy = QueuePolicy.from_env()
    sessions = open_database(cfg.url)  # what a worker does at start (migrating is a no-op here)
    engine = sessions.kw["bind"]
    # A worker keeps its pool open: connect the frame loop's, the stream's and the lease's connections now, so
    # that the window measures writing, not connecting.
    warm = [engine.connect() for _ in range(3)]
    for c in warm:
        c.close()
    pool = _face_pool(np.random.default_rng(cfg.number), 997, cfg.faces_per_frame)
    F, B = cfg.segment_frames, cfg.batch
    ms_per_frame = 1000.0 * SEGMENT_S / F
    ready.put(cfg.number)
    go.wait()
    t_start = start_at.value
    deadline = t_start + cfg.seconds
    cpu0 = time.process_time()

    commit_s: list[float] = []
    finishing: list[bool] = []  # the commit was its job's last segment (it linked the job's tracks too)
    claim_s: list[float] = []
    outcomes: Counter[str] = Counter()
    frames = faces = jobs = fallbacks = 0
    # Time the database held the frame loop: claims, commits, job creation, puts blocked by a full queue.
    held = {"claim": 0.0, "blocked": 0.0, "commit": 0.0, "job": 0.0}
    stream_busy_s = 0.0
    job_id, next_idx, seq, p = None, cfg.job_segments, 0, 0
    t_end = time.time()
    while time.time() < deadline:
        if next_idx == cfg.job_segments:
            t = time.perf_counter()
            job_id, next_idx, seq = _new_job(sessions, cfg, seq, policy), 0, seq + 1
            held["job"] += time.perf_counter() - t
            jobs += 1
        idx, next_idx = next_idx, next_idx + 1
        t = time.perf_counter()
        claim = claim_segment(sessions, job_id, idx, 1, policy)
        claim_s.append(time.perf_counter() - t)
        held["claim"] += claim_s[-1]
        if not isinstance(claim, Claim):
            outcomes[str(claim)] += 1
            continue
        lease = Lease(sessions, claim, policy)
        lease.start()
        stream = RowStream(sessions, job_id, claim.settings.start_s, claim.settings.end_s, policy.write_queue)
        stream.start()
        times, rows = StageTimes(), SegmentRows()
        try:
            t0 = time.perf_counter()
            for a in range(0, F, B):
                k = min(B, F - a)
                idxs = list(range(idx * F + a, idx * F + a + k))
                batch = SegmentRows()
                batch.add(idxs, [i * ms_per_frame for i in idxs], [pool[(p + j) % len(pool)] for j in range(k)])
                p += k
                rows.extend(batch)
                if cfg.rate:  # the GPU has these frames ready at this time, not before
                    wait = t0 + (a + k) / cfg.rate - time.perf_counter()
                    if wait > 0:
                        time.sleep(wait)
                stream.put(batch)
                lease.progress = (rows.n_frames, rows.n_faces)
            loop = time.perf_counter() - t0
            times.seconds["compute"] = loop
            if cfg.rate:  # beyond the frames' own time: the puts the stream's full queue blocked
                held["blocked"] += max(0.0, loop - F / cfg.rate)
            t_last = time.perf_counter()
            outcome = commit_segment(sessions, claim, rows, times, policy, stream)
            commit = time.perf_counter() - t_last
        finally:
            stream.abort()
            lease.stop()
        held["commit"] += commit
        stream_busy_s += stream.busy_s
        fallbacks += stream.error is not None
        outcomes[str(outcome)] += 1
        if outcome == Outcome.DONE:
            frames, faces = frames + rows.n_frames, faces + rows.n_faces
            commit_s.append(commit)
            finishing.append(idx == cfg.job_segments - 1)
        t_end = time.time()
    cpu = time.process_time() - cpu0
    engine.dispose()  # close the connections now: their backends exit and are reaped before the final read
    results.put({
        "number": cfg.number, "start": t_start, "end": t_end, "cpu_s": cpu, "frames": frames, "faces": faces,
        "jobs": jobs, "commit_s": commit_s, "finishing": finishing, "claim_s": claim_s, "held": held,
        "stream_busy_s": stream_busy_s, "fallbacks": fallbacks, "outcomes": dict(outcomes),
    })  # fmt: skip


# ------------------------------------------------------------------------------------------------- one N


def wal_state(conn: psycopg.Connection) -> dict[str, Any]:
    row = conn.execute("SELECT pg_current_wal_lsn()::text, wal_records, wal_fpi, wal_bytes, wal_sync "
                       "FROM pg_stat_wal").fetchone()  # fmt: skip
    return dict(zip(("lsn", "records", "fpi", "bytes", "syncs"), row, strict=True))


def gather(q: Any, procs: list[Any], n: int, timeout: float) -> list[Any]:
    """`n` items from `q`; a writer that died (an exception, the OOM killer) fails the run at once instead of
    leaving it to wait out the timeout."""
    items: list[Any] = []
    end = time.monotonic() + timeout
    while len(items) < n:
        try:
            items.append(q.get(timeout=1.0))
        except queue.Empty:
            dead = [p.name for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"writer process(es) {', '.join(dead)} died; see their messages above") from None
            if time.monotonic() > end:
                raise TimeoutError(f"{len(items)} of {n} writers answered within {timeout:.0f} s") from None
    return items


def run_n(cluster: Cluster, n: int, args: argparse.Namespace, ctx: Any) -> dict[str, Any]:
    from fervid.worker.store.db import open_database

    dbname = f"bench_n{n}"
    with cluster.connect() as c:
        c.execute(f"DROP DATABASE IF EXISTS {dbname}")
        c.execute(f"CREATE DATABASE {dbname}")
    sessions = open_database(cluster.url(dbname))  # a fresh database, migrated as a worker would
    sessions.kw["bind"].dispose()
    with cluster.connect() as c:
        size0 = c.execute("SELECT pg_database_size(%s)", (dbname,)).fetchone()[0]

    ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    start_at = ctx.Value("d", 0.0)
    tag = f"{n}-{int(time.time())}"
    procs = []
    for i in range(n):
        cfg = WriterConfig(i, cluster.url(dbname), args.rate, args.faces_per_frame, args.segment_frames,
                           args.job_segments, args.batch, args.seconds, tag)  # fmt: skip
        proc = ctx.Process(target=writer, args=(cfg, ready, go, start_at, results), name=f"writer-{i}")
        proc.start()
        procs.append(proc)
    try:
        # Spawned processes import torch (through the pipeline): tens of seconds for 16 of them on 2 cores.
        gather(ready, procs, n, 300)
        with cluster.connect() as c:
            # Every N starts from a checkpoint, so that each window pays the same full-page images.
            c.execute("CHECKPOINT")
            if cluster.pgss:
                c.execute("SELECT pg_stat_statements_reset()")
            wal0 = wal_state(c)
            me = c.execute("SELECT pg_backend_pid()").fetchone()[0]
        wait_reaped(cluster.postmaster(), [me])
        cpu0 = server_cpu_s(cluster.postmaster())
        start_at.value = time.time()
        go.set()
        out = gather(results, procs, n, args.seconds + 600)
        for proc in procs:
            proc.join(timeout=60)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
                proc.join()
    wait_reaped(cluster.postmaster())
    cpu1 = server_cpu_s(cluster.postmaster())
    with cluster.connect() as c:
        wal1 = wal_state(c)
        wal_bytes = c.execute("SELECT pg_wal_lsn_diff(%s, %s)", (wal1["lsn"], wal0["lsn"])).fetchone()[0]
        top = []
        if cluster.pgss:
            # Grouped by text: a statement on a temporary table is a new entry in every connection (its OID).
            top = c.execute(
                "SELECT q, sum(calls)::bigint, sum(total_exec_time), sum(rows)::bigint, "
                "sum(total_exec_time) / sum(sum(total_exec_time)) OVER () FROM ("
                "SELECT regexp_replace(query, '\\s+', ' ', 'g') AS q, calls, total_exec_time, rows "
                "FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = %s) t "
                "GROUP BY q ORDER BY 3 DESC LIMIT %s", (dbname, args.top)).fetchall()  # fmt: skip
    with cluster.connect(dbname) as c:
        in_db = c.execute("SELECT (SELECT count(*) FROM frames), (SELECT count(*) FROM faces)").fetchone()
        size1 = c.execute("SELECT pg_database_size(current_database())").fetchone()[0]
    with cluster.connect() as c:
        c.execute(f"DROP DATABASE {dbname}")  # room on the disk for the next N; its numbers are taken

    frames = sum(r["frames"] for r in out)
    faces = sum(r["faces"] for r in out)
    if (frames, faces) != tuple(in_db):
        print(
            f"warning: N={n}: writers report {frames} frames, {faces} faces; the database holds {in_db}",
            file=sys.stderr,
        )
    start = min(r["start"] for r in out)
    window = max(r["end"] for r in out) - start
    commits = np.array([t for r in out for t in r["commit_s"]] or [np.nan])
    finishing = np.array([f for r in out for f in r["finishing"]] or [False])
    per_writer_fps = [r["frames"] / (r["end"] - r["start"]) for r in out]
    outcomes: Counter[str] = Counter()
    for r in out:
        outcomes.update(r["outcomes"])
    return {
        "n": n, "window": window, "frames": frames, "faces": faces, "rows": frames + faces,
        "segments": sum(len(r["commit_s"]) for r in out),
        "jobs": sum(r["jobs"] for r in out), "fps_mean": float(np.mean(per_writer_fps)),
        "fps_min": float(np.min(per_writer_fps)),
        "held": float(np.mean([sum(r["held"].values()) / max(r["end"] - r["start"], 1e-9) for r in out])),
        # Per segment, over all writers: where the frame loop waited for the database.
        "held_per_segment": {k: sum(r["held"][k] for r in out) / max(1, sum(len(r["claim_s"]) for r in out))
                             for k in out[0]["held"]},
        # A job's last segment also links the job's tracks: a different cost, so its own percentiles.
        "commit_p50": pct(commits[~finishing], 50), "commit_p99": pct(commits[~finishing], 99),
        "finish_p50": pct(commits[finishing], 50), "finish_p99": pct(commits[finishing], 99),
        "all_p99": pct(commits, 99), "commit_max": float(np.nanmax(commits)),
        "db_bytes": float(size1 - size0),
        "claim_p50": float(np.median([t for r in out for t in r["claim_s"]])),
        "pg_cpu": cpu1 - cpu0, "writer_cpu": sum(r["cpu_s"] for r in out),
        "wal_bytes": float(wal_bytes), "fpi": wal1["fpi"] - wal0["fpi"], "wal_syncs": wal1["syncs"] - wal0["syncs"],
        "fallbacks": sum(r["fallbacks"] for r in out),
        "stream_busy": sum(r["stream_busy_s"] for r in out) / max(1, sum(len(r["commit_s"]) for r in out)),
        "outcomes": dict(outcomes), "top": top,
    }  # fmt: skip


# ------------------------------------------------------------------------------------------------- report


def machine() -> str:
    cpu = cpu_name()
    mem = ""
    try:
        kb = int(next(ln for ln in open("/proc/meminfo") if ln.startswith("MemTotal")).split()[1])
        mem = f", {kb / 2**20:.0f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    return f"{cpu}, {os.cpu_count()} cores{mem}"


def tree_state() -> str:
    """The code measured: the commit, and a digest of uncommitted changes to the write path, if any."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()  # fmt: skip
        diff = subprocess.run(["git", "diff", "HEAD", "--", "worker"], cwd=root, capture_output=True,
                              check=True).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    if not diff:
        return f"commit {head}"
    return f"commit {head} with uncommitted changes to worker/ (diff sha256 {hashlib.sha256(diff).hexdigest()[:12]})"


def pct(values: np.ndarray, q: float) -> float:
    return float(np.nanpercentile(values, q)) if len(values) else float("nan")


def ms(s: float) -> str:
    return "-" if s != s else f"{s * 1000:,.0f} ms" if s >= 0.1 else f"{s * 1000:.1f} ms"


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    target = f"{args.rate:,.0f}" if args.rate else "max"
    print(
        "\n| writers | frames/s per writer: target | achieved (mean / min) | rate kept | time held by the write path | "
        "segments | rows committed | rows/s | segment commit p50 / p99 | job-finishing commit p50 / p99 | "
        "all commits p99 / max |"
    )
    print("|---:|---:|---:|:---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        kept = ("yes" if r["fps_min"] >= 0.95 * args.rate else "**no**") if args.rate else "-"
        print(
            f"| {r['n']} | {target} | {r['fps_mean']:,.0f} / {r['fps_min']:,.0f} | {kept} | {r['held']:.1%} | "
            f"{r['segments']:,} | {r['rows']:,} | **{r['rows'] / r['window']:,.0f}** | {ms(r['commit_p50'])} / "
            f"{ms(r['commit_p99'])} | {ms(r['finish_p50'])} / {ms(r['finish_p99'])} | {ms(r['all_p99'])} / "
            f"{ms(r['commit_max'])} |"
        )
    print(
        "\n| writers | rows/s | PostgreSQL CPU-s/s | PostgreSQL CPU-s per M rows | writers' CPU-s per M rows | "
        "WAL MB/s | WAL bytes per row | WAL MB per M rows | full-page images | WAL fsyncs | database MB per M rows |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        m = r["rows"] / 1e6 or float("nan")
        print(
            f"| {r['n']} | {r['rows'] / r['window']:,.0f} | {r['pg_cpu'] / r['window']:.2f} | "
            f"**{r['pg_cpu'] / m:.1f}** | {r['writer_cpu'] / m:.1f} | {r['wal_bytes'] / r['window'] / 1e6:.1f} | "
            f"{r['wal_bytes'] / max(r['rows'], 1):.0f} | **{r['wal_bytes'] / 1e6 / m:,.0f}** | {r['fpi']:,} | "
            f"{r['wal_syncs']:,} | {r['db_bytes'] / 1e6 / m:,.0f} |"
        )
    print(
        "\n| writers | per segment: claim | puts blocked (queue full) | commit | new job (every "
        f"{args.job_segments} segments) | stream thread busy |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for r in results:
        h = r["held_per_segment"]
        print(
            f"| {r['n']} | {ms(h['claim'])} | {ms(h['blocked']) if args.rate else '-'} | {ms(h['commit'])} | "
            f"{ms(h['job'])} | {ms(r['stream_busy'])} |"
        )
    for r in results:
        problems = {k: v for k, v in r["outcomes"].items() if k != "done"}
        if problems or r["fallbacks"]:
            print(
                f"\nN={r['n']}: outcomes other than done: {problems}; streams that failed and were rewritten: "
                f"{r['fallbacks']}"
            )
    for r in results:
        if not r["top"]:
            continue
        print(
            f"\nN={r['n']}: statements by total time (pg_stat_statements, top-level; a COPY's time includes "
            "the client's formatting of its rows, sent while it runs):\n"
        )
        print("| statement | calls | total s | share | mean ms | rows |")
        print("|---|---:|---:|---:|---:|---:|")
        for q, calls, tot, rows, share in r["top"]:
            q = q if len(q) <= 90 else q[:87] + "..."
            print(
                f"| `{q.replace('|', '/')}` | {calls:,} | {tot / 1000:.2f} | {share:.0%} | "
                f"{tot / max(calls, 1):.2f} | {rows:,} |"
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--writers", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    p.add_argument("--rate", type=float, default=2000.0, help="frames/s per writer (one GPU's goal); 0: no limit")
    p.add_argument("--faces-per-frame", type=int, default=1)
    p.add_argument("--segment-frames", type=int, default=600, help="sampled frames per segment")
    p.add_argument("--job-segments", type=int, default=10, help="segments per job (the last one finishes it)")
    p.add_argument("--seconds", type=float, default=20.0, help="measured window per N")
    p.add_argument("--batch", type=int, default=Options.batch_size, help="frames per put")
    p.add_argument("--shared-buffers", default="1GB")
    p.add_argument("--pg-user", default="postgres", help="the OS user the server runs as when this runs as root")
    p.add_argument("--top", type=int, default=6, help="statements listed per N")
    args = p.parse_args()
    if args.faces_per_frame < 1 or args.segment_frames < 1 or args.batch < 1 or args.job_segments < 1:
        p.error("--faces-per-frame, --segment-frames, --batch and --job-segments must be at least 1")

    cluster = Cluster(args.pg_user, args.shared_buffers)
    try:
        cluster.start()
        with cluster.connect() as c:
            version = c.execute("SHOW server_version").fetchone()[0]
            if cluster.pgss:
                c.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        print(
            f"Machine: {machine()}; {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; PostgreSQL "
            f"{version} (fsync on, synchronous_commit on, shared_buffers {args.shared_buffers}, "
            f"pg_stat_statements {'on' if cluster.pgss else 'not available'})"
        )
        print(f"Command: `{command_line()}`; code: {tree_state()}")
        print(f"Load: {args.rate:,.0f} frames/s per writer" if args.rate else "Load: as fast as possible", end="")
        print(
            f", {args.faces_per_frame} face(s) per frame, {args.segment_frames} frames per segment, "
            f"{args.job_segments} segments per job, {args.batch} frames per put, {args.seconds:g} s per N"
        )
        ctx = mp.get_context("spawn")
        results = []
        for n in args.writers:
            r = run_n(cluster, n, args, ctx)
            results.append(r)
            print(
                f"N={n}: {r['rows'] / r['window']:,.0f} rows/s, commit p50 {ms(r['commit_p50'])}, PostgreSQL "
                f"{r['pg_cpu'] / r['window']:.2f} CPU-s/s",
                file=sys.stderr,
                flush=True,
            )
        report(results, args)
    finally:
        cluster.close()


if __name__ == "__main__":
    main()
