"""The sweeper: what makes every queued job end without anyone running a command.

Every `fervid worker` runs one in a thread (a PostgreSQL advisory lock lets one sweep at a time); each sweep
- takes back segments whose lease ran out (their worker died: killed, out of memory, its machine gone), counting
  the death, and queues them again, or fails the job at the poison limit;
- finishes jobs whose segments are all done but whose finish was interrupted;
- sends the messages of segments that were never sent (a `submit` killed, or Redis down, before it enqueued);
- sends again the messages that Redis lost (restarted without persistence, or wiped), and those stranded in
  Redis' unacknowledged set by a worker that died between taking a message and starting its segment.
Everything it does is safe to repeat: a segment's message that turns out to exist twice runs once.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import threading
import time
from collections.abc import Callable

from sqlalchemy import func, select, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import sessionmaker

from fervid.worker.queue.jobs import as_utc, finish_job, lock_job, lock_segment, per_job, record_death, utcnow
from fervid.worker.settings import QueuePolicy
from fervid.worker.store.schema import ACTIVE, Job, Segment, Status

log = logging.getLogger("fervid.sweeper")
ADVISORY_LOCK = 0x66657276  # "ferv": one sweeper at a time across all workers of a PostgreSQL database
MARKER = "fervid:sweeper:marker"  # gone from Redis = Redis lost its data: look for lost messages

Send = Callable[[int, int, list[int], int], None]  # (job, run, segments, priority)


def reclaim_expired(sessions: sessionmaker, policy: QueuePolicy) -> list[tuple[int, int, int]]:
    """Segments whose lease ran out: a death each; queued again, or the job failed at the poison limit.
    Returns (job, run, segment) to send again."""
    now = utcnow()
    with sessions() as s:
        candidates = s.execute(
            select(Segment.job_id, Segment.idx).join(Job, Job.id == Segment.job_id)
            .where(Segment.status == Status.RUNNING, Segment.lease_until < now, Job.status.in_(ACTIVE))
        ).all()  # fmt: skip
    out = []
    for job_id, idx in candidates:
        with sessions.begin() as s:
            job = lock_job(s, job_id, skip_locked=True)  # busy: someone is writing it; look next time
            if job is None or job.status not in ACTIVE:
                continue
            seg = lock_segment(s, job_id, idx)
            lease = as_utc(seg.lease_until) if seg is not None else None
            if seg is None or seg.status != Status.RUNNING or lease is None or lease >= utcnow():
                continue
            owner = seg.lease_owner
            if record_death(s, job, seg, policy):
                log.error("job %s: %s", job_id, seg.error)
            else:
                log.warning("job %s segment %s: lease of %s ran out; queued again (death %d of %d)", job_id, idx,
                            owner, seg.deaths, policy.max_deaths)  # fmt: skip
                seg.enqueued_at = None
                out.append((job_id, job.run, idx))
    return out


def finish_stuck(sessions: sessionmaker) -> list[int]:
    """Jobs still running whose segments are all done (a finish cut short): finished now."""
    with sessions() as s:
        not_done = select(Segment.job_id).where(Segment.status != Status.DONE)
        ids = s.scalars(select(Job.id).where(Job.status == Status.RUNNING, Job.id.not_in(not_done))).all()
    finished = []
    for job_id in ids:
        with sessions.begin() as s:
            job = lock_job(s, job_id, skip_locked=True)
            if job is not None and finish_job(s, job):
                log.warning("job %s: all segments were done; finished it", job_id)
                finished.append(job_id)
    return finished


def unsent(sessions: sessionmaker, policy: QueuePolicy) -> list[tuple[int, int, int]]:
    """Queued segments whose message was never sent (or was handed back and not re-sent)."""
    old = utcnow() - dt.timedelta(seconds=policy.enqueue_grace_s)
    with sessions() as s:
        return [tuple(r) for r in s.execute(
            select(Segment.job_id, Job.run, Segment.idx).join(Job, Job.id == Segment.job_id)
            .where(Segment.status == Status.QUEUED, Segment.enqueued_at.is_(None), Job.status.in_(ACTIVE),
                   Job.created_at < old)
        )]  # fmt: skip


def _message_args(raw: bytes | str) -> tuple[int, int, int | None] | None:
    """(job, segment, run) of a kombu message as the Redis transport stores it (JSON; body base64 JSON)."""
    try:
        msg = json.loads(raw)
        if isinstance(msg, list):  # an entry of the unacknowledged hash: [message, exchange, routing key]
            msg = msg[0]
        body = msg["body"]
        if msg.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return int(args[0]), int(args[1]), (int(args[2]) if len(args) > 2 and args[2] is not None else None)
    except (ValueError, KeyError, IndexError, TypeError):
        return None


class RedisView:
    """What the broker holds: queued messages and unacknowledged ones, per (job, segment, run)."""

    def __init__(self, url: str, queue: str, priority_steps: list[int], sep: str) -> None:
        import redis

        self.client = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)
        self.keys = [queue] + [f"{queue}{sep}{p}" for p in priority_steps if p]

    def marker_lost(self) -> bool:
        """True once each time Redis comes back without its data (or is new)."""
        return bool(self.client.set(MARKER, "1", nx=True))

    def count(self) -> int:
        pipe = self.client.pipeline()
        for k in self.keys:
            pipe.llen(k)
        pipe.hlen("unacked")
        return sum(pipe.execute())

    def queued(self) -> set[tuple]:
        found = set()
        for k in self.keys:
            for raw in self.client.lrange(k, 0, -1):
                if (a := _message_args(raw)) is not None:
                    found.add(a)
        for raw in self.client.hvals("unacked"):
            if (a := _message_args(raw)) is not None:
                found.add(a)
        return found

    def stale_unacked(self, older_than_s: float) -> set[tuple]:
        """Messages a worker took more than `older_than_s` ago and has not acknowledged."""
        tags = self.client.zrangebyscore("unacked_index", "-inf", time.time() - older_than_s)
        raws = self.client.hmget("unacked", tags) if tags else []
        return {a for raw in raws if raw is not None and (a := _message_args(raw)) is not None}


def lost_messages(sessions: sessionmaker, policy: QueuePolicy, broker: RedisView) -> list[tuple[int, int, int]]:
    """Queued segments (sent a while ago) that have no message a live worker will get: lost with Redis' data, or
    stranded in the unacknowledged set by a worker that died before starting them."""
    old = utcnow() - dt.timedelta(seconds=policy.enqueue_grace_s)
    with sessions() as s:
        waiting = [tuple(r) for r in s.execute(
            select(Segment.job_id, Job.run, Segment.idx).join(Job, Job.id == Segment.job_id)
            .where(Segment.status == Status.QUEUED, Segment.enqueued_at < old, Job.status.in_(ACTIVE))
        )]  # fmt: skip
    if not waiting:
        return []
    out: set[tuple[int, int, int]] = set()
    stale = broker.stale_unacked(policy.enqueue_grace_s)
    out |= {(j, r, i) for j, r, i in waiting if (j, i, r) in stale}
    if broker.marker_lost() or broker.count() < len(waiting):
        present = broker.queued() - stale
        present |= {(j, i, None) for j, i, r in present}  # messages of fervid versions without runs
        out |= {(j, r, i) for j, r, i in waiting if (j, i, r) not in present and (j, i, None) not in present}
    return sorted(out)


def sweep(sessions: sessionmaker, policy: QueuePolicy, send: Send, broker: RedisView | None,
          judge_leases: bool = True) -> dict[str, int]:  # fmt: skip
    """One pass; returns what it did (counts)."""
    todo = reclaim_expired(sessions, policy) if judge_leases else []
    reclaimed = len(todo)
    finished = finish_stuck(sessions)
    todo += unsent(sessions, policy)
    if broker is not None:
        try:
            todo += lost_messages(sessions, policy, broker)
        except Exception as e:  # noqa: BLE001 - Redis away: the rest of the sweep still counts
            if isinstance(e, SQLAlchemyError):
                raise
            log.warning("could not look for lost messages: %s", str(e).splitlines()[0] if str(e) else type(e))
    with sessions() as s:
        batches = per_job(s, todo)
    for job_id, run, idxs, priority in batches:
        send(job_id, run, idxs, priority)
        log.info("job %s: sent %d segment message(s) again", job_id, len(idxs))
    return {"reclaimed": reclaimed, "finished": len(finished), "sent": sum(len(b[2]) for b in batches)}


class Sweeper(threading.Thread):
    """Sweeps every policy.sweep_s until stopped. Errors (the database or Redis away) wait for the next round."""

    def __init__(self, sessions: sessionmaker, policy: QueuePolicy, send: Send,
                 broker: Callable[[], RedisView | None]) -> None:  # fmt: skip
        super().__init__(name="fervid-sweeper", daemon=True)
        self.sessions, self.policy, self.send, self.broker = sessions, policy, send, broker
        self.stop_event = threading.Event()
        # After an outage every lease looks expired, but their owners could not renew them either: give them one
        # lease period of a reachable database before judging anyone dead.
        self._db_ok_since: float | None = None

    def run(self) -> None:
        while not self.stop_event.wait(self.policy.sweep_s):
            try:
                self.sweep_once()
            except Exception as e:  # noqa: BLE001
                if isinstance(e, SQLAlchemyError):
                    self._db_ok_since = None  # the leases' owners could not renew them either
                log.warning("sweep skipped: %s", str(e).splitlines()[0] if str(e) else type(e).__name__)

    def sweep_once(self) -> dict[str, int] | None:
        engine = self.sessions.kw["bind"]
        with engine.connect() as conn:
            now = time.monotonic()
            if self._db_ok_since is None:
                self._db_ok_since = now
            if engine.dialect.name == "postgresql":
                if not conn.scalar(select(func.pg_try_advisory_lock(ADVISORY_LOCK))):
                    return None  # another worker is sweeping
            try:
                judge = now - self._db_ok_since >= self.policy.lease_s
                return sweep(self.sessions, self.policy, self.send, self.broker(), judge_leases=judge)
            finally:
                if engine.dialect.name == "postgresql":
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": ADVISORY_LOCK})
                    conn.commit()

    def stop(self) -> None:
        self.stop_event.set()
