"""The job lifecycle, in one place: creating a job and its segments, starting (leasing) a segment, keeping its
lease, writing it, handing it back, finishing or failing the job. `fervid analyze` (in this process) and the
queue's workers both run jobs through `run_segment`.

The database is the source of truth and the barrier; Redis only carries messages, which may be lost, repeated
or late, so every step here checks the row it acts on:
- each run of a job (a new submit after --force or a failure) has a number; a message names the run it was
  queued for, and one of an older run is dropped;
- a running segment holds a lease (owner, expiry, and its attempt number as a token) that a thread of the working
  process renews; a write whose token is no longer the segment's own is discarded;
- job status changes only under the job's row lock, and only forward (queued -> running -> done | failed |
  cancelled: worker.store.schema.Status); a cancel ends the job's unfinished segments with it;
- the segment that writes the last rows finishes the job in the same transaction, and anyone who later finds a
  job with every segment done but not finished (a redelivery, the sweeper) finishes it.
Transient database errors are retried with backoff (worker.store.db.with_db_retry); computed rows wait in memory.
"""

from __future__ import annotations

import datetime as dt
import glob
import hashlib
import json
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import bindparam, case, delete, func, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from fervid.checksum import sha256_file
from fervid.errors import FervidError, NotFound
from fervid.model.config import DETECTOR
from fervid.model.names import model_identity
from fervid.worker.pipeline.media import check_media_path, media_roots
from fervid.worker.pipeline.video import VideoInfo, probe
from fervid.worker.settings import Options, QueuePolicy, Settings, validate_segment_s
from fervid.worker.store.db import DatabaseUnavailable, is_transient, with_db_retry
from fervid.worker.store.rows import assign_tracks, replace_range
from fervid.worker.store.schema import ACTIVE, ENDED, Face, Frame, Job, Segment, Status
from fervid.worker.store.stream import RowStream, StreamFailed, can_stream

if TYPE_CHECKING:  # the pipeline loads torch: only a worker running a segment needs it, not `submit` or `status`
    from fervid.worker.pipeline.frames_to_rows import Analyzer, SegmentRows, StageTimes

log = logging.getLogger("fervid.jobs")


class Outcome(StrEnum):
    """What became of a message: what run_segment (and claim_segment, when it cannot start) returns."""

    DONE = Status.DONE  # the segment is done (by this attempt, or found so)
    FAILED = Status.FAILED  # the job failed (this segment's error, or the poison limit)
    STALE = "stale"  # a message of an older run, or of a job or segment that no longer exists
    SKIPPED = "skipped"  # the job already ended
    DUPLICATE = "duplicate"  # another live process holds the segment's lease
    SUPERSEDED = "superseded"  # this process lost the lease (it was judged dead); its rows were discarded
    RELEASED = "released"  # handed back on shutdown, to be run again


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def as_utc(t: dt.datetime | None) -> dt.datetime | None:
    """SQLite gives naive datetimes back; they were written in UTC."""
    return t.replace(tzinfo=dt.UTC) if t is not None and t.tzinfo is None else t


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def gpu_name() -> str:
    return os.environ.get("CUDA_VISIBLE_DEVICES", "") if os.environ.get("FERVID_DEVICE", "cpu") != "cpu" else "cpu"


def _owner_dead(owner: str | None) -> bool:
    """True when the lease's owner is a process of this machine that no longer exists (a killed pool child):
    its segment can be taken over at once instead of after the lease runs out."""
    if not owner:
        return True
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False  # another machine's process: only its lease can tell
    if int(pid) == os.getpid():
        return True  # an earlier attempt of this very process ended without writing or handing back
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def mmss(seconds: float | None) -> str:
    if seconds is None:
        return "end"
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


# ------------------------------------------------------------------------------------------------ creating a job


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
    """What identifies a job's models, without loading them: the model (a shipped name, or the weights file's
    absolute path, which the workers then load), its weights' checksum, and the detector."""
    model_id, sha = model_identity(model)
    return {"model": model_id, "model_sha256": sha, "detector": DETECTOR}


