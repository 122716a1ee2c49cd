"""PostgreSQL's bulk path for a segment's rows: COPY ... FROM STDIN through psycopg 3, in the caller's transaction.

An INSERT per row (even batched by executemany) costs the client a parameter set and the server a statement per
row; COPY streams the rows as one stream. Text format, not binary: in a one-off comparison on 3,776 face and frame
rows (not a committed benchmark) binary was not clearly faster (104-136 ms against 128-136 ms), and text keeps the
stored values exactly what the INSERT path stores (a float32 written as the double it is, the landmarks' JSON as
json.dumps writes it), so the two paths give identical rows (tests/test_writes.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import TYPE_CHECKING

import psycopg
from sqlalchemy import Connection, Engine
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session

from fervid.worker.store.schema import EMOTIONS

if TYPE_CHECKING:
    from fervid.worker.pipeline.frames_to_rows import SegmentRows

FRAME_COLUMNS = ("job_id", "frame_index", "time_ms", "n_faces")
FACE_COLUMNS = ("job_id", "frame_index", "face", "time_ms", "x1", "y1", "x2", "y2", "det_score", "landmarks",
                *EMOTIONS, "emotion")  # fmt: skip
# Bytes handed to COPY at a time: bounded, so a long segment never becomes one huge string in memory.
BUFFER = 1 << 20


def copy_capable(bind: Engine | Connection | None) -> bool:
    """PostgreSQL through psycopg 3, whose cursors take COPY ... FROM STDIN."""
    return bind is not None and bind.dialect.name == "postgresql" and bind.dialect.driver == "psycopg"


def supports_copy(session: Session) -> bool:
    return copy_capable(session.get_bind())


def frame_lines(rows: SegmentRows, job_id: int) -> Iterator[str]:
    for idx, t_ms, n in rows.frames():
        yield f"{job_id}\t{idx}\t{t_ms!r}\t{n}\n"


def face_lines(rows: SegmentRows, job_id: int) -> Iterator[str]:
    """COPY text lines of the `faces` rows: the values worker.store.rows.face_dicts gives the INSERT path."""
    for frame, face, t_ms, boxes, scores, lms, probs in rows.face_arrays():
        for f, k, t, box, score, lm, p in zip(frame.tolist(), face.tolist(), t_ms.tolist(), boxes.tolist(),
                                              scores.tolist(), lms.tolist(), probs.tolist(), strict=True):  # fmt: skip
            landmarks = json.dumps([[round(x, 2), round(y, 2)] for x, y in lm])
            top = EMOTIONS[max(range(len(p)), key=p.__getitem__)]
            yield (f"{job_id}\t{f}\t{k}\t{t!r}\t{box[0]!r}\t{box[1]!r}\t{box[2]!r}\t{box[3]!r}\t{score!r}\t"
                   f"{landmarks}\t" + "\t".join(map(repr, p)) + f"\t{top}\n")  # fmt: skip


def _copy(cursor, table: str, columns: tuple[str, ...], lines: Iterator[str]) -> None:  # noqa: ANN001
    with cursor.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
        buf: list[str] = []
        size = 0
        for line in lines:
            buf.append(line)
            size += len(line)
            if size >= BUFFER:
                copy.write("".join(buf))
                buf, size = [], 0
        if buf:
            copy.write("".join(buf))


def copy_tracks(session: Session, job_id: int, updates: list[dict]) -> None:
    """Set faces' track ids ({frame_index, face, track} dicts) with one COPY into a temporary table and one
    UPDATE joined to it, instead of an UPDATE per face."""
    conn = session.connection()
    dbapi = conn.connection.dbapi_connection
    try:
        with dbapi.cursor() as cur:
            cur.execute("CREATE TEMPORARY TABLE IF NOT EXISTS fervid_tracks "
                        "(frame_index integer, face smallint, track integer) ON COMMIT DELETE ROWS")  # fmt: skip
            cur.execute("TRUNCATE fervid_tracks")
            lines = (f"{u['frame_index']}\t{u['face']}\t{u['track']}\n" for u in updates)
            _copy(cur, "fervid_tracks", ("frame_index", "face", "track"), lines)
            cur.execute("UPDATE faces SET track = t.track FROM fervid_tracks t WHERE faces.job_id = %s "
                        "AND faces.frame_index = t.frame_index AND faces.face = t.face", (job_id,))  # fmt: skip
    except psycopg.Error as e:
        _raise(conn, dbapi, e, "COPY fervid_tracks")


def _raise(conn, dbapi, e: psycopg.Error, statement: str) -> None:  # noqa: ANN001
    """psycopg's error as SQLAlchemy's (IntegrityError, OperationalError, ...), as from any other statement, so the
    callers' retry and failure rules apply unchanged."""
    broken = dbapi.closed or dbapi.broken
    if broken:
        conn.invalidate(e)
    raise sa_exc.DBAPIError.instance(statement, None, e, psycopg.Error, connection_invalidated=broken) from e


def copy_rows(session: Session, rows: SegmentRows, job_id: int) -> None:
    """Append `rows` to `frames` and `faces` with COPY, in the session's transaction (PostgreSQL with psycopg)."""
    conn = session.connection()
    dbapi = conn.connection.dbapi_connection
    for table, columns, lines in (("frames", FRAME_COLUMNS, frame_lines(rows, job_id)),
                                  ("faces", FACE_COLUMNS, face_lines(rows, job_id))):  # fmt: skip
        try:
            with dbapi.cursor() as cur:
                _copy(cur, table, columns, lines)
        except psycopg.Error as e:
            _raise(conn, dbapi, e, f"COPY {table}")
