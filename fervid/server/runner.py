"""The embedded runner: without FERVID_BROKER_URL, `fervid serve` runs its jobs' segments itself, in background
threads, through the same lifecycle as the queue's workers (worker.queue.jobs.run_segment), so that a laptop
needs no Redis and no worker process."""

from __future__ import annotations

import itertools
import logging
import queue
import threading

from sqlalchemy.orm import sessionmaker

from fervid.worker.pipeline.media import media_roots
from fervid.worker.queue.client import requeue
from fervid.worker.queue.jobs import mark_enqueued, run_segment
from fervid.worker.settings import QueuePolicy

log = logging.getLogger("fervid.runner")


class EmbeddedRunner:
    def __init__(self, sessions: sessionmaker, threads: int = 1, policy: QueuePolicy | None = None) -> None:
        self.sessions, self.policy = sessions, policy or QueuePolicy.from_env()
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._order = itertools.count()
        self._stop = threading.Event()
        # Jobs cancelled or deleted through this server: their running segment stops at its next batch instead
        # of at its lease's next renewal.
        self.cancelled: set[int] = set()
        self._threads = [threading.Thread(target=self._work, name=f"fervid-runner-{i}", daemon=True)
                         for i in range(threads)]  # fmt: skip

    def send(self, _sessions: sessionmaker, job_id: int, run: int, segments: list[int], priority: int) -> None:
        """A worker.queue.client.Sender: the segments go to this process's threads, higher priority first."""
        for idx in segments:
            self._queue.put((-priority, next(self._order), job_id, idx, run))
        mark_enqueued(self.sessions, job_id, run, segments, self.policy)

    def start(self) -> None:
        # Segments left unfinished by this server's previous life (stopped, or killed) run again.
        for job_id, n in requeue(self.sessions, sender=self.send):
            log.info("job %s: %s unfinished segments queued again", job_id, n)
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)

    def _work(self) -> None:
        from fervid.worker.queue.tasks import analyzer_for

        while not self._stop.is_set():
            try:
                _, _, job_id, idx, run = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                outcome = run_segment(
                    self.sessions, job_id, idx, run, analyzer_for, self.policy, roots=media_roots(),
                    should_stop=lambda j=job_id: self._stop.is_set() or j in self.cancelled,
                )  # fmt: skip
                log.info("job %s segment %s (run %s): %s", job_id, idx, run, outcome)
            except Exception:  # noqa: BLE001 - the database away for the whole retry policy: the next start resends it
                log.exception("job %s segment %s", job_id, idx)
