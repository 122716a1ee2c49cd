"""Celery tasks: thin wrappers around worker.jobs. Models load once per worker process, after the fork."""

from __future__ import annotations

import functools
import logging
import os

from celery import Task
from celery.exceptions import SoftTimeLimitExceeded
from kombu.exceptions import OperationalError as BrokerError
from sqlalchemy.exc import DBAPIError, OperationalError

from worker.celery_app import app
from worker.db import open_database
from worker.jobs import mark_failed, run_segment

log = logging.getLogger("fervid.worker")
# A database or broker that is briefly away: retried with backoff. Anything else (a bad video) is final.
TRANSIENT = (OperationalError, DBAPIError, BrokerError, ConnectionError, TimeoutError)
MAX_RETRIES = int(os.environ.get("FERVID_TASK_MAX_RETRIES", "8"))


@functools.cache
def sessions():  # noqa: ANN201
    return open_database()


@functools.lru_cache(maxsize=2)
def analyzer_for(model: str):  # noqa: ANN201
    from worker.pipeline import Analyzer

    return Analyzer(model, os.environ.get("FERVID_DEVICE", "auto"))


class SegmentTask(Task):
    def on_failure(self, exc, task_id, args, kwargs, einfo) -> None:  # noqa: ANN001
        job_id, idx = args
        reason = "database unreachable" if isinstance(exc, TRANSIENT) else type(exc).__name__
        if isinstance(exc, SoftTimeLimitExceeded):
            reason = f"segment ran longer than its time limit ({app.conf.task_soft_time_limit} s)"
        msg = f"segment {idx} failed after {self.request.retries} retries: {reason}: {exc}".splitlines()[0]
        ok = mark_failed(sessions(), job_id, idx, msg)
        log.error("job %s %s%s", job_id, msg, "" if ok else " (could not record it: database unreachable)")


@app.task(
    bind=True,
    base=SegmentTask,
    name="fervid.analyze_segment",
    autoretry_for=TRANSIENT,
    retry_backoff=2,
    retry_backoff_max=60,
    retry_jitter=True,
    max_retries=MAX_RETRIES,
)
def analyze_segment(self: Task, job_id: int, idx: int) -> str:
    status = run_segment(sessions(), job_id, idx, analyzer_for)
    log.info("job %s segment %s: %s", job_id, idx, status)
    return status


def enqueue(job_id: int, segments: int | list[int], priority: int = 0) -> None:
    """Queue a job's segments (a count, or the indices). Higher priority (0-9) runs first."""
    for idx in range(segments) if isinstance(segments, int) else segments:
        analyze_segment.apply_async((job_id, idx), priority=max(0, min(9, 9 - priority)))
