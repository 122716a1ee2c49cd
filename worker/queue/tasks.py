"""Celery tasks: thin wrappers around worker.queue.jobs. Models load once per worker process, after the fork.

A message is (job id, segment index, run). The task claims the segment in the database, so a repeated, late or
stale message does nothing; database outages are waited out inside the task (worker.store.db.with_db_retry)
rather than by Celery retries, which would pull every queued message into the worker's memory as delayed retries.
"""

from __future__ import annotations

import functools
import logging
import signal
import threading

from celery import Task
from sqlalchemy.orm import sessionmaker

from fervid.errors import FervidError
from fervid.worker.pipeline.media import media_roots
from fervid.worker.queue.celery_app import app
from fervid.worker.queue.jobs import Claim, mark_enqueued, run_segment
from fervid.worker.settings import Options, QueuePolicy
from fervid.worker.store.db import open_database_waiting

log = logging.getLogger("fervid.worker")
POLICY = QueuePolicy.from_env()
# Set by SIGTERM in a pool process while it runs a segment: the segment is handed back between two batches.
stopping = threading.Event()


def _hand_back_on_sigterm(_signum: int, _frame: object) -> None:
    stopping.set()


@functools.cache
def sessions() -> sessionmaker:
    return open_database_waiting(POLICY)


@functools.lru_cache(maxsize=2)
def analyzer_for(model: str, sha256: str):  # noqa: ANN201
    """The models of a job: exactly the weights it was submitted with (their checksum), or a clear error."""
    import os

    from fervid.worker.pipeline.frames_to_rows import Analyzer

    analyzer = Analyzer(model, os.environ.get("FERVID_DEVICE", Options.device),
                        os.environ.get("FERVID_PRECISION", Options.precision))  # fmt: skip
    if analyzer.classifier.sha256 != sha256:
        raise FervidError(
            f"{model}: the weights here (sha256 {analyzer.classifier.sha256[:12]}...) are not the ones the job was "
            f"submitted with (sha256 {sha256[:12]}...)"
        )
    return analyzer


class SegmentTask(Task):
    def on_failure(self, exc, task_id, args, kwargs, einfo) -> None:  # noqa: ANN001
        log.error("job %s segment %s: %s: %s", args[0], args[1], type(exc).__name__, exc)


@app.task(bind=True, base=SegmentTask, name="fervid.analyze_segment")
def analyze_segment(self: Task, job_id: int, idx: int, run: int | None = None) -> str:
    # While a segment runs, SIGTERM (docker stop, a redeploy: the supervisor passes it on) asks for the segment to be
    # handed back rather than killing the process (billiard's own handler, which makes it exit, is restored after).
    stopping.clear()
    previous = signal.signal(signal.SIGTERM, _hand_back_on_sigterm)
    try:
        status = run_segment(sessions(), job_id, idx, run, analyzer_for, POLICY, roots=media_roots(),
                             should_stop=stopping.is_set, requeue=_requeue)  # fmt: skip
    finally:
        signal.signal(signal.SIGTERM, previous)
    log.info("job %s segment %s (run %s): %s", job_id, idx, run, status)
    return status


def _requeue(claim: Claim) -> None:
    send(sessions(), claim.job_id, claim.run, [claim.idx], claim.priority)


def enqueue(job_id: int, run: int, segments: list[int], priority: int = Options.priority) -> None:
    """Send a job's segment messages. Higher priority (0-9) runs first."""
    for idx in segments:
        analyze_segment.apply_async((job_id, idx, run), priority=max(0, min(9, 9 - priority)))


def send(sessions_: sessionmaker, job_id: int, run: int, segments: list[int], priority: int = Options.priority) -> None:
    """Send the messages, then record that they were sent (a segment not marked sent is sent by the sweeper)."""
    enqueue(job_id, run, segments, priority)
    mark_enqueued(sessions_, job_id, run, segments, POLICY)
