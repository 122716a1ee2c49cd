"""Storage at size: bytes per face and frame row on disk, and the timeline queries and the write path's statements on
a 10-million-face-row job among other jobs, for each candidate PostgreSQL layout.

    python -m scripts.bench_storage [--rows 10000000] [--other-jobs 30] [--other-rows 3000000]
        [--layouts current,brin,hash16] [--pg postgresql+psycopg://postgres@127.0.0.1:5432/test]
        [--db fervid_bench_10m] [--fill-into LAYOUT] [--reuse] [--keep]

The database `--db` is created afresh on the server of `--pg` (and dropped at the end unless `--keep`), migrated to
the newest revision (the layout users get) and filled server-side with generate_series, a
segment (60 s of video, 1,500 frames, 6,000 faces) per statement, the segments of the big job and of the other
jobs interleaved as concurrent workers write them, so the heap is mixed as in a real database. Rows go in with
the indexes in place (so the indexes' bytes are those of a live system, page splits included), then VACUUM
ANALYZE (what autovacuum does to an insert-only table).

Each layout (`--layouts`, in order, each applied to the database the previous one left):
  current    the tables as the migrations leave them: B-tree primary keys and (job_id, time_ms) indexes
  brin       the (job_id, time_ms) B-trees of faces and frames replaced by BRIN indexes on the same columns
  hash16     faces and frames rebuilt as tables partitioned by HASH (job_id), 16 partitions each
  nojit      the tables as they are, with JIT compilation off for the database (ALTER DATABASE ... SET jit)

and for each: bytes per row (heap, TOAST and each index, over the row count), then best of 3 on the big job:
the query benchmark's queries through worker.store.query (a 10 s range of all tracks, one track over 60 s, one
whole track into pandas, the summary), a 10 s range of one small job, the HTTP API's chart of the whole job
(downsampled_series) and a 1,000-row page of a 10 s range (face_page), and the write path's statements for one
segment in the middle of the big job: worker.store.rows.delete_range (rolled back), one 20,000-row keyset page
of assign_tracks' read and its UPDATE of 20,000 track ids (rolled back). Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import datetime
import time
from collections.abc import Callable
from typing import TypeVar

import psycopg
from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, select, text, tuple_, update
from sqlalchemy.orm import sessionmaker

from fervid.worker.store import query, rows
from fervid.worker.store.db import MIGRATIONS, make_engine
from fervid.worker.store.schema import EMOTIONS, Face, Job, Status
from scripts.bench_models import command_line
from scripts.bench_queries import best

T = TypeVar("T")
TRACKS, FPS, SEGMENT_S = 4, 25.0, 60.0
SEG_FRAMES = int(SEGMENT_S * FPS)
BASELINE = "head"  # the revision whose layout is "current"
PARTITIONS = 16

# One segment's face rows, generated on the server: 4 faces per frame, boxes and landmarks that move a little,
# probabilities that sum to 1, the top emotion, and landmarks as the JSON text json.dumps writes (so the bytes per
# row are the real ones). The LATERAL subqueries refer to f and k so that random() runs per row, not once.
_PROBS = ", ".join(f"p.r{i} / p.s" for i in range(7))
_TOP = "(ARRAY[" + ", ".join(f"'{e}'" for e in EMOTIONS) + "])[" + \
       "CASE greatest(" + ", ".join(f"p.r{i}" for i in range(7)) + ") " + \
       " ".join(f"WHEN p.r{i} THEN {i + 1}" for i in range(7)) + " END]"  # fmt: skip
_LM = "format('[[%s, %s], [%s, %s], [%s, %s], [%s, %s], [%s, %s]]', " + ", ".join(
    f"round((b.x + {dx})::numeric, 2), round((b.y + {dy})::numeric, 2)"
    for dx, dy in ((25.13, 30.41), (55.72, 30.09), (40.26, 45.88), (28.35, 62.17), (52.91, 61.66))
) + ")::json"
FACES_SQL = f"""
INSERT INTO faces (job_id, frame_index, face, time_ms, track, x1, y1, x2, y2, det_score, landmarks,
                   {", ".join(EMOTIONS)}, emotion)