def job_key(sha256: str, settings: Settings, versions: dict[str, str]) -> str:
    """Same content, same settings, same models: the same job (a rerun replaces its rows)."""
    blob = json.dumps({"sha256": sha256, **asdict(settings), **versions}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def segment_bounds(start: float, end: float | None, duration: float, segment_s: float,
                   max_segments: int | None = None) -> list[tuple]:  # fmt: skip
    """Consecutive [start, end) ranges; the last one is open-ended (None) when the job runs to the video's end,
    so a container whose duration is wrong still gets every frame analysed."""
    stop = end if end is not None else duration
    if not stop or not math.isfinite(stop) or stop - start <= segment_s:
        return [(start, end)]
    n = math.ceil((stop - start) / segment_s - 1e-9)
    if max_segments is not None and n > max_segments:
        raise FervidError(
            f"{(stop - start):.0f} s of video in {segment_s:g} s segments would be {n:,} segments, more than the "
            f"{max_segments:,} allowed per job: use a longer --segment (or FERVID_MAX_SEGMENTS)"
        )
    edges = [start + i * segment_s for i in range(n)] + [end]
    return list(zip(edges[:-1], edges[1:], strict=True))


def _reset(s: Session, path: Path, sha: str, settings: Settings, versions: dict[str, str]) -> Job:
    """The job row of (content, settings, models), locked: created, or emptied of an earlier run's rows and
    segments and given the next run number, so that a rerun replaces rows and never duplicates them."""
    key = job_key(sha, settings, versions)
    job = s.scalar(select(Job).where(Job.job_key == key).with_for_update(key_share=True))
    if job is None:
        job = Job(job_key=key, sha256=sha, sample_fps=settings.sample_fps, start_s=settings.start_s,
                  end_s=settings.end_s, score_threshold=settings.score_threshold, min_face=settings.min_face,
                  max_faces=settings.max_faces, run=1, **versions)  # fmt: skip
        s.add(job)
    else:
        for table in (Face, Frame, Segment):
            s.execute(delete(table).where(table.job_id == job.id))
        job.run += 1
    job.path, job.size_bytes, job.status, job.error = str(path), path.stat().st_size, Status.QUEUED, None
    job.frames_analyzed = job.faces_found = 0
    job.started_at = job.finished_at = job.timings = job.worker = None
    s.flush()
    return job


def _add_segments(s: Session, job: Job, info: VideoInfo, segment_s: float, policy: QueuePolicy) -> list[int]:
    j = job
    j.width, j.height, j.fps, j.codec = info.width, info.height, info.fps, info.codec
    j.frame_count, j.duration_s = info.frame_count, info.duration_s or None
    j.segment_s = segment_s
    bounds = segment_bounds(j.start_s, j.end_s, info.duration_s, segment_s, policy.max_segments)
    s.add_all(Segment(job_id=j.id, idx=i, run=j.run, start_s=a, end_s=b, status=Status.QUEUED, attempts=0, deaths=0,
                      frames=0, faces=0) for i, (a, b) in enumerate(bounds))  # fmt: skip
    return list(range(len(bounds)))


@dataclass
class Submitted:
    path: Path
    job_id: int
    run: int
    segments: list[int]
    priority: int
    duplicate: bool  # already submitted with the same settings (not queued again)
    status: str


def submit(
    sessions: sessionmaker,
    path: Path,
    settings: Settings,
    priority: int = Options.priority,
    segment_s: float | None = None,
    force: bool = False,
    versions: dict[str, str] | None = None,
    policy: QueuePolicy | None = None,
    tag: str | None = None,
    callback_url: str | None = None,
) -> Submitted:
    """Record the job and its segments (queued), in one transaction. The caller then sends the messages
    (`send`); a job whose messages never went out is sent by the sweeper. A duplicate keeps its own tag and
    callback; a job started over takes the new ones."""
    policy = policy or QueuePolicy.from_env()
    segment_s = policy.segment_s if segment_s is None else segment_s
    settings.validate()
    validate_segment_s(segment_s)
    roots = media_roots()
    real = check_media_path(path, roots)
    info = probe(real, roots)  # not a video: refused now, not after a trip through the queue
    versions = versions or model_versions(settings.model)
    settings = replace(settings, model=versions["model"])
    sha = sha256_file(real)
    key = job_key(sha, settings, versions)

    def txn() -> Submitted:
        with sessions.begin() as s:
            job = s.scalar(select(Job).where(Job.job_key == key).with_for_update(key_share=True))
            if job is not None and job.status not in (Status.FAILED, Status.CANCELLED) and not force:
                n = s.scalar(select(func.count()).select_from(Segment).where(Segment.job_id == job.id))
                return Submitted(path, job.id, job.run, list(range(n)), job.priority, True, job.status)
            job = _reset(s, real, sha, settings, versions)  # new, or failed / --force: start over
            job.priority, job.tag, job.callback_url = priority, tag, callback_url
            job.webhook_status = job.webhook_next_at = job.webhook_deliveries = None
            idxs = _add_segments(s, job, info, segment_s, policy)
            return Submitted(path, job.id, job.run, idxs, priority, False, Status.QUEUED)

    try:
        return with_db_retry(txn, policy, f"submitting {path}")
    except IntegrityError:  # the same job submitted at the same moment by someone else: theirs stands
        with sessions() as s:
            job = s.scalar(select(Job).where(Job.job_key == key))
            if job is None:
                raise
            n = s.scalar(select(func.count()).select_from(Segment).where(Segment.job_id == job.id))
            return Submitted(path, job.id, job.run, list(range(n)), job.priority, True, job.status)


def mark_enqueued(sessions: sessionmaker, job_id: int, run: int, idxs: list[int], policy: QueuePolicy) -> None:
    def txn() -> None:
        with sessions.begin() as s:
            s.execute(update(Segment).where(Segment.job_id == job_id, Segment.run == run, Segment.idx.in_(idxs),
                                            Segment.status == Status.QUEUED).values(enqueued_at=utcnow()))  # fmt: skip

    with_db_retry(txn, policy, f"recording the messages of job {job_id}")


# ----------------------------------------------------------------------------------------------- running a segment


@dataclass
class Claim:
    """A segment this process has started, and what it needs to run it."""

    job_id: int
    idx: int
    run: int
    token: int  # the segment's attempt number when it was started: the lease is ours while it stays so
    priority: int
    path: str
    model: str
    model_sha256: str
    settings: Settings  # the job's settings, with the segment's time range
    info: VideoInfo


def lock_job(s: Session, job_id: int, skip_locked: bool = False) -> Job | None:
    """The job's row, locked against other changes to the job. FOR NO KEY UPDATE (key_share), not FOR UPDATE:
    the rows a segment streams in (worker.store.stream) hold a KEY SHARE lock on their job through the foreign
    key for as long as the segment runs, and only deleting the job needs to wait for them."""
    return s.scalar(select(Job).where(Job.id == job_id).with_for_update(key_share=True, skip_locked=skip_locked))


def lock_existing_job(s: Session, job_id: int) -> Job:
    """The job, locked, for a user's request on it; NotFound (a 404 over HTTP) when there is none."""
    job = lock_job(s, job_id)
    if job is None:
        raise NotFound(f"no job {job_id} in this database")
    return job


def lock_segment(s: Session, job_id: int, idx: int) -> Segment | None:
    return s.scalar(select(Segment).where(Segment.job_id == job_id, Segment.idx == idx).with_for_update())


def poison_reason(seg: Segment) -> str:
    return (f"the worker died {seg.deaths} times on segment {seg.idx} ({mmss(seg.start_s)}–{mmss(seg.end_s)}); "
            "the video may need more memory than a worker has, or crash the decoder")  # fmt: skip


def _fail_job(job: Job, error: str) -> None:
    """Failed is final for a run: a job that already ended keeps its status."""
    if job.status in ACTIVE:
        job.status, job.error, job.finished_at = Status.FAILED, error, utcnow()


def record_death(s: Session, job: Job, seg: Segment, policy: QueuePolicy) -> bool:
    """Count the death of the process that held `seg`; fail the job at the poison limit. True when it failed."""
    seg.deaths += 1
    seg.lease_owner = seg.lease_until = None
    if seg.deaths >= policy.max_deaths:
        seg.status, seg.error, seg.finished_at = Status.FAILED, poison_reason(seg), utcnow()
        _fail_job(job, seg.error)
        return True
    seg.status = Status.QUEUED
    return False


def claim_segment(sessions: sessionmaker, job_id: int, idx: int, run: int | None,
                  policy: QueuePolicy) -> Claim | Outcome:  # fmt: skip
    """Start segment `idx` of `job_id` in this process, or say why not (an Outcome)."""
    me = worker_id()

    def txn() -> Claim | Outcome:
        with sessions.begin() as s:
            job = lock_job(s, job_id)
            if job is None or (run is not None and job.run != run):
                return Outcome.STALE
            seg = lock_segment(s, job_id, idx)
            if seg is None or seg.run != job.run:
                return Outcome.STALE
            if job.status not in ACTIVE:
                return Outcome.SKIPPED
            if seg.status == Status.DONE:
                finish_job(s, job)  # a finish that was interrupted is completed by whoever comes next
                return Outcome.DONE
            if seg.status == Status.FAILED:
                return Outcome.SKIPPED
            now = utcnow()
            if seg.status == Status.RUNNING:
                lease = as_utc(seg.lease_until)
                if lease is not None and lease > now and seg.lease_owner != me and not _owner_dead(seg.lease_owner):
                    return Outcome.DUPLICATE
                if record_death(s, job, seg, policy):
                    log.error("job %s: %s", job_id, seg.error)
                    return Outcome.FAILED
            seg.status, seg.attempts, seg.lease_owner = Status.RUNNING, seg.attempts + 1, me
            seg.lease_until = now + dt.timedelta(seconds=policy.lease_s)
            seg.worker, seg.gpu, seg.started_at, seg.frames, seg.faces, seg.error = me, gpu_name(), now, 0, 0, None
            if job.status == Status.QUEUED:
                job.status, job.started_at = Status.RUNNING, now
            job.worker = me
            settings = Settings(sample_fps=job.sample_fps, start_s=seg.start_s, end_s=seg.end_s, model=job.model,
                                score_threshold=job.score_threshold, min_face=job.min_face,
                                max_faces=job.max_faces)  # fmt: skip
            # Probed at submit time: no need to open the video once more per segment.
            info = VideoInfo(path=Path(job.path), width=job.width, height=job.height, fps=job.fps or 0.0,
                             frame_count=job.frame_count or 0, duration_s=job.duration_s or 0.0,
                             codec=job.codec or "")  # fmt: skip
            return Claim(job_id, idx, job.run, seg.attempts, job.priority, job.path, job.model, job.model_sha256,
                         settings, info)  # fmt: skip

    return with_db_retry(txn, policy, f"starting segment {idx} of job {job_id}")


class Lease(threading.Thread):
    """Renews a claimed segment's lease every heartbeat_s, with its progress (frames and faces so far) for
    `fervid status`. Sets `lost` when the segment is no longer ours (another process took it over)."""

    def __init__(self, sessions: sessionmaker, claim: Claim, policy: QueuePolicy) -> None:
        super().__init__(name="fervid-lease", daemon=True)
        self.sessions, self.claim, self.policy = sessions, claim, policy
        self.lost, self._stop_event = threading.Event(), threading.Event()
        self.progress = (0, 0)

    def renew(self) -> bool:
        c = self.claim
        frames, faces = self.progress
        with self.sessions.begin() as s:
            n = s.execute(
                update(Segment)
                .where(Segment.job_id == c.job_id, Segment.idx == c.idx, Segment.run == c.run,
                       Segment.attempts == c.token, Segment.status == Status.RUNNING)
                .values(lease_until=utcnow() + dt.timedelta(seconds=self.policy.lease_s), frames=frames, faces=faces)
            ).rowcount  # fmt: skip
        return n == 1

    def run(self) -> None:
        while not self._stop_event.wait(self.policy.heartbeat_s):
            try:
                if not self.renew():
                    self.lost.set()
                    return
            except Exception as e:  # noqa: BLE001 - the database is away: try again next beat
                log.warning("job %s segment %s: lease not renewed: %s", self.claim.job_id, self.claim.idx,
                            str(e).splitlines()[0] if str(e) else type(e).__name__)  # fmt: skip

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=60)


