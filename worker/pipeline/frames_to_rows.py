"""Video to timeline rows: sampled frames -> RetinaFace -> aligned 48x48 crops -> emotion CNN, in batches.

`Analyzer` holds the models (loaded once per process); `iter_batches` turns a time range of a video into the faces
of its sampled frames, which `SegmentRows` holds compactly. Nothing here touches the database: the job lifecycle
(worker.queue.jobs) stores what this produces, through worker.store.rows.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fervid.errors import FervidError
from fervid.model.config import CLASSES, DETECTOR
from fervid.model.device import resolve_device
from fervid.model.loader import load_model
from fervid.model.names import model_identity
from fervid.model.retinaface import Detections, load_retinaface
from fervid.worker.pipeline.crops import align_faces
from fervid.worker.pipeline.video import DecodeState, FrameBatches, VideoInfo
from fervid.worker.settings import Options, Settings

DEFAULT_SETTINGS = Settings()


@dataclass
class FrameFaces:
    """The faces found in one frame, on the CPU, ready to store."""

    boxes: np.ndarray  # [K, 4]
    scores: np.ndarray  # [K]
    landmarks: np.ndarray  # [K, 5, 2]
    probs: np.ndarray  # [K, 7]


@dataclass
class StageTimes:
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    def add(self, stage: str, t0: float, device: torch.device) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        self.seconds[stage] += now - t0
        return now

    def rounded(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in self.seconds.items()}


class Analyzer:
    """The detector and the emotion model on one device, loaded once and reused for every job."""

    def __init__(self, model: str = Settings.model, device: str = Options.device,
                 precision: str = Options.precision) -> None:  # fmt: skip
        self.device = resolve_device(device)
        self.classifier = load_model(model, device=self.device, precision=precision)
        self.detector = load_retinaface(self.device)
        # What a job records as its model: a shipped name, or the weights file's absolute path.
        self.model_id = model_identity(model)[0]
        # The stored rows name each probability by its place in CLASSES (worker.store.schema.EMOTIONS).
        if tuple(self.classifier.classes) != CLASSES:
            raise FervidError(f"model {model!r} predicts {self.classifier.classes}, not the 7 FER2013 classes")

    @property
    def versions(self) -> dict[str, str]:
        return {"model": self.model_id, "model_sha256": self.classifier.sha256, "detector": DETECTOR}

    @torch.inference_mode()
    def process(self, frames_bgr: np.ndarray, gray: np.ndarray, times: StageTimes,
                settings: Settings = DEFAULT_SETTINGS) -> list[FrameFaces]:  # fmt: skip
        """Faces, boxes, landmarks and emotion probabilities for a batch of frames (BGR, and their grey)."""
        dev = self.device
        t = time.perf_counter()
        frames = torch.from_numpy(frames_bgr).to(dev, non_blocking=True)
        dets = self.detector.detect(frames, score_threshold=settings.score_threshold, min_face=settings.min_face,
                                    scale=settings.detect_scale, bgr=True)  # fmt: skip
        dets = [_largest(d, settings.max_faces) for d in dets]
        t = times.add("detect", t, dev)

        counts = [len(d) for d in dets]
        landmarks = torch.cat([d.landmarks for d in dets]) if sum(counts) else torch.empty(0, 5, 2, device=dev)
        frame_index = torch.repeat_interleave(torch.arange(len(dets), device=dev), torch.tensor(counts, device=dev))
        if sum(counts):
            grey = torch.from_numpy(gray).to(dev, non_blocking=True).unsqueeze(1).float()
            crops = align_faces(grey, frame_index, landmarks)
        else:
            crops = None
        t = times.add("crop", t, dev)

        probs = (self.classifier.predict_proba(crops).numpy() if crops is not None
                 else np.empty((0, len(CLASSES)), np.float32))  # fmt: skip
        t = times.add("classify", t, dev)

        out, start = [], 0
        for d, k in zip(dets, counts, strict=True):
            out.append(FrameFaces(d.boxes.cpu().numpy(), d.scores.cpu().numpy(), d.landmarks.cpu().numpy(),
                                  probs[start : start + k]))  # fmt: skip
            start += k
        return out


def _largest(det: Detections, max_faces: int) -> Detections:
    """The `max_faces` largest faces of a frame, in the detector's order."""
    if len(det) <= max_faces:
        return det
    area = (det.boxes[:, 2] - det.boxes[:, 0]) * (det.boxes[:, 3] - det.boxes[:, 1])
    keep = area.topk(max_faces).indices.sort().values
    return det.select(keep)


class SegmentRows:
    """A segment's rows, held compactly (numpy arrays per batch, ~100 bytes a face) until they are written in
    bounded chunks: a dict per row would cost ~1 KB."""

    def __init__(self) -> None:
        self._frames: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._faces: list[tuple[np.ndarray, ...]] = []
        self.n_frames = self.n_faces = 0

    def add(self, indices: list[int], times_ms: list[float], faces: list[FrameFaces]) -> None:
        counts = np.array([len(f.scores) for f in faces], dtype=np.int64)
        self._frames.append((np.asarray(indices, np.int64), np.asarray(times_ms, np.float64), counts))
        self.n_frames += len(indices)
        if counts.sum():
            frame = np.repeat(np.asarray(indices, np.int64), counts)
            t_ms = np.repeat(np.asarray(times_ms, np.float64), counts)
            face = np.concatenate([np.arange(k) for k in counts])
            self._faces.append((frame, face, t_ms,
                                np.concatenate([f.boxes for f in faces]).astype(np.float32),
                                np.concatenate([f.scores for f in faces]).astype(np.float32),
                                np.concatenate([f.landmarks for f in faces]).astype(np.float32),
                                np.concatenate([f.probs for f in faces]).astype(np.float32)))  # fmt: skip
            self.n_faces += int(counts.sum())

    def extend(self, other: SegmentRows) -> None:
        """Append another batch's rows (held, not copied)."""
        self._frames += other._frames
        self._faces += other._faces
        self.n_frames += other.n_frames
        self.n_faces += other.n_faces

    def frames(self) -> Iterator[tuple[int, float, int]]:
        """(frame index, time ms, number of faces) of every analysed frame, in order."""
        for idx, t_ms, counts in self._frames:
            yield from zip(idx.tolist(), t_ms.tolist(), counts.tolist(), strict=True)

    def face_arrays(self) -> Iterator[tuple[np.ndarray, ...]]:
        """The faces a batch at a time: (frame indices, face numbers, times ms, boxes, scores, landmarks,
        probabilities), for writers that convert whole arrays at once."""
        yield from self._faces

    def faces(self) -> Iterator[tuple[int, int, float, np.ndarray, float, np.ndarray, np.ndarray]]:
        """(frame index, face, time ms, box [4], detection score, landmarks [5, 2], probabilities [7]) of every
        face, in order."""
        for frame, face, t_ms, boxes, scores, lms, probs in self._faces:
            for k in range(len(frame)):
                yield int(frame[k]), int(face[k]), float(t_ms[k]), boxes[k], float(scores[k]), lms[k], probs[k]


def iter_batches(
    path: Path,
    info: VideoInfo,
    settings: Settings,
    analyzer: Analyzer,
    times: StageTimes,
    batch_size: int = Options.batch_size,
    roots: list[Path] | None = None,
) -> Iterator[tuple[list[int], list[float], list[FrameFaces]]]:
    """(frame indices, timestamps ms, faces) per batch of the sampled frames in settings' time range; then checks
    that a range running to the end of the video really reached it (truncated files fail). `roots`: the media
    roots the opened file must lie under (worker.pipeline.media.open_media)."""
    with FrameBatches(path, settings.sample_fps, settings.start_s, settings.end_s, batch_size,
                      roots=roots) as batches:  # fmt: skip
        for batch in batches:
            yield batch.indices, batch.times_ms, analyzer.process(batch.frames, batch.gray, times, settings)
        times.seconds["decode"] += batches.decode_seconds
        _check_complete(path, info, batches.state, settings)


def _check_complete(path: Path, info: VideoInfo, state: DecodeState, settings: Settings) -> None:
    """A stream that ends well before the container says it should is truncated or corrupt: fail the job.

    Containers that estimate their frame count can be off by a few percent, so only a clear shortfall counts.
    """
    if not state.reached_eof or settings.end_s is not None or info.frame_count < 10 or not info.duration_s:
        return
    decoded = state.last_index + 1
    if decoded < 0.9 * info.frame_count and state.last_ms < 0.9 * info.duration_s * 1000:
        raise FervidError(
            f"{path}: decoding stopped at {max(state.last_ms, 0) / 1000:.1f} s of {info.duration_s:.1f} s "
            f"(frame {decoded} of {info.frame_count}): the file is truncated or corrupt"
        )
