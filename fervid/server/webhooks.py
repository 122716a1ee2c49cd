"""Callbacks: when a job with a callback_url ends (whichever process ended it), POST {job_id, status, tag, error,
finished_at} to it, signed with HMAC-SHA256 under FERVID_WEBHOOK_SECRET (header X-Fervid-Signature:
sha256=HEX of the body), retried with exponential backoff; every attempt is recorded on the job.

Delivery state lives on the job row, so several servers can run this loop: an attempt is claimed by moving the
job's webhook_next_at past the attempt's timeout in one conditional UPDATE, which only one of them wins."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import logging
import threading
import urllib.error
import urllib.request

from sqlalchemy import select, update
from sqlalchemy.orm import sessionmaker

from fervid.worker.queue.jobs import as_utc, utcnow
from fervid.worker.settings import ServerSettings
from fervid.worker.store.schema import ENDED, Job

log = logging.getLogger("fervid.webhooks")
SIGNATURE_HEADER = "X-Fervid-Signature"


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def payload(job: Job) -> bytes:
    finished = as_utc(job.finished_at)
    doc = {"job_id": job.id, "status": job.status, "tag": job.tag, "error": job.error,
           "finished_at": finished.isoformat() if finished else None}  # fmt: skip
    return json.dumps(doc, separators=(",", ":")).encode()


def _post(url: str, body: bytes, signature: str, attempt: int, timeout: float) -> tuple[int | None, str | None]:
    req = urllib.request.Request(url, data=body, method="POST", headers={
        "Content-Type": "application/json", SIGNATURE_HEADER: signature, "X-Fervid-Attempt": str(attempt),
        "User-Agent": "fervid-webhook"})  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, None
    except urllib.error.HTTPError as e:
        return e.code, f"HTTP {e.code}"
    except Exception as e:  # noqa: BLE001 - refused, timed out, DNS: all are a failed attempt to retry
        return None, f"{type(e).__name__}: {e}"[:300]


def deliver_due(sessions: sessionmaker, settings: ServerSettings) -> int:
    """Send every callback that is due once; returns the attempts made."""
    now = utcnow()
    with sessions.begin() as s:
        ended = update(Job).where(Job.callback_url.is_not(None), Job.webhook_status.is_(None), Job.status.in_(ENDED))
        s.execute(ended.values(webhook_status="pending", webhook_next_at=now))
    with sessions() as s:
        due = s.scalars(select(Job.id).where(Job.webhook_status == "pending", Job.webhook_next_at <= now)).all()
    attempts = 0
    for job_id in due:
        hold = utcnow() + dt.timedelta(seconds=settings.webhook_timeout_s * 2 + 5)
        with sessions.begin() as s:
            claim = update(Job).where(Job.id == job_id, Job.webhook_status == "pending", Job.webhook_next_at <= now)
            won = s.execute(claim.values(webhook_next_at=hold)).rowcount
            job = s.get(Job, job_id) if won else None
            if job is None:
                continue
            url, body, n = job.callback_url, payload(job), len(job.webhook_deliveries or []) + 1
        code, error = _post(url, body, sign(settings.webhook_secret, body), n, settings.webhook_timeout_s)
        attempts += 1
        ok = code is not None and 200 <= code < 300
        with sessions.begin() as s:
            job = s.get(Job, job_id)
            if job is None:  # deleted meanwhile
                continue
            job.webhook_deliveries = [*(job.webhook_deliveries or []),
                                      {"at": utcnow().isoformat(), "attempt": n, "status_code": code, "error": error}]
            if ok:
                job.webhook_status, job.webhook_next_at = "delivered", None
            elif n >= settings.webhook_attempts:
                job.webhook_status, job.webhook_next_at = "failed", None
            else:
                job.webhook_next_at = utcnow() + dt.timedelta(seconds=settings.webhook_backoff_s * 2 ** (n - 1))
        if not ok:
            log.warning("job %s: callback attempt %s failed: %s", job_id, n, error)
    return attempts


class Notifier(threading.Thread):
    def __init__(self, sessions: sessionmaker, settings: ServerSettings) -> None:
        super().__init__(name="fervid-webhooks", daemon=True)
        self.sessions, self.settings, self._stop_event = sessions, settings, threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.settings.webhook_poll_s):
            try:
                deliver_due(self.sessions, self.settings)
            except Exception:  # noqa: BLE001 - the database away: the next round tries again
                log.exception("webhook round failed")

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=30)
