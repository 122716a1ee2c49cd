"""Benchmark `fervid serve` on PostgreSQL: N concurrent clients polling a job's status and paging through the face
rows of a 1,000,000-row job, 1,000 rows a page. Prints p50/p99 latency and requests/s per kind of request, and
the Markdown row for BENCHMARKS.md.

    .venv/bin/python scripts/bench_api.py [--pg postgresql://postgres@127.0.0.1:5432/test] [--rows 1000000]
        [--clients 50] [--seconds 60] [--interval 0] [--workers 1] [--broker redis://127.0.0.1:6379/15]
        [--download csv parquet]

It creates a database of its own (dropped at the end), fills it with a synthetic job (PostgreSQL COPY), starts
`fervid serve` on a free port against it (`--workers N` server processes; above 1 they are given the queue's
URL, as `fervid serve` requires; nothing is submitted to it), and runs the clients as threads with keep-alive
connections.
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from pathlib import Path

import numpy as np

from fervid.model.device import cpu_name

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "bench-token"


def fill(url: str, rows: int, fps: float = 10.0) -> int:
    """A done job of `rows` faces (one face per frame at `fps`), written with COPY; returns its id."""
    import psycopg

    from fervid.worker.store.db import open_database
    from fervid.worker.store.schema import EMOTIONS, Job, Segment

    sessions = open_database(url)
    duration = rows / fps
    with sessions.begin() as s:
        job = Job(job_key=uuid.uuid4().hex, path="/bench/synthetic.mp4", size_bytes=1, sha256="0" * 64,
                  status="done", duration_s=duration, fps=fps, frame_count=rows, width=1920, height=1080,
                  codec="h264", sample_fps=0.0, start_s=0.0, model="small", model_sha256="0" * 64, detector="bench",
                  frames_analyzed=rows, faces_found=rows, timings={}, finished_at=dt.datetime.now(dt.UTC))  # fmt: skip
        s.add(job)
        s.flush()
        s.add(Segment(job_id=job.id, idx=0, start_s=0.0, end_s=None, run=1, status="done", attempts=1, deaths=0,
                      frames=rows, faces=rows))  # fmt: skip
        job_id = job.id
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(len(EMOTIONS)), size=rows)
    frames = np.arange(rows)
    times = frames * (1000.0 / fps)
    top = np.array(EMOTIONS)[probs.argmax(1)]
    pg = url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(pg) as conn, conn.cursor() as cur:
        chunk = 100_000
        with cur.copy("COPY frames (job_id, frame_index, time_ms, n_faces) FROM STDIN") as cp:
            for a in range(0, rows, chunk):
                b = min(rows, a + chunk)
                cp.write("".join(f"{job_id}\t{f}\t{t}\t1\n" for f, t in zip(frames[a:b], times[a:b], strict=True)))
        cols = ["job_id", "frame_index", "face", "time_ms", "track", "x1", "y1", "x2", "y2", "det_score", "landmarks",
                *EMOTIONS, "emotion"]  # fmt: skip
        with cur.copy(f"COPY faces ({', '.join(cols)}) FROM STDIN") as cp:
            for a in range(0, rows, chunk):
                b = min(rows, a + chunk)
                buf = io.StringIO()
                for i in range(a, b):
                    p = "\t".join(f"{v:.5f}" for v in probs[i])
                    buf.write(f"{job_id}\t{i}\t0\t{times[i]}\t{i // 50_000}\t100\t100\t300\t300\t0.99\t[]\t{p}\t"
                              f"{top[i]}\n")  # fmt: skip
                cp.write(buf.getvalue())
        conn.commit()
        cur.execute("ANALYZE faces")
        cur.execute("ANALYZE frames")
    return job_id


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_serving(port: int, workers: int, timeout: float = 120) -> None:
    """Until every server process answers /healthz (the socket accepts before the workers have started)."""
    seen: set[int] = set()
    deadline = time.monotonic() + timeout
    while len(seen) < workers:
        if time.monotonic() > deadline:
            raise SystemExit(f"fervid serve: {len(seen)} of {workers} processes answered in {timeout:.0f} s")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/healthz")
            seen.add(json.loads(conn.getresponse().read())["pid"])
            conn.close()
        except OSError:
            time.sleep(0.2)


def download(port: int, job_id: int, fmt: str) -> tuple[int, int]:
    """The whole job as one `?format=csv|parquet` download, after the clients have stopped: its bytes and rows."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("GET", f"/v1/jobs/{job_id}/faces?format={fmt}", headers={"Authorization": f"Bearer {TOKEN}"})
    body = conn.getresponse().read()
    if fmt == "csv":
        return len(body), body.count(b"\n") - 1
    import pyarrow.parquet as pq

    return len(body), pq.ParquetFile(io.BytesIO(body)).metadata.num_rows


