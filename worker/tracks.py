"""Linking faces of consecutive analysed frames into tracks: one track per person while the face stays in view.

Each track predicts where its face will be (constant velocity of the box centre and size), and the faces of a
new frame are matched to the predictions by the Hungarian algorithm on a cost of box overlap (IoU) and landmark
distance. A track survives missed detections for `max_gap_s` of video time, so a blink of the detector or a
face briefly hidden keeps its id; two people crossing keep theirs because their predicted paths diverge.
Tracks are assigned over a whole job in frame order, so the segments of a long video join up.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from sqlalchemy import select, tuple_, update
from sqlalchemy.orm import Session

from fervid.worker.schema import Face

MAX_COST = 1.5


@dataclass
class _Track:
    id: int
    box: np.ndarray  # x1, y1, x2, y2
    landmarks: np.ndarray  # [5, 2]
    t_ms: float
    velocity: np.ndarray  # d(box)/d(ms), [4]

    def predict(self, t_ms: float) -> tuple[np.ndarray, np.ndarray]:
        shift = self.velocity * (t_ms - self.t_ms)
        return self.box + shift, self.landmarks + (shift[:2] + shift[2:]) / 2


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix of boxes a [M, 4] and b [N, 4]."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area = lambda x: (x[:, 2] - x[:, 0]).clip(0) * (x[:, 3] - x[:, 1]).clip(0)  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter + 1e-9)


class Tracker:
    def __init__(self, max_gap_s: float = 1.0) -> None:
        self.max_gap_ms = max_gap_s * 1000
        self.tracks: list[_Track] = []
        self.next_id = 0

    def update(self, t_ms: float, boxes: np.ndarray, landmarks: np.ndarray) -> list[int]:
        """Track ids for the faces of the frame at `t_ms` (boxes [K, 4], landmarks [K, 5, 2])."""
        self.tracks = [t for t in self.tracks if t_ms - t.t_ms <= self.max_gap_ms]
        ids = [-1] * len(boxes)
        if self.tracks and len(boxes):
            pred = [t.predict(t_ms) for t in self.tracks]
            pboxes = np.stack([p[0] for p in pred])
            plms = np.stack([p[1] for p in pred])
            size = np.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clip(1)
            lm_dist = np.linalg.norm(plms[:, None] - landmarks[None], axis=-1).mean(-1) / size[None, :]
            cost = (1 - _iou(pboxes, boxes)) + lm_dist
            cost[lm_dist > 0.5] = np.inf  # too far to be the same face, whatever the overlap
            rows, cols = linear_sum_assignment(np.where(np.isfinite(cost), cost, 1e6))
            for r, c in zip(rows, cols, strict=True):
                if cost[r, c] <= MAX_COST:
                    tr = self.tracks[r]
                    dt = max(t_ms - tr.t_ms, 1e-3)
                    tr.velocity = 0.5 * tr.velocity + 0.5 * (boxes[c] - tr.box) / dt
                    tr.box, tr.landmarks, tr.t_ms = boxes[c], landmarks[c], t_ms
                    ids[c] = tr.id
        for c in range(len(boxes)):
            if ids[c] < 0:
                self.tracks.append(_Track(self.next_id, boxes[c], landmarks[c], t_ms, np.zeros(4)))
                ids[c] = self.next_id
                self.next_id += 1
        return ids


def assign_tracks(session: Session, job_id: int, max_gap_s: float = 1.0, chunk: int = 20_000) -> int:
    """Link all faces of a job into tracks and store each face's track id, in the caller's transaction; returns
    the number of tracks. Faces are read and updated a chunk at a time (keyset pages in frame order), so memory
    holds one chunk and the live tracks, however long the job."""
    tracker = Tracker(max_gap_s)
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
            session.execute(update(Face), updates)
        if len(page) < chunk:  # the last page (a frame is only held back from a full page)
            return tracker.next_id