def _ours(s: Session, claim: Claim) -> tuple[Job | None, Segment | None, Outcome | None]:
    """The job and segment locked, or why this attempt may not write to them."""
    job = lock_job(s, claim.job_id)
    seg = lock_segment(s, claim.job_id, claim.idx)
    if job is None or seg is None or job.run != claim.run or seg.run != claim.run:
        return None, None, Outcome.STALE
    if seg.attempts != claim.token:
        return None, None, Outcome.SUPERSEDED
    if seg.status == Status.DONE:
        return None, None, Outcome.DONE  # our own write, retried after the database's answer was lost
    if seg.status != Status.RUNNING or job.status not in ACTIVE:
        return None, None, Outcome.SKIPPED
    return job, seg, None


def _write_and_finish(s: Session, claim: Claim, rows: SegmentRows, stream: RowStream | None, times: StageTimes,
                      t0: float) -> tuple[Outcome, bool]:  # fmt: skip
    """In the caller's transaction: if the segment is still this attempt's, write its rows (unless `stream` did,
    into this transaction), mark it done and finish the job if it was the last. Returns the outcome and whether
    to commit."""
    job, seg, why = _ours(s, claim)
    if why:
        return why, False
    if stream is None:
        replace_range(s, claim.job_id, claim.settings.start_s, claim.settings.end_s, rows)
    seg.status, seg.frames, seg.faces, seg.finished_at = Status.DONE, rows.n_frames, rows.n_faces, utcnow()
    seg.lease_owner = seg.lease_until = None
    write = time.perf_counter() - t0
    # compute: the segment's frames through the models (its stages overlap: decoding runs beside them);
    # write: what writing held the frame loop up (the streamed rows' last batch, or all of them), and the commit;
    # total: compute and write, the time the segment held its worker.
    # stream, stream_cpu: the streaming thread's time beside the compute (wall, and its own CPU).
    seg.timings = times.rounded() | {"write": round(write, 4),
                                     "total": round(times.seconds.get("compute", 0.0) + write, 4)}  # fmt: skip
    if stream is not None:
        seg.timings["stream"] = round(stream.busy_s, 4)
        seg.timings["stream_cpu"] = round(stream.cpu_s, 4)
    finish_job(s, job)
    return Outcome.DONE, True


def commit_segment(sessions: sessionmaker, claim: Claim, rows: SegmentRows, times: StageTimes,
                   policy: QueuePolicy, stream: RowStream | None = None) -> Outcome:  # fmt: skip
    """Replace the segment's time range with its rows, mark it done and, if it was the last, finish the job:
    one transaction, so a reader never sees half a segment and a job never waits for a finish. `stream`: the
    rows were streamed into an open transaction (PostgreSQL), which is ended here; if it failed, the rows are
    written again from memory the ordinary way, with retries."""
    t0 = time.perf_counter()
    if stream is not None:
        try:
            return stream.finish(lambda s: _write_and_finish(s, claim, rows, stream, times, t0))
        except StreamFailed:
            pass  # nothing of it was committed (the stream logged why): the rows are written below

    def txn() -> Outcome:
        with sessions() as s:
            outcome, keep = _write_and_finish(s, claim, rows, None, times, t0)
            if keep:
                s.commit()
            return outcome

    return with_db_retry(txn, policy, f"writing segment {claim.idx} of job {claim.job_id}")


def finish_job(s: Session, job: Job) -> bool:
    """Finish `job` (locked by the caller) if every segment of its run is done: tracks, totals, status.
    Idempotent: a job that already ended, or has segments to go, is left as it is."""
    if job.status not in ACTIVE:
        return False
    segs = s.scalars(select(Segment).where(Segment.job_id == job.id)).all()
    if not segs or any(sg.status != Status.DONE for sg in segs):
        return False
    t = time.perf_counter()
    n_tracks = assign_tracks(s, job.id)
    timings: dict[str, float] = {}
    for sg in segs:
        for k, v in (sg.timings or {}).items():
            timings[k] = round(timings.get(k, 0.0) + v, 4)
    timings["track"] = round(time.perf_counter() - t, 4)
    if job.started_at:
        timings["wall"] = round((utcnow() - as_utc(job.started_at)).total_seconds(), 3)
    job.frames_analyzed, job.faces_found = sum(sg.frames for sg in segs), sum(sg.faces for sg in segs)
    if job.frames_analyzed == 0:
        job.status, job.error = Status.FAILED, f"{job.path}: no frames in the time range"
    else:
        job.status, job.error = Status.DONE, None
    job.timings, job.finished_at = timings | {"tracks": n_tracks}, utcnow()
    return True


