"""Queued jobs: submitting videos (a job row and its segments), running one segment, and the job's status.

The database is the source of truth and the barrier: each segment writes its rows and marks itself done in one
transaction, and the segment that finds all others done finishes the job. Redis only carries the task messages.
Segment writes are idempotent (its time range is deleted and rewritten), so a redelivered segment after a killed
worker leaves exactly the rows an uninterrupted run would have.
"""

from __future__ import annotations

import datetime as dt
import glob
import math
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import and_, delete, func, select
from sqlalchemy.orm import Session, sessionmaker

from model.errors import FervidError
from model.weights import sha256_file
from worker.media import check_media_path
from worker.pipeline import (
    DETECTOR,
    Analyzer,
    Settings,
    StageTimes,
    iter_rows,
    job_key,
    record_video_info,
    reset_job,
    write_rows,
)
from worker.schema import Face, Frame, Job, Segment
from worker.tracks import assign_tracks
from worker.video import VideoInfo, probe

DEFAULT_SEGMENT_S = 60.0


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def expand_inputs(items: list[str]) -> list[Path]:
    """VIDEO, GLOB or @list.txt (one path per line; # comments) -> paths, in order, without duplicates."""
    out: list[Path] = []
    for item in items:
        if item.startswith("@"):
            listing = Path(item[1:])
            if not listing.is_file():
                raise FervidError(f"{listing}: list file not found")
            names = [ln.strip() for ln in listing.read_text().splitlines()]
            out += expand_inputs([n for n in names if n and not n.startswith("#")])
        elif any(c in item for c in "*?["):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise FervidError(f"{item}: no file matches")
            out += [Path(m) for m in matches]
        else:
            out.append(Path(item))
    seen, unique = set(), []
    for p in out:
        key = p.expanduser().absolute()
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def model_versions(model: str) -> dict[str, str]:
    """The model name and weights checksum that identify results, without loading the model."""
    from model.loader import _resolve
    from model.weights import sha256_file

    name, path, sha = _resolve(model)
    if not path.is_file():
        raise FervidError(f"{path}: weights file not found")
    return {"model": name, "model_sha256": sha or sha256_file(path), "detector": DETECTOR}


@dataclass
class Submitted:
    path: Path
    job_id: int
    segments: int
    duplicate: bool  # already submitted with the same settings (not queued again)
    status: str


def submit(
    sessions: sessionmaker,
    path: Path,
    settings: Settings,
    priority: int = 0,
    segment_s: float = DEFAULT_SEGMENT_S,
    force: bool = False,
    versions: dict[str, str] | None = None,
) -> Submitted:
    """Record the job and its segments (queued). The caller enqueues the segments (tasks.enqueue)."""
    settings.validate()
    real = check_media_path(path)
    if not real.is_file():
        raise FervidError(f"{path}: file not found")
    info = probe(real)  # not a video: refused now, not after a trip through the queue
    versions = versions or model_versions(settings.model)
    sha = sha256_file(real)
    key = job_key(sha, settings, versions)
    with sessions.begin() as s:
        job = s.scalar(select(Job).where(Job.job_key == key))
        if job is not None and job.status != "failed" and not force:
            n = s.scalar(select(func.count()).select_from(Segment).where(Segment.job_id == job.id))
            return Submitted(path, job.id, n, True, job.status)
        job = reset_job(s, real, sha, settings, versions, "queued")  # new, or failed / --force: start over
        record_video_info(s, job.id, info)
        job.priority, job.segment_s = priority, segment_s
        bounds = segment_bounds(settings.start_s, settings.end_s, info.duration_s, segment_s)
        for i, (a, b) in enumerate(bounds):
            s.add(Segment(job_id=job.id, idx=i, start_s=a, end_s=b, status="queued", attempts=0, frames=0, faces=0))
        return Submitted(path, job.id, len(bounds), False, "queued")


def segment_bounds(start: float, end: float | None, duration: float, segment_s: float) -> list[tuple]:
    """Consecutive [start, end) ranges; the last one is open-ended (None) when the job runs to the video's end,
    so a container whose duration is wrong still gets every frame analysed."""
    stop = end if end is not None else duration
    if not stop or segment_s <= 0 or stop - start <= segment_s:
        return [(start, end)]
    n = math.ceil((stop - start) / segment_s - 1e-9)
    edges = [start + i * segment_s for i in range(n)] + [end]
    return list(zip(edges[:-1], edges[1:], strict=True))


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def gpu_name() -> str:
    return os.environ.get("CUDA_VISIBLE_DEVICES", "") if os.environ.get("FERVID_DEVICE", "cpu") != "cpu" else "cpu"


