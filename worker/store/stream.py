"""A segment's rows written beside the compute: a thread of their own, with a bounded queue, one transaction.

The frame loop hands each batch's rows to `RowStream.put` and goes on with the next batch; the thread deletes
the segment's old rows and COPYs the new ones (worker.store.copy) into an open transaction. The caller ends the
stream with `finish(fn)`: `fn` runs in that same transaction (the job lifecycle checks there that the segment
is still its own, under the job's lock) and decides whether it commits. So a reader never sees part of a segment,
and a stream that fails (the database went away, a constraint) leaves nothing behind: its transaction is rolled
back and the caller writes the rows it still holds the old way, with retries (worker.queue.jobs.commit_segment).

A full queue blocks `put` (backpressure from a slow database); a failed stream stops taking rows, so the frame
loop never waits on a dead one.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session, sessionmaker

from fervid.worker.store.copy import copy_capable, copy_rows
from fervid.worker.store.rows import delete_range

if TYPE_CHECKING:
    from fervid.worker.pipeline.frames_to_rows import SegmentRows

log = logging.getLogger("fervid.stream")

# What `finish`'s function returns: its result, and whether the transaction commits (False: roll it back).
Finish = Callable[[Session], tuple[Any, bool]]
_ABORT = object()


def can_stream(sessions: sessionmaker) -> bool:
    """PostgreSQL through psycopg (COPY, and row locks that let other writers on). SQLite has one writer at a
    time: a transaction held open for a segment would stall every other process; it writes at the end."""
    return copy_capable(sessions.kw.get("bind"))


class StreamFailed(Exception):
    """The stream's transaction failed; `__cause__` says why. Nothing of it was committed."""


class RowStream(threading.Thread):
    def __init__(self, sessions: sessionmaker, job_id: int, start_s: float, end_s: float | None,
                 max_batches: int) -> None:  # fmt: skip
        super().__init__(name="fervid-rows", daemon=True)
        self.sessions, self.job_id, self.start_s, self.end_s = sessions, job_id, start_s, end_s
        self._queue: queue.Queue = queue.Queue(maxsize=max_batches)
        self._failed = threading.Event()
        self.error: BaseException | None = None
        self.result: Any = None
        # Seconds spent deleting and copying, off the frame loop's thread: wall, and this thread's own CPU.
        self.busy_s = self.cpu_s = 0.0

    def run(self) -> None:
        try:
            with self.sessions() as s:  # closing the session rolls back whatever was not committed
                t, c = time.perf_counter(), time.thread_time()
                delete_range(s, self.job_id, self.start_s, self.end_s)
                self.busy_s, self.cpu_s = time.perf_counter() - t, time.thread_time() - c
                pending = None
                while True:
                    item, pending = (pending if pending is not None else self._queue.get()), None
                    if item is _ABORT:
                        return
                    if callable(item):
                        self.result, keep = item(s)
                        if keep:
                            s.commit()
                        return
                    t, c = time.perf_counter(), time.thread_time()
                    # Batches that queued up while the last COPY ran go in one COPY: fewer, larger statements.
                    rows = item
                    while True:
                        try:
                            more = self._queue.get_nowait()
                        except queue.Empty:
                            break
                        if more is _ABORT or callable(more):
                            pending = more
                            break
                        if rows is item:
                            rows = type(item)()
                            rows.extend(item)
                        rows.extend(more)
                    copy_rows(s, rows, self.job_id)
                    self.busy_s += time.perf_counter() - t
                    self.cpu_s += time.thread_time() - c
        except BaseException as e:  # noqa: BLE001 - handed to the caller, who writes the rows the old way
            self.error = e
            self._failed.set()
            log.warning("job %s: streamed write failed (%s); the rows will be written at the end instead",
                        self.job_id, str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__)

    @property
    def failed(self) -> bool:
        return self._failed.is_set()

    def put(self, rows: SegmentRows) -> bool:
        """Queue a batch's rows; blocks while the queue is full. False once the stream has failed."""
        while not self._failed.is_set():
            try:
                self._queue.put(rows, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def finish(self, fn: Finish) -> Any:
        """Wait for the queued rows to be written, run `fn` in the same transaction, commit or roll back as it
        says; returns its result. Raises StreamFailed if the stream failed at any point (nothing committed)."""
        if not self._failed.is_set():
            self._put_control(fn)
        self.join()
        if self.error is not None:
            raise StreamFailed(str(self.error)) from self.error
        return self.result

    def abort(self) -> None:
        """Drop the stream: its transaction is rolled back."""
        if self.is_alive():
            self._put_control(_ABORT)
            self.join(timeout=60)

    def _put_control(self, item: object) -> None:
        while self.is_alive():
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue
