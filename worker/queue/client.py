"""The queue as its clients use it (the `fervid` command, an HTTP API): submit videos and send their messages,
send the unfinished segments of jobs again, follow jobs until they end. Each returns data; the caller words it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from sqlalchemy.orm import sessionmaker

from fervid.errors import FervidError
from fervid.worker.queue.jobs import expand_inputs, job_status, model_versions, per_job, submit, unfinished_segments
from fervid.worker.queue.tasks import send
from fervid.worker.settings import Options, Settings, validate_segment_s
from fervid.worker.store.db import sessions_for
from fervid.worker.store.schema import ENDED

# (sessions, job, run, segment indices, priority): sends a job run's segment messages.
Sender = Callable[[sessionmaker, int, int, list[int], int], None]


class SubmitResult(StrEnum):
    QUEUED = "queued"  # recorded, and its messages sent
    UNSENT = "unsent"  # recorded, but the broker was unreachable: a running worker's sweeper sends it once it is back
    DUPLICATE = "duplicate"  # submitted before with the same settings and models (and not failed): left as it is
    REFUSED = "refused"  # not recorded: outside the media roots, not a video, the database away...


@dataclass(frozen=True)
class Submission:
    """What became of one video given to `submit_videos`."""

    path: Path
    result: SubmitResult
    job_id: int | None = None
    segments: int = 0
    status: str | None = None  # a duplicate's job status
    error: str | None = None  # why it was refused; for UNSENT, the kind of error the broker gave

    @property
    def recorded(self) -> bool:
        return self.result != SubmitResult.REFUSED


def submit_videos(
    items: list[str],
    settings: Settings,
    db: str | sessionmaker | None = None,
    priority: int = Options.priority,
    segment_s: float | None = None,
    force: bool = False,
    tag: str | None = None,
    callback_url: str | None = None,
    sender: Sender | None = None,
    expand: bool = True,
) -> Iterator[Submission]:
    """Record a job for each video (files, globs and @lists, as `expand_inputs` takes them; `expand` False: the
    items are literal paths, as an HTTP client names them) and send its segments' messages, one video at a time.
    Bad settings raise FervidError here, before anything is recorded; a video that is refused does not stop the
    others. `segment_s` None: the queue policy's (FERVID_SEGMENT_S). `sender`: what sends the messages, the Celery
    queue by default (`fervid serve` without a broker runs them in its own process)."""
    settings.validate()
    if segment_s is not None:
        validate_segment_s(segment_s)
    sessions = sessions_for(db)
    versions = model_versions(settings.model)
    paths = expand_inputs(items) if expand else [Path(p) for p in items]
    extra = {"tag": tag, "callback_url": callback_url}
    return (_submit_and_send(sessions, p, settings, priority, segment_s, force, versions, extra, sender or send)
            for p in paths)  # fmt: skip


def _submit_and_send(sessions: sessionmaker, path: Path, settings: Settings, priority: int, segment_s: float | None,
                     force: bool, versions: dict[str, str], extra: dict, sender: Sender) -> Submission:  # fmt: skip
    try:
        sub = submit(sessions, path, settings, priority=priority, segment_s=segment_s, force=force, versions=versions,
                     **extra)  # fmt: skip
    except FervidError as e:
        return Submission(path, SubmitResult.REFUSED, error=str(e))
    n = len(sub.segments)
    if sub.duplicate:
        return Submission(path, SubmitResult.DUPLICATE, sub.job_id, n, status=sub.status)
    try:
        sender(sessions, sub.job_id, sub.run, sub.segments, priority)
    except Exception as e:  # noqa: BLE001 - Redis is down: the job is recorded, and the sweeper sends it
        return Submission(path, SubmitResult.UNSENT, sub.job_id, n, error=type(e).__name__)
    return Submission(path, SubmitResult.QUEUED, sub.job_id, n)


def requeue(sessions: sessionmaker, job_ids: list[int] | None = None,
            sender: Sender | None = None) -> Iterator[tuple[int, int]]:  # fmt: skip
    """Send again the messages of every unfinished segment of queued or running jobs (all, or `job_ids`), as after
    Redis lost its data; yields (job, segments sent) as each job's are sent. Segments are idempotent: a segment
    whose message turns out to exist twice runs once."""
    with sessions() as s:
        batches = per_job(s, unfinished_segments(s, job_ids))
    for job_id, run, idxs, priority in batches:
        (sender or send)(sessions, job_id, run, idxs, priority)
        yield job_id, len(idxs)


def watch_jobs(sessions: sessionmaker, job_ids: list[int], interval_s: float = 1.0) -> Iterator[list[dict]]:
    """The status rows of `job_ids` (`job_status`), now and then every `interval_s`, until every job has ended;
    the last rows yielded are the final ones."""
    while True:
        with sessions() as s:
            rows = job_status(s, job_ids)
        yield rows
        if all(r["state"] in ENDED for r in rows):
            return
        time.sleep(interval_s)