def run_segment(sessions: sessionmaker, job_id: int, idx: int, analyzer_for) -> str:  # noqa: ANN001
    """Run one segment; returns the segment's final status ("done", "failed", or "skipped" when the job was
    removed, reset or already failed). Database errors propagate (the task retries them)."""
    with sessions.begin() as s:
        job, seg = s.get(Job, job_id), s.get(Segment, (job_id, idx))
        if job is None or seg is None or job.status == "failed":
            return "skipped"
        if seg.status == "done":
            return "done"  # a duplicate delivery of a finished segment
        seg.status, seg.attempts, seg.worker, seg.gpu = "running", seg.attempts + 1, worker_name(), gpu_name()
        seg.started_at, seg.frames, seg.faces, seg.error = _now(), 0, 0, None
        if job.status == "queued":
            job.status, job.started_at = "running", _now()
        job.worker = seg.worker
        settings = Settings(sample_fps=job.sample_fps, start_s=seg.start_s, end_s=seg.end_s, model=job.model)
        path = job.path
        # Probed at submit time: no need to open the video once more per segment.
        info = VideoInfo(path=Path(path), width=job.width, height=job.height, fps=job.fps or 0.0,
                         frame_count=job.frame_count or 0, duration_s=job.duration_s or 0.0,
                         codec=job.codec or "")  # fmt: skip
    times = StageTimes()
    t0 = time.perf_counter()
    try:
        real = check_media_path(path)
        if not real.is_file():
            raise FervidError(f"{path}: file not found (moved or deleted since it was submitted)")
        analyzer: Analyzer = analyzer_for(settings.model)
        frame_rows, face_rows, last = [], [], time.perf_counter()
        for fr, fa in iter_rows(job_id, real, info, settings, analyzer, times):
            frame_rows += fr
            face_rows += fa
            if time.perf_counter() - last > 2:  # progress for `fervid status --wait`, not per batch
                with sessions.begin() as s:
                    seg = s.get(Segment, (job_id, idx))
                    seg.frames, seg.faces = len(frame_rows), len(face_rows)
                last = time.perf_counter()
    except FervidError as e:
        _fail(sessions, job_id, idx, str(e))
        return "failed"
    times.seconds["total"] = time.perf_counter() - t0
    return _commit_segment(sessions, job_id, idx, settings, frame_rows, face_rows, times)


def _commit_segment(sessions: sessionmaker, job_id: int, idx: int, settings: Settings, frame_rows: list[dict],
                    face_rows: list[dict], times: StageTimes) -> str:  # fmt: skip
    finished = False
    with sessions.begin() as s:
        # The job row lock serialises segments finishing together, so exactly one of them sees the last one.
        job = s.scalar(select(Job).where(Job.id == job_id).with_for_update())
        seg = s.get(Segment, (job_id, idx))
        if job is None or seg is None or job.status == "failed":
            return "skipped"
        lo = settings.start_s * 1000
        in_range = [Frame.time_ms >= lo] + ([Frame.time_ms < settings.end_s * 1000] if settings.end_s else [])
        face_range = [Face.time_ms >= lo] + ([Face.time_ms < settings.end_s * 1000] if settings.end_s else [])
        s.execute(delete(Face).where(Face.job_id == job_id, *face_range))
        s.execute(delete(Frame).where(Frame.job_id == job_id, *in_range))
        write_rows(s, frame_rows, face_rows)
        seg.status, seg.frames, seg.faces, seg.finished_at = "done", len(frame_rows), len(face_rows), _now()
        seg.timings = {k: round(v, 4) for k, v in times.seconds.items()}
        job.frames_analyzed = s.scalar(select(func.count()).select_from(Frame).where(Frame.job_id == job_id))
        job.faces_found = s.scalar(select(func.count()).select_from(Face).where(Face.job_id == job_id))
        left = s.scalar(select(func.count()).select_from(Segment)
                        .where(and_(Segment.job_id == job_id, Segment.status != "done")))  # fmt: skip
        finished = left == 0
    if finished:
        _finish_job(sessions, job_id)
    return "done"


