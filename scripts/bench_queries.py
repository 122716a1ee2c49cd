"""Query speed on a large synthetic job: a million face rows in SQLite and in PostgreSQL.

    python -m scripts.bench_queries [--rows 1000000] [--pg postgresql+psycopg://postgres@127.0.0.1:5432/test]

The job: 4 tracks (people) in every frame at 25 fps, 250,000 frames (2 h 47 min of video). Times are the best
of 3 runs through the pandas API with an open connection pool: a time-range query (10 s, all tracks), a track
query over a minute, a whole-track query, and the summary. Prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import io
import tempfile
import time

import numpy as np
from sqlalchemy import insert, text

from fervid.worker.store import query
from fervid.worker.store.db import open_database
from fervid.worker.store.schema import EMOTIONS, Face, Frame, Job, Status
from scripts.bench_models import command_line

TRACKS, FPS = 4, 25.0


def fill(sessions, n_rows: int) -> int:
    rng = np.random.default_rng(0)
    n_frames = n_rows // TRACKS
    with sessions.begin() as s:
        job = Job(job_key=f"bench-{n_rows}", path="/bench/synthetic.mp4", size_bytes=0, sha256="0" * 64,
                  status=Status.DONE, sample_fps=FPS, model="small", model_sha256="-", detector="-", fps=FPS,
                  duration_s=n_frames / FPS, frames_analyzed=n_frames, faces_found=n_rows)  # fmt: skip
        s.add(job)
        s.flush()
        job_id = job.id
    t_ms = np.arange(n_frames) * 1000 / FPS
    logits = rng.normal(size=(n_rows, 7)).astype(np.float32)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    top = np.array(EMOTIONS)[probs.argmax(1)]
    engine = sessions.kw["bind"]
    if engine.dialect.name == "postgresql":
        # COPY: the bulk path a full GPU's write rate needs too.
        raw = engine.raw_connection()
        try:
            with raw.cursor() as cur:
                buf = io.StringIO("".join(f"{job_id}\t{i}\t{t}\t1\n" for i, t in enumerate(t_ms)))
                with cur.copy("COPY frames (job_id, frame_index, time_ms, n_faces) FROM STDIN") as cp:
                    cp.write(buf.getvalue())
                cols = "job_id, frame_index, face, time_ms, track, x1, y1, x2, y2, det_score, landmarks, " + \
                       ", ".join(EMOTIONS) + ", emotion"  # fmt: skip
                with cur.copy(f"COPY faces ({cols}) FROM STDIN") as cp:
                    for r in range(n_rows):
                        f, k = divmod(r, TRACKS)
                        p = "\t".join(f"{v:.5f}" for v in probs[r])
                        cp.write(f"{job_id}\t{f}\t{k}\t{t_ms[f]}\t{k}\t{100 * k}\t50\t{100 * k + 80}\t130\t0.99\t"
                                 f"[[0,0],[0,0],[0,0],[0,0],[0,0]]\t{p}\t{top[r]}\n")  # fmt: skip
            raw.commit()
        finally:
            raw.close()
        with engine.begin() as c:
            c.execute(text("ANALYZE frames"))
            c.execute(text("ANALYZE faces"))
    else:
        chunk = 50_000
        with sessions.begin() as s:
            s.execute(insert(Frame), [{"job_id": job_id, "frame_index": i, "time_ms": float(t), "n_faces": TRACKS}
                                      for i, t in enumerate(t_ms)])  # fmt: skip
            for a in range(0, n_rows, chunk):
                rows = []
                for r in range(a, min(a + chunk, n_rows)):
                    f, k = divmod(r, TRACKS)
                    row = {"job_id": job_id, "frame_index": f, "face": k, "time_ms": float(t_ms[f]), "track": k,
                           "x1": 100.0 * k, "y1": 50.0, "x2": 100.0 * k + 80, "y2": 130.0, "det_score": 0.99,
                           "landmarks": [[0, 0]] * 5, "emotion": str(top[r])}  # fmt: skip
                    row.update(zip(EMOTIONS, map(float, probs[r]), strict=True))
                    rows.append(row)
                s.execute(insert(Face), rows)
    return job_id


def best(fn, n: int = 3) -> tuple[float, object]:
    times, out = [], None
    for _ in range(n):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--pg", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    args = p.parse_args()
    print(f"{datetime.date.today()}; command: `{command_line()}`\n")
    print("| database | rows | fill s | 10 s time range (all tracks) | 1 track, 60 s | 1 whole track | summary |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, url in [("SQLite", f"sqlite:///{tmp}/bench.db"), ("PostgreSQL", args.pg)]:
            bench_database(name, url, args.rows)


def bench_database(name: str, url: str, n_rows: int) -> None:
    sessions = open_database(url)
    with sessions.begin() as s:  # a rerun starts clean
        s.execute(text("DELETE FROM jobs WHERE job_key LIKE 'bench-%'"))
    t0 = time.perf_counter()
    job = fill(sessions, n_rows)
    fill_s = time.perf_counter() - t0
    mid = n_rows // TRACKS / FPS / 2
    t_range, df = best(lambda: query.timeline(job, start_s=mid, end_s=mid + 10, db=sessions))
    assert len(df) == 10 * FPS * TRACKS
    t_track60, df = best(lambda: query.timeline(job, track=2, start_s=mid, end_s=mid + 60, db=sessions))
    assert len(df) == 60 * FPS
    t_track, df = best(lambda: query.timeline(job, track=1, db=sessions))
    assert len(df) == n_rows // TRACKS
    t_sum, summ = best(lambda: query.summary(job, db=sessions))
    assert summ["video"]["faces"] == n_rows
    print(f"| {name} | {n_rows:,} | {fill_s:.1f} | {t_range * 1000:.0f} ms | {t_track60 * 1000:.0f} ms | "
          f"{t_track:.2f} s | {t_sum:.2f} s |", flush=True)  # fmt: skip
    with sessions.begin() as s:
        s.execute(text("DELETE FROM jobs WHERE id = :j"), {"j": job})


if __name__ == "__main__":
    main()
