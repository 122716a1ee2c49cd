"""Writing a job's rows: a segment's computed frames and faces, as the tables take them, and the track ids that
link a job's faces into people once all of its segments are in.

The pipeline (worker.pipeline) computes plain values without knowing the tables; they are named as columns here,
beside the schema. Everything runs in the caller's transaction.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice
from typing import TYPE_CHECKING

import numpy as np
from sqlalchemy import delete, insert, select, tuple_, update
from sqlalchemy.orm import Session

from fervid.worker.store.copy import copy_rows, copy_tracks, supports_copy
from fervid.worker.store.schema import EMOTIONS, Face, Frame

if TYPE_CHECKING:
    from fervid.worker.pipeline.frames_to_rows import SegmentRows

# Rows per INSERT: bounded, so that a long segment's rows never become one huge statement (or dicts in memory).
CHUNK = 5000


def _chunks(rows: Iterable[dict], size: int) -> Iterator[list[dict]]:
    it = iter(rows)
    while chunk := list(islice(it, size)):
        yield chunk


def frame_dicts(rows: SegmentRows, job_id: int, chunk: int = CHUNK) -> Iterator[list[dict]]:
    """The `frames` rows of a segment, in chunks."""
    return _chunks(({"job_id": job_id, "frame_index": i, "time_ms": t, "n_faces": n} for i, t, n in rows.frames()),
                   chunk)  # fmt: skip


def face_dicts(rows: SegmentRows, job_id: int, chunk: int = CHUNK) -> Iterator[list[dict]]:
    """The `faces` rows of a segment, in chunks: box, landmarks, score, a column per emotion and the top one."""

    def face_row(frame: int, face: int, t_ms: float, box: np.ndarray, score: float, lms: np.ndarray,
                 probs: np.ndarray) -> dict:  # fmt: skip
        return {"job_id": job_id, "frame_index": frame, "face": face, "time_ms": t_ms,
                "x1": float(box[0]), "y1": float(box[1]), "x2": float(box[2]), "y2": float(box[3]),
                "det_score": score, "landmarks": [[round(float(x), 2), round(float(y), 2)] for x, y in lms],
                "emotion": EMOTIONS[int(probs.argmax())],
                **dict(zip(EMOTIONS, probs.tolist(), strict=True))}  # fmt: skip

    return _chunks((face_row(*f) for f in rows.faces()), chunk)


def delete_range(session: Session, job_id: int, start_s: float, end_s: float | None) -> None:
    """Delete the job's frames and faces in [start_s, end_s) (None: to the end)."""
    for table in (Face, Frame):
        in_range = [table.job_id == job_id, table.time_ms >= start_s * 1000]
        if end_s is not None:
            in_range.append(table.time_ms < end_s * 1000)
        session.execute(delete(table).where(*in_range))


def insert_rows(session: Session, rows: SegmentRows, job_id: int) -> None:
    """Append `rows` with INSERTs in bounded chunks: the portable path (SQLite), and PostgreSQL's before COPY."""
    for chunk in frame_dicts(rows, job_id):
        session.execute(insert(Frame), chunk)
    for chunk in face_dicts(rows, job_id):
        session.execute(insert(Face), chunk)


def replace_range(session: Session, job_id: int, start_s: float, end_s: float | None, rows: SegmentRows) -> None:
    """Replace the job's frames and faces in [start_s, end_s) (None: to the end) with `rows`: a segment that runs
    again replaces its rows, never duplicates them. PostgreSQL (psycopg) takes them through COPY."""
    delete_range(session, job_id, start_s, end_s)
    if supports_copy(session):
        copy_rows(session, rows, job_id)
    else:
        insert_rows(session, rows, job_id)


def assign_tracks(session: Session, job_id: int, max_gap_s: float | None = None, chunk: int = 20_000) -> int:
    """Link all faces of a job into tracks and store each face's track id, in the caller's transaction; returns
    the number of tracks. Faces are read and updated a chunk at a time (keyset pages in frame order), so memory
    holds one chunk and the live tracks, however long the job. `max_gap_s`: the tracker's (tracks.MAX_GAP_S)."""
    from fervid.worker.pipeline.tracks import MAX_GAP_S, Tracker  # SciPy (0.35 s): once a job ends, not in `status`

    tracker = Tracker(MAX_GAP_S if max_gap_s is None else max_gap_s)
    cols = (Face.frame_index, Face.face, Face.time_ms, Face.x1, Face.y1, Face.x2, Face.y2, Face.landmarks)
    after: tuple[int, int] = (-1, -1)
    pending: list[tuple] = []  # the faces of a frame that may continue on the next page
    while True:
        page = session.execute(
            select(*cols).where(Face.job_id == job_id, tuple_(Face.frame_index, Face.face) > after)
            .order_by(Face.frame_index, Face.face).limit(chunk)
        ).all()  # fmt: skip
        if page:
            after = (page[-1][0], page[-1][1])
        rows = pending + list(page)
        last_frame = rows[-1][0] if page and len(page) == chunk else None  # may be cut: keep it for next page
        pending = [r for r in rows if r[0] == last_frame]
        todo = [r for r in rows if r[0] != last_frame]
        updates = []
        i = 0
        while i < len(todo):
            j = i
            while j < len(todo) and todo[j][0] == todo[i][0]:
                j += 1
            frame = todo[i:j]
            ids = tracker.update(frame[0][2], np.array([r[3:7] for r in frame], dtype=np.float64),
                                 np.array([r[7] for r in frame], dtype=np.float64))  # fmt: skip
            updates += [{"job_id": job_id, "frame_index": r[0], "face": r[1], "track": t}
                        for r, t in zip(frame, ids, strict=True)]  # fmt: skip
            i = j
        if updates:
            if supports_copy(session):
                copy_tracks(session, job_id, updates)
            else:
                session.execute(update(Face), updates)
        if len(page) < chunk:  # the last page (a frame is only held back from a full page)
            return tracker.next_id
