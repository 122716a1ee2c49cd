"""Throughput of the queue: N copies of a real clip through K CPU workers, against `fervid analyze` in one process.

    python -m scripts.bench_cluster [--copies 4] [--workers 2] [--fps 5] [--segment 10] [--clip PATH] [--repeat K]

Starts its own redis-server and uses a fresh PostgreSQL database (127.0.0.1:5432) for both runs. The copies are
remuxed with a different tag each, so their content hashes (job identities) differ while their frames don't;
`--repeat K` plays the clip K times in a row in each copy, for segments as long as real ones (60 s of video).
Queue overhead per segment = the time a segment holds a worker beyond its own compute (claiming it, its lease,
the commit), plus the gap before the worker starts its next segment; it is reported against the compute time.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg
from sqlalchemy import select

from fervid.worker.store.db import open_database
from fervid.worker.store.schema import Job, Segment, Status
from scripts.bench_models import command_line, machine

ROOT = Path(__file__).resolve().parents[1]
PG = "postgresql://postgres@127.0.0.1:5432/test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_copies(clip: Path, n: int, out: Path, repeat: int = 1) -> list[Path]:
    import imageio_ffmpeg

    listing = out.parent / f"{out.name}-concat.txt"  # outside the media root: only ffmpeg here reads it
    listing.write_text(f"file '{clip}'\n" * repeat)
    paths = []
    for i in range(n):
        p = out / f"copy{i}{clip.suffix}"
        subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-y", "-f", "concat", "-safe", "0",
                        "-i", str(listing), "-c", "copy", "-metadata", f"comment=copy {i}", str(p)],
                       check=True)  # fmt: skip
        paths.append(p)
    return paths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--copies", type=int, default=4)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--fps", default="5")
    p.add_argument("--segment", default="10")
    p.add_argument("--repeat", type=int, default=1, help="play the clip this many times in a row in each copy")
    p.add_argument("--clip", default=str(ROOT.parent / "shared" / "videos" / "pyfeat_WolfgangLanger_Pexels.mp4"))
    args = p.parse_args()
    import torch

    tmp = Path(tempfile.mkdtemp())
    name = f"fervid_bench_{uuid.uuid4().hex[:8]}"
    admin = psycopg.connect(PG, autocommit=True)
    admin.execute(f'CREATE DATABASE "{name}"')
    db = PG.replace("postgresql://", "postgresql+psycopg://").rsplit("/", 1)[0] + "/" + name
    port = free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no", "--dir", str(tmp)], stdout=subprocess.DEVNULL)  # fmt: skip
    env = os.environ | {"FERVID_DATABASE_URL": db, "FERVID_BROKER_URL": f"redis://127.0.0.1:{port}/0",
                        "FERVID_MEDIA_ROOTS": str(tmp), "PYTHONUNBUFFERED": "1"}  # fmt: skip
    workers = None
    try:
        copies = make_copies(Path(args.clip), args.copies, tmp, args.repeat)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "fervid.cli", "analyze", *map(str, copies), "--fps", args.fps,
                        "--device", "cpu"], cwd=ROOT, env=env | {"FERVID_DATABASE_URL": db}, check=True,
                       capture_output=True)  # fmt: skip
        one_process = time.perf_counter() - t0

        with open_database(db).begin() as s:  # the cluster run starts from an empty database
            s.execute(Job.__table__.delete())
        workers = subprocess.Popen([sys.executable, "-m", "fervid.cli", "worker", "--gpus", "none", "--concurrency",
                                    str(args.workers), "--loglevel", "WARNING"], cwd=ROOT, env=env,
                                   start_new_session=True)  # fmt: skip
        time.sleep(8)  # workers up (imports); the timed part starts at submit
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "fervid.cli", "submit", *map(str, copies), "--fps", args.fps,
                        "--segment", args.segment, "--wait"], cwd=ROOT, env=env, check=True,
                       capture_output=True)  # fmt: skip
        cluster = time.perf_counter() - t0

        with open_database(db)() as s:
            jobs = s.scalars(select(Job)).all()
            segs = s.scalars(select(Segment)).all()
        assert all(j.status == Status.DONE for j in jobs), [j.error for j in jobs]
        frames = sum(j.frames_analyzed for j in jobs)
        compute = sum(sg.timings["compute"] for sg in segs)
        held = sum((sg.finished_at - sg.started_at).total_seconds() for sg in segs)
        gaps = 0.0
        by_worker: dict[str, list] = {}
        for sg in segs:
            by_worker.setdefault(sg.worker, []).append(sg)
        for lst in by_worker.values():
            lst.sort(key=lambda sg: sg.started_at)
            gaps += sum(
                max(0.0, (b.started_at - a.finished_at).total_seconds()) for a, b in zip(lst, lst[1:], strict=False)
            )
        overhead = (held - compute + gaps) / compute
        write = sum(sg.timings["write"] for sg in segs)
    finally:
        if workers is not None:
            os.killpg(workers.pid, signal.SIGTERM)
            workers.wait(60)
        redis.send_signal(signal.SIGTERM)
        redis.wait(10)
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"Machine: {machine(torch.device('cpu'))}; {datetime.date.today()}")
    print(f"Command: `{command_line()}`\n")
    print("| run | jobs | segments | frames | wall s | jobs/hour | frames/s | queue+DB overhead per segment |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    print(
        f"| `fervid analyze`, 1 process | {len(jobs)} | - | {frames} | {one_process:.1f} | "
        f"{len(jobs) / one_process * 3600:.0f} | {frames / one_process:.1f} | - |"
    )
    print(
        f"| `fervid submit` to {args.workers} CPU workers | {len(jobs)} | {len(segs)} | {frames} | {cluster:.1f} | "
        f"{len(jobs) / cluster * 3600:.0f} | {frames / cluster:.1f} | {overhead:.1%} |"
    )
    n = len(segs)
    print(f"\nPer segment: compute {compute / n:.2f} s; write and finish (one transaction) {write / n * 1000:.0f} ms; "
          f"claim, lease and the rest {(held - compute - write) / n * 1000:.0f} ms; wait for the next segment "
          f"{gaps / max(n - len(by_worker), 1) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
