"""Linking faces of consecutive analysed frames into tracks: one track per person while the face stays in view.

Each track predicts where its face will be (constant velocity of the box centre and size), and the faces of a
new frame are matched to the predictions by the Hungarian algorithm on a cost of box overlap (IoU) and landmark
distance. A track survives missed detections for `max_gap_s` of video time, so a blink of the detector or a
face briefly hidden keeps its id; two people crossing keep theirs because their predicted paths diverge.
Tracks are assigned over a whole job in frame order, so the segments of a long video join up
(worker.store.rows.assign_tracks runs a Tracker over a job's stored faces).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

MAX_COST = 1.5
MAX_GAP_S = 1.0  # video seconds a track waits for its face to be found again


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
    def __init__(self, max_gap_s: float = MAX_GAP_S) -> None:
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
