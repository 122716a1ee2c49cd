"""The pipeline's write stage into PostgreSQL, three ways in one run, on a real clip at every frame.

    python -m scripts.bench_write_stage [--video ../shared/videos/pyfeat_WolfgangLanger_Pexels.mp4] [--repeat 8]
                                        [--pg postgresql+psycopg://postgres@127.0.0.1:5432/test]

The clip is joined to itself `--repeat` times without re-encoding (8 x 472 frames of 640x360: 3,776 frames, 2 min
37 s) and analysed by `analyze_video`, as `fervid analyze` does, into a fresh PostgreSQL database per way:
- insert: the rows as INSERTs (SQLAlchemy executemany) when the segment ends: the path before COPY;
- copy: the rows through COPY when the segment ends;
- stream: COPY by a thread beside the frame loop, into the segment's transaction (the product's default).
"write" is what the frame loop's thread spent writing (the segments' `write` timings: for the stream, its last
batch and the commit); "stream" is the streaming thread's time off the frame loop, wall and its own CPU (its wall
time includes waiting for the cores, which the models and the decoder keep busy). "track" links the faces into
tracks when the job ends, on the frame loop's thread too. Rows/s written: frame and face rows over the frame
loop's write time and, for the stream, its thread's wall time.
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import imageio_ffmpeg
import psycopg
import torch

from fervid.worker.pipeline.frames_to_rows import Analyzer
from fervid.worker.queue import jobs
from fervid.worker.settings import Settings
from fervid.worker.store import rows as rows_mod
from fervid.worker.store.db import open_database
from fervid.worker.store.schema import Status
from scripts.bench_models import command_line, machine

ROOT = Path(__file__).resolve().parents[1]
WAYS = ("insert", "copy", "stream")


def joined_clip(video: Path, repeat: int, folder: Path) -> Path:
    listing = folder / "list.txt"
    listing.write_text("".join(f"file '{video.resolve()}'\n" for _ in range(repeat)))
    out = folder / f"{video.stem}_x{repeat}{video.suffix}"
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", "-f", "concat",
                    "-safe", "0", "-i", str(listing), "-c", "copy", str(out)], check=True)  # fmt: skip
    return out


def use_way(way: str) -> None:
    """Choose the write path by swapping the two functions that decide it (benchmark only)."""
    jobs.can_stream = _can_stream if way == "stream" else (lambda _sessions: False)
    rows_mod.supports_copy = _supports_copy if way in ("copy", "stream") else (lambda _session: False)


_can_stream, _supports_copy = jobs.can_stream, rows_mod.supports_copy


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--video", type=Path, default=ROOT.parent / "shared" / "videos" / "pyfeat_WolfgangLanger_Pexels.mp4")
    p.add_argument("--repeat", type=int, default=8)
    p.add_argument("--pg", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    p.add_argument("--model", default="small")
    args = p.parse_args()

    analyzer = Analyzer(args.model, "cpu")
    admin_url = args.pg.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(admin_url, autocommit=True) as admin:
        version = admin.execute("SHOW server_version").fetchone()[0]
    print(f"Machine: {machine(torch.device('cpu'))}; PostgreSQL {version} on the same machine; {datetime.date.today()}")
    print(f"Command: `{command_line()}`\n")
    print("| write path | frames | faces | rows | write s (frame loop) | ms/frame (frame loop) | stream s wall / CPU "
          "(beside) | rows/s written | track s | wall s |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp, psycopg.connect(admin_url, autocommit=True) as admin:
        clip = joined_clip(args.video, args.repeat, Path(tmp))
        for way in WAYS:
            use_way(way)
            name = f"fervid_bench_{uuid.uuid4().hex[:8]}"
            admin.execute(f'CREATE DATABASE "{name}"')
            try:
                sessions = open_database(args.pg.rsplit("/", 1)[0] + "/" + name)
                t0 = time.perf_counter()
                job = jobs.analyze_video(clip, Settings(sample_fps=0), sessions, analyzer)
                wall = time.perf_counter() - t0
                assert job.status == Status.DONE, job.error
                tm = job.timings
                n_rows = job.frames_analyzed + job.faces_found
                written_s = tm["write"] + tm.get("stream", 0.0)
                print(f"| {way} | {job.frames_analyzed:,} | {job.faces_found:,} | {n_rows:,} | {tm['write']:.3f} | "
                      f"{1000 * tm['write'] / job.frames_analyzed:.3f} | {tm.get('stream', 0.0):.3f} / "
                      f"{tm.get('stream_cpu', 0.0):.3f} | {n_rows / written_s:,.0f} | {tm['track']:.3f} | "
                      f"{wall:.1f} |", flush=True)  # fmt: skip
                sessions.kw["bind"].dispose()
            finally:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    use_way("stream")


if __name__ == "__main__":
    main()