def cancel_job(sessions: sessionmaker, job_id: int, policy: QueuePolicy | None = None) -> str:
    """Cancel a job that has not ended: it and its unfinished segments become cancelled in one transaction, so no
    worker starts them (claim_segment skips an ended job) and a running segment's write is discarded (`_ours`),
    its lease no longer renewed. Returns the job's status afterwards (a job that had ended keeps its own); raises
    NotFound for an unknown job."""
    policy = policy or QueuePolicy.from_env()

    def txn() -> str:
        with sessions.begin() as s:
            job = lock_existing_job(s, job_id)
            if job.status not in ACTIVE:
                return job.status
            now = utcnow()
            unfinished = update(Segment).where(Segment.job_id == job_id, Segment.status.in_(ACTIVE))
            s.execute(unfinished.values(status=Status.CANCELLED, lease_owner=None, lease_until=None, finished_at=now))
            job.status, job.error, job.finished_at = Status.CANCELLED, "cancelled", now
            return job.status

    return with_db_retry(txn, policy, f"cancelling job {job_id}")


def delete_job(sessions: sessionmaker, job_id: int, policy: QueuePolicy | None = None) -> str:
    """Delete a job and all its rows (a running one is cancelled by the same transaction: its worker's write
    finds no job and is dropped). Returns the deleted job's path; raises NotFound for an unknown job."""
    policy = policy or QueuePolicy.from_env()

    def txn() -> str:
        with sessions.begin() as s:
            job = lock_existing_job(s, job_id)
            for table in (Face, Frame, Segment):
                s.execute(delete(table).where(table.job_id == job_id))
            path = job.path
            s.delete(job)
            return path

    return with_db_retry(txn, policy, f"deleting job {job_id}")