SELECT CAST(:job AS integer), f, k, f * {1000 / FPS}, k, b.x, b.y, b.x + 80, b.y + 80, 0.9 + b.d * 0.1,
       {_LM}, {_PROBS}, {_TOP}
FROM generate_series(CAST(:f0 AS integer), CAST(:f1 AS integer)) f, generate_series(0, {TRACKS - 1}) k,
LATERAL (SELECT 200 * k + random() * 20 + 0 * f AS x, 100 + random() * 20 AS y, random() AS d) b,
LATERAL (SELECT r0, r1, r2, r3, r4, r5, r6, r0 + r1 + r2 + r3 + r4 + r5 + r6 AS s FROM
         (SELECT {", ".join(f"random() + 0 * (f + k) AS r{i}" for i in range(7))}) q) p
"""
FRAMES_SQL = f"""
INSERT INTO frames (job_id, frame_index, time_ms, n_faces)
SELECT CAST(:job AS integer), f, f * {1000 / FPS}, {TRACKS}
FROM generate_series(CAST(:f0 AS integer), CAST(:f1 AS integer)) f
"""


def upgrade(engine: Engine, revision: str) -> None:
    """worker.store.db.migrate, to a given revision."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


# ------------------------------------------------------------------------------------------------------ the data


def add_job(conn: Connection, key: str, n_frames: int) -> int:
    return conn.execute(
        Job.__table__.insert().returning(Job.id),
        {"job_key": key, "path": f"/bench/{key}.mp4", "size_bytes": 0, "sha256": "0" * 64, "status": Status.DONE,
         "sample_fps": FPS, "fps": FPS, "model": "small", "model_sha256": "-", "detector": "-", "run": 1,
         "start_s": 0.0, "score_threshold": 0.9, "min_face": 48, "max_faces": 64, "priority": 0,
         "segment_s": SEGMENT_S, "duration_s": n_frames / FPS, "frames_analyzed": n_frames,
         "faces_found": n_frames * TRACKS, "frame_count": n_frames},
    ).scalar_one()  # fmt: skip