def client(port: int, job_id: int, stop: float, out: dict[str, list[float]], errors: list[str],
           interval: float = 0.0, offset: float = 0.0) -> None:
    """Alternates a status poll with the next page of the face rows (from the start again after the last).

    With `interval` 0 it asks again as soon as it is answered (the server's capacity). Above 0 it polls as a client
    does: one status request and one page every `interval` seconds, the first after `offset`. A round that starts
    late, because the one before took longer than `interval`, adds its lateness to both its latencies, so a server
    that falls behind is charged for the wait (no coordinated omission) instead of the client asking less often.
    """
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    cursor = None
    due = time.perf_counter() + offset
    while time.monotonic() < stop:
        if interval:
            time.sleep(max(0.0, due - time.perf_counter()))
        late = max(0.0, time.perf_counter() - due) if interval else 0.0  # charged to both requests of the round
        for kind in ("status", "page"):
            if kind == "status":
                path = f"/v1/jobs/{job_id}"
            else:
                path = f"/v1/jobs/{job_id}/faces?limit=1000" + (f"&cursor={urllib.parse.quote(cursor)}" if cursor
                                                                 else "")  # fmt: skip
            t = time.perf_counter()
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
            body = resp.read()
            out[kind].append(time.perf_counter() - t + late)
            if resp.status != 200:
                errors.append(f"{resp.status} {body[:200]!r}")
                continue
            if kind == "page":
                doc = json.loads(body)
                if len(doc["items"]) != 1000 and doc["next_cursor"]:
                    errors.append(f"a page of {len(doc['items'])} rows")
                cursor = doc["next_cursor"]
        due += interval


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pg", default=os.environ.get("FERVID_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test"))
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--interval", type=float, default=0.0,
                    help="each client polls every INTERVAL s (0: asks again as soon as it is answered)")
    ap.add_argument("--workers", type=int, default=1, help="fervid serve --workers")
    ap.add_argument("--download", nargs="*", default=[], choices=["csv", "parquet"],
                    help="then time one whole-job download in each of these formats")
    ap.add_argument("--broker", default=os.environ.get("FERVID_BROKER_URL", "redis://127.0.0.1:6379/15"))
    args = ap.parse_args()

    import psycopg

    name = f"fervid_bench_{uuid.uuid4().hex[:8]}"
    admin = psycopg.connect(args.pg, autocommit=True)
    admin.execute(f'CREATE DATABASE "{name}"')
    url = args.pg.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + "/" + name
    proc = None
    try:
        t0 = time.perf_counter()
        job_id = fill(url, args.rows)
        print(f"filled job {job_id} with {args.rows:,} face rows in {time.perf_counter() - t0:.0f} s", flush=True)
        port = free_port()
        env = {**os.environ, "FERVID_DATABASE_URL": url, "FERVID_API_TOKENS": TOKEN,
               "FERVID_HOME": f"/tmp/{name}", "FERVID_MEDIA_ROOTS": f"/tmp/{name}"}  # fmt: skip
        env.pop("FERVID_BROKER_URL", None)
        if args.workers > 1:
            env["FERVID_BROKER_URL"] = args.broker
        workers = ["--workers", str(args.workers)] if args.workers > 1 else []
        proc = subprocess.Popen([sys.executable, "-m", "fervid.cli", "serve", "--port", str(port), "--log-level",
                                 "warning", *workers], cwd=ROOT, env=env)  # fmt: skip
        wait_until_serving(port, args.workers)
        out: dict[str, list[float]] = {"status": [], "page": []}
        errors: list[str] = []
        stop = time.monotonic() + args.seconds
        # Paced clients start spread over one interval, as independent pollers would be.
        threads = [threading.Thread(target=client, args=(port, job_id, stop, out, errors, args.interval,
                                                         args.interval * i / args.clients))
                   for i in range(args.clients)]  # fmt: skip
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - started
        total = sum(len(v) for v in out.values())
        print(f"{cpu_name()}, {os.cpu_count()} cores, {dt.date.today()}: `{' '.join(['python', *sys.argv])}`")
        pace = f"each polling every {args.interval:g} s" if args.interval else "each asking again when answered"
        print(f"{args.workers} server processes, {args.clients} clients ({pace}), {wall:.0f} s, {total:,} requests "
              f"({total / wall:.0f}/s), {len(errors)} errors")
        for kind, lat in out.items():
            ms = np.array(lat) * 1000
            print(f"  {kind:>6}: n={len(ms):,}  p50 {np.percentile(ms, 50):.1f} ms  p99 {np.percentile(ms, 99):.1f} ms"
                  f"  {len(ms) / wall:.0f} req/s")  # fmt: skip
        for fmt in args.download:
            t = time.perf_counter()
            size, rows = download(port, job_id, fmt)
            took = time.perf_counter() - t
            print(f"  download format={fmt}: {rows:,} rows, {size / 2**20:.0f} MiB in {took:.1f} s "
                  f"({rows / took:,.0f} rows/s)")  # fmt: skip
            if rows != args.rows:
                errors.append(f"the {fmt} download held {rows:,} rows, not {args.rows:,}")
        if errors:
            print("errors, first:", errors[0])
        return 1 if errors else 0
    finally:
        if proc:
            proc.terminate()
            proc.wait(timeout=60)
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


if __name__ == "__main__":
    sys.exit(main())