def fail_segment(sessions: sessionmaker, claim: Claim, error: str, policy: QueuePolicy) -> Outcome:
    """A segment that cannot succeed (a bad video, a permanent database error) fails its job."""

    def txn() -> Outcome:
        with sessions.begin() as s:
            job, seg, why = _ours(s, claim)
            if why:
                return why
            seg.status, seg.error, seg.finished_at = Status.FAILED, error, utcnow()
            seg.lease_owner = seg.lease_until = None
            _fail_job(job, error)
            return Outcome.FAILED

    return with_db_retry(txn, policy, f"recording the failure of job {claim.job_id}")


def release_segment(sessions: sessionmaker, claim: Claim, policy: QueuePolicy) -> bool:
    """Hand a started segment back (a worker stopping): queued again, with no death counted. Its message is
    sent by the caller, or by the sweeper if the caller cannot."""

    def txn() -> bool:
        with sessions.begin() as s:
            _, seg, why = _ours(s, claim)
            if why:
                return False
            # The attempt number stays: this attempt can no longer write (the segment is not running), and the
            # next start makes a new token.
            seg.status, seg.lease_owner, seg.lease_until, seg.enqueued_at = Status.QUEUED, None, None, None
            return True

    return with_db_retry(txn, policy, f"handing back segment {claim.idx} of job {claim.job_id}")


AnalyzerFor = Callable[[str, str], "Analyzer"]