def fill(engine: Engine, n_rows: int, other_jobs: int, other_rows: int) -> tuple[int, list[int], float]:
    """The big job and `other_jobs` jobs sharing `other_rows`, written a segment per statement in the order
    concurrent workers would finish them (each job's segments spread evenly over the run). Returns the big job's
    id, the others' ids and the seconds VACUUM ANALYZE took."""
    big_frames = n_rows // TRACKS
    small_frames = other_rows // TRACKS // max(other_jobs, 1)
    with engine.begin() as c:
        big = add_job(c, "bench-big", big_frames)
        others = [add_job(c, f"bench-other-{i}", small_frames) for i in range(other_jobs)]
    order: list[tuple[float, int, int, int]] = []  # (share of the job done, job, first frame, last frame)
    for job, frames in [(big, big_frames)] + [(j, small_frames) for j in others]:
        n_seg = -(-frames // SEG_FRAMES)
        order += [((s + 0.5) / n_seg, job, s * SEG_FRAMES, min((s + 1) * SEG_FRAMES, frames) - 1)
                  for s in range(n_seg)]  # fmt: skip
    order.sort()
    with engine.connect() as c:
        for i, (_, job, f0, f1) in enumerate(order):
            c.execute(text(FRAMES_SQL), {"job": job, "f0": f0, "f1": f1})
            c.execute(text(FACES_SQL), {"job": job, "f0": f0, "f1": f1})
            if i % 20 == 19:
                c.commit()
        c.commit()
    t0 = time.perf_counter()
    vacuum(engine)
    return big, others, time.perf_counter() - t0


def vacuum(engine: Engine) -> None:
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
        c.execute(text("VACUUM ANALYZE jobs, frames, faces"))


# ------------------------------------------------------------------------------------------------------ layouts


def sql(engine: Engine, *statements: str) -> None:
    with engine.begin() as c:
        for s in statements:
            c.execute(text(s))


def to_brin(engine: Engine) -> None:
    sql(engine, "DROP INDEX ix_faces_job_time", "DROP INDEX ix_frames_job_time",
        "CREATE INDEX ix_faces_job_time ON faces USING brin (job_id, time_ms)",
        "CREATE INDEX ix_frames_job_time ON frames USING brin (job_id, time_ms)")  # fmt: skip


def from_brin(engine: Engine) -> None:
    sql(engine,
        "DROP INDEX ix_faces_job_time", "CREATE INDEX ix_faces_job_time ON faces (job_id, time_ms)",
        "DROP INDEX ix_frames_job_time", "CREATE INDEX ix_frames_job_time ON frames (job_id, time_ms)")  # fmt: skip


def to_hash(engine: Engine) -> None:
    """The tables rebuilt as HASH (job_id) partitioned tables, the way a migration would do it on a live database:
    a new table beside the old one, the rows copied, the names swapped, the old table dropped."""
    with engine.connect() as c:  # already partitioned (filled into this layout): nothing to do
        if c.execute(text("SELECT relkind FROM pg_class WHERE oid = 'faces'::regclass")).scalar_one() == "p":
            return
    statements = []
    for table, indexes in (("faces", ("ix_faces_job_time (job_id, time_ms)",
                                      "ix_faces_job_track_time (job_id, track, time_ms)")),
                           ("frames", ("ix_frames_job_time (job_id, time_ms)",))):  # fmt: skip
        key = "job_id, frame_index, face" if table == "faces" else "job_id, frame_index"
        statements += [
            f"CREATE TABLE {table}_new (LIKE {table} INCLUDING DEFAULTS) PARTITION BY HASH (job_id)",
            *(f"CREATE TABLE {table}_p{i:02d} PARTITION OF {table}_new "
              f"FOR VALUES WITH (MODULUS {PARTITIONS}, REMAINDER {i})" for i in range(PARTITIONS)),
            f"INSERT INTO {table}_new SELECT * FROM {table}",
            f"DROP TABLE {table}",
            f"ALTER TABLE {table}_new RENAME TO {table}",
            f"ALTER TABLE {table} ADD CONSTRAINT {table}_pkey PRIMARY KEY ({key})",
            f"ALTER TABLE {table} ADD CONSTRAINT {table}_job_id_fkey FOREIGN KEY (job_id) REFERENCES jobs (id) "
            "ON DELETE CASCADE",
            *(f"CREATE INDEX {ix.split(' ', 1)[0]} ON {table} {ix.split(' ', 1)[1]}" for ix in indexes),
        ]
    sql(engine, *statements)


def no_jit(engine: Engine) -> None:
    """No JIT compilation for this database's sessions: the tables as they are, the planner's setting changed."""
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
        c.execute(text("DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET jit = off', current_database()); END $$"))
    engine.dispose()  # the pool's connections have the old setting


LAYOUTS: dict[str, Callable[[Engine], None]] = {"current": lambda e: None, "brin": to_brin, "hash16": to_hash,
                                                "nojit": no_jit}  # fmt: skip
UNDO: dict[str, Callable[[Engine], None]] = {"brin": from_brin}  # layouts the next one must not build on


# ------------------------------------------------------------------------------------------------ measurements


def sizes(engine: Engine, table: str) -> tuple[int, dict[str, int]]:
    """The table's row count and bytes on disk: heap (main fork), TOAST (table and its index) and each index by
    name, summed over partitions when the table is partitioned (the free space and visibility maps are left out:
    a few pages per GB)."""
    q = text("""
        WITH parts AS (SELECT relid FROM pg_partition_tree(CAST(:t AS regclass)) WHERE isleaf
                       UNION ALL SELECT oid FROM pg_class WHERE oid = CAST(:t AS regclass) AND relkind = 'r')
        SELECT 'heap', sum(pg_relation_size(relid)) FROM parts
        UNION ALL SELECT 'toast', coalesce(sum(pg_total_relation_size(c.reltoastrelid)), 0)
            FROM parts JOIN pg_class c ON c.oid = parts.relid WHERE c.reltoastrelid <> 0
        UNION ALL SELECT coalesce(pi.inhparent::regclass::text, i.indexrelid::regclass::text),
                         sum(pg_relation_size(i.indexrelid))
            FROM parts JOIN pg_index i ON i.indrelid = parts.relid
            LEFT JOIN pg_inherits pi ON pi.inhrelid = i.indexrelid
            GROUP BY 1
    """)
    with engine.connect() as c:
        n = c.execute(text(f"SELECT count(*) FROM {table}")).scalar_one()
        parts = {name: int(b or 0) for name, b in c.execute(q, {"t": table})}
    return n, parts


def size_rows(engine: Engine, layout: str) -> list[str]:
    out = []
    for table in ("faces", "frames"):
        n, parts = sizes(engine, table)
        total = sum(parts.values())
        cells = ", ".join(f"{k} {v / n:.1f}" for k, v in parts.items() if k not in ("heap", "toast"))
        out.append(f"| {layout} | {table} | {n:,} | {parts['heap'] / n:.1f} | {parts['toast'] / n:.2f} | {cells} | "
                   f"**{total / n:.1f}** | {total / 2**30:.2f} GiB |")  # fmt: skip
    return out


def timings(sessions: sessionmaker, big: int, n_rows: int, small: int) -> dict[str, float]:
    """Best-of-3 seconds of each query and write statement (see the module's docstring)."""
    mid = n_rows // TRACKS / FPS / 2
    out: dict[str, float] = {}
    out["range10"], df = best(lambda: query.timeline(big, start_s=mid, end_s=mid + 10, db=sessions))
    assert len(df) == 10 * FPS * TRACKS, len(df)
    out["track60"], df = best(lambda: query.timeline(big, track=2, start_s=mid, end_s=mid + 60, db=sessions))
    assert len(df) == 60 * FPS, len(df)
    out["track"], df = best(lambda: query.timeline(big, track=1, db=sessions))
    assert len(df) == n_rows // TRACKS, len(df)
    out["summary"], summ = best(lambda: query.summary(big, db=sessions))
    assert summ["video"]["faces"] == n_rows
    out["small10"], df = best(lambda: query.timeline(small, start_s=30, end_s=40, db=sessions))
    assert len(df) == 10 * FPS * TRACKS, len(df)

    # The HTTP API's reads: a chart of the whole job (downsampled in SQL), and a 10 s page of face rows.
    def chart() -> dict:
        with sessions() as s:
            return query.downsampled_series(s, big)

    out["chart"], got = best(chart)
    assert len(got["tracks"]) == TRACKS

    def face_page() -> object:
        with sessions() as s:
            return query.face_page(s, big, start_s=mid, end_s=mid + 10, limit=1000)[0]

    out["page10"], df = best(face_page)
    assert len(df) == 1000, len(df)

    seg_start = (mid // SEGMENT_S) * SEGMENT_S  # one segment's range, as a rerun of it deletes it

    def delete_segment() -> None:
        with sessions() as s:
            rows.delete_range(s, big, seg_start, seg_start + SEGMENT_S)
            s.rollback()

    out["delete"], _ = best(delete_segment)
    after = (int(mid * FPS), -1)
    cols = (Face.frame_index, Face.face, Face.time_ms, Face.x1, Face.y1, Face.x2, Face.y2, Face.landmarks)

    def page() -> list:  # assign_tracks' keyset page, as it reads it
        with sessions() as s:
            return s.execute(select(*cols).where(Face.job_id == big, tuple_(Face.frame_index, Face.face) > after)
                             .order_by(Face.frame_index, Face.face).limit(20_000)).all()  # fmt: skip

    out["page"], got = best(page)
    assert len(got) == 20_000
    updates = [{"job_id": big, "frame_index": r[0], "face": r[1], "track": r[1] + 10} for r in got]

    def update_page() -> None:  # and its UPDATE of the page's track ids
        with sessions() as s:
            s.execute(update(Face), updates)
            s.rollback()

    out["update"], _ = best(update_page)
    return out


def time_row(layout: str, t: dict[str, float]) -> str:
    ms = lambda k: f"{t[k] * 1000:.0f} ms"  # noqa: E731
    return (f"| {layout} | {ms('range10')} | {ms('track60')} | {t['track']:.2f} s | {t['summary']:.2f} s | "
            f"{ms('small10')} | {ms('chart')} | {ms('page10')} | {ms('delete')} | {ms('page')} | "
            f"{ms('update')} |")  # fmt: skip


# ------------------------------------------------------------------------------------------------------ main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=10_000_000, help="face rows of the big job")
    p.add_argument("--other-jobs", type=int, default=30)
    p.add_argument("--other-rows", type=int, default=3_000_000, help="face rows of the other jobs together")
    p.add_argument("--layouts", default="current,brin,hash16")
    p.add_argument("--pg", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    p.add_argument("--db", default="fervid_bench_10m", help="the database to create (and drop) on that server")
    p.add_argument("--fill-into", choices=[k for k in LAYOUTS if k != "current"],
                   help="apply this layout to the empty tables before filling them")  # fmt: skip
    p.add_argument("--reuse", action="store_true", help="use the database a --keep run left, without filling it")
    p.add_argument("--keep", action="store_true", help="keep the database at the end")
    args = p.parse_args()
    base = args.pg.replace("postgresql+psycopg://", "postgresql://")
    url = args.pg.rsplit("/", 1)[0] + "/" + args.db
    with psycopg.connect(base, autocommit=True) as admin:
        version = admin.execute("SHOW server_version").fetchone()[0]
        if not args.reuse:
            admin.execute(f'DROP DATABASE IF EXISTS "{args.db}" WITH (FORCE)')
            admin.execute(f'CREATE DATABASE "{args.db}"')
    print(f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; PostgreSQL {version}; "
          f"command: `{command_line()}`\n", flush=True)
    engine = make_engine(url)
    sessions = sessionmaker(engine, expire_on_commit=False)
    if args.reuse:
        with engine.connect() as c:
            big = c.execute(text("SELECT id FROM jobs WHERE job_key = 'bench-big'")).scalar_one()
            small = c.execute(text("SELECT min(id) FROM jobs WHERE job_key LIKE 'bench-other-%'")).scalar_one()
    else:
        upgrade(engine, BASELINE)
        if args.fill_into:  # the empty tables in a candidate layout, so its indexes grow as a live system's do
            LAYOUTS[args.fill_into](engine)
        t0 = time.perf_counter()
        big, others, vacuum_s = fill(engine, args.rows, args.other_jobs, args.other_rows)
        total = args.rows + args.other_rows
        fill_s = time.perf_counter() - t0
        into = f" into layout {args.fill_into}" if args.fill_into else ""
        print(f"fill{into}: {total:,} face rows ({args.rows:,} in job {big}, the rest in {args.other_jobs} jobs) in "
              f"{fill_s:.0f} s ({total / fill_s:,.0f} face rows/s with their frames, VACUUM ANALYZE "
              f"{vacuum_s:.0f} s of it)\n", flush=True)  # fmt: skip
        small = others[0]
    size_lines: list[str] = []
    time_lines: list[str] = []
    for layout in args.layouts.split(","):
        t0 = time.perf_counter()
        LAYOUTS[layout](engine)
        if layout != "current":
            vacuum(engine)
        build_s = time.perf_counter() - t0
        size_lines += size_rows(engine, layout)
        time_lines.append(time_row(layout, timings(sessions, big, args.rows, small)))
        print(f"layout {layout}: built in {build_s:.0f} s\n{size_lines[-2]}\n{size_lines[-1]}\n{time_lines[-1]}\n",
              flush=True)  # fmt: skip
        if layout in UNDO:
            UNDO[layout](engine)
    print("| layout | table | rows | heap B/row | TOAST B/row | each index B/row | total B/row | total |")
    print("|---|---|---:|---:|---:|---|---:|---:|")
    print("\n".join(size_lines) + "\n")
    print("| layout | 10 s range (all tracks) | 1 track, 60 s | 1 whole track | summary | small job, 10 s | "
          "chart (downsampled_series) | API page, 10 s | delete_range 1 segment | assign_tracks page read | "
          "its UPDATE |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(time_lines))
    engine.dispose()
    if not args.keep:
        with psycopg.connect(base, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{args.db}" WITH (FORCE)')


if __name__ == "__main__":
    main()