def _finish_job(sessions: sessionmaker, job_id: int) -> None:
    t = time.perf_counter()
    n_tracks = assign_tracks(sessions, job_id)
    with sessions.begin() as s:
        job = s.get(Job, job_id)
        segs = s.scalars(select(Segment).where(Segment.job_id == job_id)).all()
        timings: dict[str, float] = {}
        for seg in segs:
            for k, v in (seg.timings or {}).items():
                timings[k] = round(timings.get(k, 0.0) + v, 4)
        timings["track"] = round(time.perf_counter() - t, 4)
        if job.started_at:
            started = job.started_at if job.started_at.tzinfo else job.started_at.replace(tzinfo=dt.UTC)
            timings["wall"] = round((_now() - started).total_seconds(), 3)
        if job.frames_analyzed == 0:
            job.status, job.error = "failed", f"{job.path}: no frames in the time range"
        else:
            job.status, job.error = "done", None
        job.timings, job.finished_at = timings | {"tracks": n_tracks}, _now()


def _fail(sessions: sessionmaker, job_id: int, idx: int, error: str) -> None:
    with sessions.begin() as s:
        job = s.scalar(select(Job).where(Job.id == job_id).with_for_update())
        seg = s.get(Segment, (job_id, idx))
        if seg is not None:
            seg.status, seg.error, seg.finished_at = "failed", error, _now()
        if job is not None and job.status != "failed":
            job.status, job.error, job.finished_at = "failed", error, _now()


def mark_failed(sessions: sessionmaker, job_id: int, idx: int, error: str, attempts: int = 5) -> bool:
    """Best effort, for a segment that ran out of retries: the database may itself be what is failing."""
    for i in range(attempts):
        try:
            _fail(sessions, job_id, idx, error)
            return True
        except Exception:  # noqa: BLE001 - keep trying; the caller logs the outcome
            time.sleep(min(2**i, 10))
    return False


def unfinished_segments(session: Session, job_ids: list[int] | None = None) -> list[tuple[int, int, int]]:
    """(job, segment, priority) of every segment not yet done, of jobs that are queued or running."""
    q = (
        select(Segment.job_id, Segment.idx, Job.priority)
        .join(Job, Job.id == Segment.job_id)
        .where(Job.status.in_(("queued", "running")), Segment.status != "done")
        .order_by(Segment.job_id, Segment.idx)
    )
    if job_ids:
        q = q.where(Job.id.in_(job_ids))
    return [tuple(r) for r in session.execute(q)]


def job_status(session: Session, job_ids: list[int] | None = None, limit: int = 50) -> list[dict]:
    """Rows for `fervid status`: state, progress, frames, faces, worker, GPU, timings, error."""
    q = select(Job).order_by(Job.id.desc()).limit(limit) if not job_ids else select(Job).where(Job.id.in_(job_ids))
    jobs = session.scalars(q).all()
    if job_ids:
        missing = sorted(set(job_ids) - {j.id for j in jobs})
        if missing:
            raise FervidError(f"no job {', '.join(map(str, missing))} in this database")
    rows = []
    for job in sorted(jobs, key=lambda j: j.id):
        segs = session.scalars(select(Segment).where(Segment.job_id == job.id).order_by(Segment.idx)).all()
        done = sum(sg.status == "done" for sg in segs)
        frames = job.frames_analyzed if job.status in ("done", "failed") or not segs else \
            sum(sg.frames for sg in segs)  # fmt: skip
        running = [sg for sg in segs if sg.status == "running"]
        rows.append({
            "job": job.id, "path": job.path, "state": job.status,
            "segments_done": done, "segments": len(segs),
            "progress": 1.0 if job.status == "done" else (done / len(segs) if segs else 0.0),
            "frames": frames, "faces": job.faces_found if job.status == "done" else sum(sg.faces for sg in segs),
            "worker": (running[0].worker if running else job.worker),
            "gpu": ",".join(sorted({sg.gpu for sg in segs if sg.gpu})) or None,
            "seconds": (job.timings or {}).get("wall"),
            "error": job.error,
        })  # fmt: skip
    return rows