def run_segment(
    sessions: sessionmaker,
    job_id: int,
    idx: int,
    run: int | None,
    analyzer_for: AnalyzerFor,
    policy: QueuePolicy,
    roots: list[Path] | None = None,
    should_stop: Callable[[], bool] | None = None,
    requeue: Callable[[Claim], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
    batch_size: int = Options.batch_size,
) -> Outcome:
    """Run one segment: claim it, compute its rows under a renewed lease, write them (or fail the job with the
    reason). `roots`: the media roots the video must lie under (queue workers); None for in-process jobs.
    `should_stop`: checked between batches; when it turns true the segment is handed back and `requeue`d.
    Returns the Outcome. Raises DatabaseUnavailable when the database
    stayed away for the whole retry policy."""
    from fervid.worker.pipeline.frames_to_rows import SegmentRows, StageTimes, iter_batches

    claim = claim_segment(sessions, job_id, idx, run, policy)
    if isinstance(claim, str):
        return claim
    lease = Lease(sessions, claim, policy)
    lease.start()
    times, rows, t0 = StageTimes(), SegmentRows(), time.perf_counter()
    stream = None
    if can_stream(sessions):
        stream = RowStream(sessions, job_id, claim.settings.start_s, claim.settings.end_s, policy.write_queue)
        stream.start()
    try:
        try:
            path = Path(claim.path)
            if roots is not None:
                path = check_media_path(path, roots)
            if not path.is_file():
                raise FervidError(f"{claim.path}: file not found (moved or deleted since it was submitted)")
            analyzer = analyzer_for(claim.model, claim.model_sha256)
            for indices, times_ms, faces in iter_batches(path, claim.info, claim.settings, analyzer, times,
                                                         batch_size, roots):  # fmt: skip
                batch = SegmentRows()
                batch.add(indices, times_ms, faces)
                rows.extend(batch)
                if stream is not None:
                    stream.put(batch)
                lease.progress = (rows.n_frames, rows.n_faces)
                if on_progress:
                    on_progress(len(indices))
                if lease.lost.is_set():
                    log.warning("job %s segment %s: lease lost (judged dead); dropping this attempt", job_id, idx)
                    return Outcome.SUPERSEDED
                if should_stop is not None and should_stop():
                    lease.stop()
                    if release_segment(sessions, claim, policy):
                        if requeue is not None:
                            requeue(claim)
                        return Outcome.RELEASED
                    return Outcome.SUPERSEDED
        except DatabaseUnavailable:
            raise
        except FervidError as e:
            if stream is not None:
                stream.abort()
            return fail_segment(sessions, claim, str(e), policy)
        except Exception as e:  # a bug, or Celery's time limit: the job fails with the reason instead of looping
            if stream is not None:
                stream.abort()
            log.exception("job %s segment %s failed", job_id, idx)
            reason = "ran longer than the segment time limit (FERVID_SEGMENT_TIME_LIMIT_S)" \
                if type(e).__name__ == "SoftTimeLimitExceeded" else f"{type(e).__name__}: {e}"  # fmt: skip
            where = f"segment {idx} ({mmss(claim.settings.start_s)}–{mmss(claim.settings.end_s)})"
            return fail_segment(sessions, claim, f"{where}: {reason}".splitlines()[0], policy)
        times.seconds["compute"] = time.perf_counter() - t0
        try:
            return commit_segment(sessions, claim, rows, times, policy, stream)
        except SQLAlchemyError as e:
            if is_transient(e):
                raise
            # IntegrityError, DataError, ProgrammingError: no retry can help; the job fails with the real reason.
            reason = str(getattr(e, "orig", None) or e).strip().splitlines()[0]
            return fail_segment(sessions, claim, f"database error: {type(e).__name__}: {reason}", policy)
    finally:
        if stream is not None:
            stream.abort()  # a segment that ended any other way than its commit leaves nothing behind
        lease.stop()


# ------------------------------------------------------------------------------------------- in-process (analyze)


def analyze_video(
    path: str | Path,
    settings: Settings,
    sessions: sessionmaker,
    analyzer: Analyzer,
    batch_size: int = Options.batch_size,
    on_progress: Callable[[int, int | None], None] | None = None,
    policy: QueuePolicy | None = None,
) -> Job:
    """Analyse one video into the database, in this process, through the same segments as the queue. Returns
    the job: done, or failed with `error` (not a video, undecodable frames). A missing file raises
    FervidError before any job exists."""
    policy = policy or QueuePolicy.from_env()
    settings = replace(settings, model=analyzer.model_id)
    settings.validate()
    path = Path(path).expanduser().absolute()
    if not path.exists():
        raise FervidError(f"{path}: file not found")
    if not path.is_file():
        raise FervidError(f"{path}: not a file")
    sha = sha256_file(path)

    def create() -> int:
        with sessions.begin() as s:
            return _reset(s, path, sha, settings, analyzer.versions).id

    job_id = with_db_retry(create, policy, f"creating the job for {path}")
    try:
        info = probe(path)
    except FervidError as e:
        error = str(e)

        def failed() -> None:
            with sessions.begin() as s:
                _fail_job(lock_job(s, job_id), error)

        with_db_retry(failed, policy, f"recording the failure of job {job_id}")
        return _job(sessions, job_id)

    def plan() -> tuple[int, list[int]]:
        with sessions.begin() as s:
            job = lock_job(s, job_id)
            return job.run, _add_segments(s, job, info, policy.segment_s, policy)

    run, idxs = with_db_retry(plan, policy, f"planning job {job_id}")
    end_s = settings.end_s if settings.end_s is not None else (info.duration_s or None)
    span = max(0.0, (end_s or 0) - settings.start_s)
    expected = (round(span * settings.sample_fps) if settings.sample_fps else info.frame_count) or None
    progress = (lambda n: on_progress(n, expected)) if on_progress else None  # noqa: E731
    for idx in idxs:
        status = run_segment(sessions, job_id, idx, run, lambda _m, _s: analyzer, policy, on_progress=progress,
                             batch_size=batch_size)  # fmt: skip
        if status != Outcome.DONE:
            break
    return _job(sessions, job_id)


def _job(sessions: sessionmaker, job_id: int) -> Job:
    with sessions() as s:
        return s.get(Job, job_id)


# ---------------------------------------------------------------------------------------------------- reading


def unfinished_segments(session: Session, job_ids: list[int] | None = None) -> list[tuple[int, int, int]]:
    """(job, run, segment) of every segment not yet done, of jobs that are queued or running."""
    q = (
        select(Segment.job_id, Job.run, Segment.idx)
        .join(Job, Job.id == Segment.job_id)
        .where(Job.status.in_(ACTIVE), Segment.status != Status.DONE)
        .order_by(Segment.job_id, Segment.idx)
    )
    if job_ids:
        q = q.where(Job.id.in_(job_ids))
    return [tuple(r) for r in session.execute(q)]


def per_job(session: Session, segments: Iterable[tuple[int, int, int]]) -> list[tuple[int, int, list[int], int]]:
    """(job, run, segment indices, priority) for (job, run, segment) triples: what to send, one batch of messages
    per job run, its segments in order and without repeats, at the job's priority."""
    by_job: dict[tuple[int, int], set[int]] = {}
    for job_id, run, idx in segments:
        by_job.setdefault((job_id, run), set()).add(idx)
    if not by_job:
        return []
    priority = dict(session.execute(select(Job.id, Job.priority).where(Job.id.in_([j for j, _ in by_job]))).all())
    return [(job_id, run, sorted(idxs), priority.get(job_id, 0)) for (job_id, run), idxs in by_job.items()]


def job_status(session: Session, job_ids: list[int] | None = None,
               limit: int = Options.status_limit) -> list[dict]:  # fmt: skip
    """Rows for `fervid status`: state, progress, frames, faces, worker, GPU, timings, error."""
    q = select(Job).order_by(Job.id.desc()).limit(limit) if not job_ids else select(Job).where(Job.id.in_(job_ids))
    jobs = session.scalars(q).all()
    if job_ids:
        missing = sorted(set(job_ids) - {j.id for j in jobs})
        if missing:
            raise NotFound(f"no job {', '.join(map(str, missing))} in this database")
    rows = []
    for job in sorted(jobs, key=lambda j: j.id):
        segs = session.scalars(select(Segment).where(Segment.job_id == job.id).order_by(Segment.idx)).all()
        done = sum(sg.status == Status.DONE for sg in segs)
        frames = job.frames_analyzed if job.status in ENDED or not segs else \
            sum(sg.frames for sg in segs)  # fmt: skip
        running = [sg for sg in segs if sg.status == Status.RUNNING]
        rows.append({
            "job": job.id, "path": job.path, "state": job.status, "run": job.run,
            "segments_done": done, "segments": len(segs),
            "progress": 1.0 if job.status == Status.DONE else (done / len(segs) if segs else 0.0),
            "frames": frames, "faces": job.faces_found if job.status == Status.DONE else sum(sg.faces for sg in segs),
            "worker": (running[0].worker if running else job.worker),
            "gpu": ",".join(sorted({sg.gpu for sg in segs if sg.gpu})) or None,
            "seconds": (job.timings or {}).get("wall"),
            "error": job.error,
        })  # fmt: skip
    return rows


def expected_frames(job: Job) -> int | None:
    """The frames a job will analyse, from its time range, sampling rate and the video's header (None: unknown)."""
    end_s = job.end_s if job.end_s is not None else job.duration_s
    if not end_s:
        return None
    span = max(0.0, end_s - job.start_s)
    # Frames are sampled at start, start + 1/fps, ... before the end.
    return (math.ceil(span * job.sample_fps - 1e-9) if job.sample_fps else job.frame_count) or None


# Built once: the HTTP API asks it on every status poll, and building a statement costs more than running it.
_PROGRESS = (
    select(Segment.job_id, func.count(), func.sum(case((Segment.status == Status.DONE, 1), else_=0)),
           func.sum(Segment.frames), func.sum(Segment.faces))
    .where(Segment.job_id.in_(bindparam("job_ids", expanding=True))).group_by(Segment.job_id)
)  # fmt: skip


def job_progress(session: Session, job_ids: list[int]) -> dict[int, dict]:
    """Progress of many jobs in one query: segments done of total, frames and faces so far (the segments'
    counts, which running segments' leases keep current)."""
    if not job_ids:
        return {}
    return {j: {"segments": n, "segments_done": int(d or 0), "frames": int(f or 0), "faces": int(fc or 0)}
            for j, n, d, f, fc in session.execute(_PROGRESS, {"job_ids": list(job_ids)})}  # fmt: skip
