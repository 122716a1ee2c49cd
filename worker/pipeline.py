"""The main job: video -> sampled frames -> RetinaFace -> aligned 48x48 crops -> emotion CNN -> timeline rows.

`Analyzer` holds the models (loaded once per process); `analyze_video` runs one job and records it through
SQLAlchemy. Workers of the queue call the same functions.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
import socket
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from sqlalchemy import delete, insert, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from model.device import resolve_device
from model.errors import FervidError
from model.loader import load_model
from model.retinaface import load_retinaface
from model.weights import sha256_file
from worker.crops import align_faces
from worker.schema import EMOTIONS, Face, Frame, Job, Segment
from worker.tracks import assign_tracks
from worker.video import DecodeState, FrameBatches, VideoInfo, probe

DETECTOR = "retinaface-mnet0.25"
# RetinaFace's smallest anchors are 16 px; a face of `min_face` pixels must still be ~20 px at the detector's
# input, so frames are shrunk by 20 / min_face before detection (never enlarged).
DETECT_MIN_PX = 20.0
# Faces smaller than the classifier's 48x48 input carry little expression detail; 48 px faces also let the
# detector run at 0.42x, where it is ~2x faster than at 0.5x on a CPU (BENCHMARKS.md).
DEFAULT_MIN_FACE = 48


@dataclass(frozen=True)
class Settings:
    sample_fps: float = 5.0
    start_s: float = 0.0
    end_s: float | None = None
    model: str = "small"
    score_threshold: float = 0.9
    min_face: int = DEFAULT_MIN_FACE

    def validate(self) -> None:
        if self.sample_fps < 0 or not math.isfinite(self.sample_fps):
            raise FervidError(f"--fps must be 0 (every frame) or positive, got {self.sample_fps}")
        if self.start_s < 0 or (self.end_s is not None and self.end_s <= self.start_s):
            raise FervidError(f"time range {self.start_s}..{self.end_s} s is empty or negative")
        if self.min_face < 1:
            raise FervidError(f"--min-face must be at least 1 pixel, got {self.min_face}")


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


class Analyzer:
    """The detector and the emotion model on one device, loaded once and reused for every job."""

    def __init__(self, model: str = "small", device: str = "auto", score_threshold: float = 0.9,
                 min_face: int = DEFAULT_MIN_FACE) -> None:  # fmt: skip
        self.device = resolve_device(device)
        self.classifier = load_model(model, device=self.device)
        self.detector = load_retinaface(self.device)
        self.score_threshold = score_threshold
        self.min_face = min_face
        if tuple(c.lower() for c in self.classifier.classes) != EMOTIONS:
            raise FervidError(f"model {model!r} predicts {self.classifier.classes}, not the 7 FER2013 classes")

    @property
    def versions(self) -> dict[str, str]:
        return {"model": self.classifier.name, "model_sha256": self.classifier.sha256, "detector": DETECTOR}

    @torch.inference_mode()
    def process(self, frames_bgr: np.ndarray, gray: np.ndarray, times: StageTimes) -> list[FrameFaces]:
        """Faces, boxes, landmarks and emotion probabilities for a batch of frames (BGR, and their grey)."""
        dev = self.device
        t = time.perf_counter()
        frames = torch.from_numpy(frames_bgr).to(dev, non_blocking=True)
        h, w = frames.shape[1:3]
        scale = min(1.0, DETECT_MIN_PX / self.min_face)
        dets = self.detector.detect(frames, score_threshold=self.score_threshold, min_face=self.min_face,
                                    scale=scale, bgr=True)  # fmt: skip
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

        probs = self.classifier.predict_proba(crops).numpy() if crops is not None else np.empty((0, 7), np.float32)
        t = times.add("classify", t, dev)

        out, start = [], 0
        for d, k in zip(dets, counts, strict=True):
            out.append(FrameFaces(d.boxes.cpu().numpy(), d.scores.cpu().numpy(), d.landmarks.cpu().numpy(),
                                  probs[start : start + k]))  # fmt: skip
            start += k
        return out


def job_key(sha256: str, settings: Settings, versions: dict[str, str]) -> str:
    """Same content, same settings, same models: the same job (a rerun replaces its rows)."""
    blob = json.dumps({"sha256": sha256, **asdict(settings), **versions}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def reset_job(session: Session, path: Path, sha: str, settings: Settings, versions: dict[str, str],
              status: str) -> Job:  # fmt: skip
    """The job row of (content, settings, models): created, or emptied of an earlier run's frames, faces and
    segments, so that a rerun replaces rows and never duplicates them."""
    job = session.scalar(select(Job).where(Job.job_key == job_key(sha, settings, versions)))
    if job is None:
        job = Job(job_key=job_key(sha, settings, versions), sha256=sha, sample_fps=settings.sample_fps,
                  start_s=settings.start_s, end_s=settings.end_s, **versions)  # fmt: skip
        session.add(job)
    else:
        for table in (Face, Frame, Segment):
            session.execute(delete(table).where(table.job_id == job.id))
    job.path, job.size_bytes, job.status, job.error = str(path), path.stat().st_size, status, None
    job.frames_analyzed = job.faces_found = 0
    job.started_at = job.finished_at = job.timings = job.worker = None
    session.flush()
    return job


def prepare_job(session: Session, path: Path, settings: Settings, versions: dict[str, str]) -> Job:
    """The job row for an in-process run, reset and marked running."""
    if not path.exists():
        raise FervidError(f"{path}: file not found")
    if not path.is_file():
        raise FervidError(f"{path}: not a file")
    job = reset_job(session, path, sha256_file(path), settings, versions, "running")
    job.started_at, job.worker = _now(), f"{socket.gethostname()}:{os.getpid()}"
    return job


def _rows(job_id: int, indices: list[int], times_ms: list[float], faces: list[FrameFaces]) -> tuple[list, list]:
    frame_rows, face_rows = [], []
    for fi, t_ms, ff in zip(indices, times_ms, faces, strict=True):
        frame_rows.append({"job_id": job_id, "frame_index": fi, "time_ms": t_ms, "n_faces": len(ff.scores)})
        for k in range(len(ff.scores)):
            p = ff.probs[k]
            row = {"job_id": job_id, "frame_index": fi, "face": k, "time_ms": t_ms,
                   "x1": float(ff.boxes[k, 0]), "y1": float(ff.boxes[k, 1]),
                   "x2": float(ff.boxes[k, 2]), "y2": float(ff.boxes[k, 3]),
                   "det_score": float(ff.scores[k]),
                   "landmarks": [[round(float(x), 2), round(float(y), 2)] for x, y in ff.landmarks[k]],
                   "emotion": EMOTIONS[int(p.argmax())]}  # fmt: skip
            row.update({name: float(p[c]) for c, name in enumerate(EMOTIONS)})
            face_rows.append(row)
    return frame_rows, face_rows


def iter_rows(
    job_id: int,
    path: Path,
    info: VideoInfo,
    settings: Settings,
    analyzer: Analyzer,
    times: StageTimes,
    batch_size: int = 16,
) -> Iterator[tuple[list[dict], list[dict]]]:
    """(frame rows, face rows) per batch of the sampled frames in settings' time range; then checks that a
    range running to the end of the video really reached it (truncated files fail)."""
    with FrameBatches(path, settings.sample_fps, settings.start_s, settings.end_s, batch_size) as batches:
        for batch in batches:
            faces = analyzer.process(batch.frames, batch.gray, times)
            yield _rows(job_id, batch.indices, batch.times_ms, faces)
        times.seconds["decode"] += batches.decode_seconds
        _check_complete(path, info, batches.state, settings)


def record_video_info(session: Session, job_id: int, info: VideoInfo) -> None:
    j = session.get(Job, job_id)
    j.width, j.height, j.fps, j.codec = info.width, info.height, info.fps, info.codec
    j.frame_count, j.duration_s = info.frame_count, info.duration_s or None


def analyze_video(
    path: str | Path,
    settings: Settings,
    sessions: sessionmaker,
    analyzer: Analyzer,
    batch_size: int = 16,
    on_progress: Callable[[int, int | None], None] | None = None,
) -> Job:
    """Analyse one video into the database, in this process. Returns the job: "done", or "failed" with `error`.

    Input problems (not a video, undecodable frames) end the job as failed; a missing file raises FervidError
    before any job exists; database errors propagate after the job is marked failed where the database answers.
    """
    settings.validate()
    path = Path(path).expanduser().absolute()
    t_start = time.perf_counter()
    with sessions.begin() as s:
        job = prepare_job(s, path, settings, analyzer.versions)
    job_id = job.id
    times = StageTimes()
    try:
        info = probe(path)
        with sessions.begin() as s:
            record_video_info(s, job_id, info)
        end_s = settings.end_s if settings.end_s is not None else (info.duration_s or None)
        span = max(0.0, (end_s or 0) - settings.start_s)
        expected = (round(span * settings.sample_fps) if settings.sample_fps else info.frame_count) or None
        n_frames = n_faces = 0
        for frame_rows, face_rows in iter_rows(job_id, path, info, settings, analyzer, times, batch_size):
            t = time.perf_counter()
            n_frames += len(frame_rows)
            n_faces += len(face_rows)
            with sessions.begin() as s:
                write_rows(s, frame_rows, face_rows)
                j = s.get(Job, job_id)
                j.frames_analyzed, j.faces_found = n_frames, n_faces
            times.add("write", t, torch.device("cpu"))
            if on_progress:
                on_progress(len(frame_rows), expected)
        if n_frames == 0:
            raise FervidError(f"{path}: no frames in the time range {settings.start_s}..{settings.end_s} s")
        t = time.perf_counter()
        assign_tracks(sessions, job_id)
        times.add("track", t, torch.device("cpu"))
        return _finish(sessions, job_id, "done", None, times, t_start)
    except FervidError as e:
        return _finish(sessions, job_id, "failed", str(e), times, t_start)
    except SQLAlchemyError:
        raise
    except Exception as e:  # an unexpected failure still ends the job visibly, then propagates
        _finish(sessions, job_id, "failed", f"{type(e).__name__}: {e}", times, t_start)
        raise


def write_rows(session: Session, frame_rows: list[dict], face_rows: list[dict]) -> None:
    """Bulk inserts (executemany; one statement per table)."""
    if frame_rows:
        session.execute(insert(Frame), frame_rows)
    if face_rows:
        session.execute(insert(Face), face_rows)


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


def _finish(sessions: sessionmaker, job_id: int, status: str, error: str | None, times: StageTimes,
            t_start: float) -> Job:  # fmt: skip
    with sessions.begin() as s:
        job = s.get(Job, job_id)
        job.status, job.error, job.finished_at = status, error, _now()
        job.timings = {k: round(v, 4) for k, v in times.seconds.items()} | {
            "total": round(time.perf_counter() - t_start, 4)
        }
    return job
