"""Callbacks with the product's default schedule (tests/test_serve.py shortens it to run a whole server quickly)."""

from __future__ import annotations

import datetime as dt
import http.server
import json
import threading
import time

from fervid.server.webhooks import SIGNATURE_HEADER, deliver_due, sign
from fervid.worker.queue.jobs import as_utc, utcnow
from fervid.worker.settings import ServerSettings
from fervid.worker.store.db import open_database
from fervid.worker.store.schema import Job, Status


class Receiver(http.server.BaseHTTPRequestHandler):
    answers: list[int] = []
    got: list[tuple[bytes, str]] = []

    def do_POST(self) -> None:  # noqa: N802 - the handler's name is http.server's
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Receiver.got.append((body, self.headers[SIGNATURE_HEADER]))
        self.send_response(Receiver.answers.pop(0))
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_a_refused_callback_is_retried_on_the_default_schedule(tmp_path):
    defaults = ServerSettings()
    assert (defaults.webhook_attempts, defaults.webhook_backoff_s) == (6, 2.0)
    # Six attempts, 2 s apart and doubling: a receiver that is down for a minute still gets the callback.
    assert sum(defaults.webhook_backoff_s * 2**k for k in range(defaults.webhook_attempts - 1)) >= 60
    settings = ServerSettings(webhook_secret="s3cret")  # every other setting the product's default
    server = http.server.HTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    Receiver.answers, Receiver.got = [503, 200], []
    sessions = open_database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    with sessions.begin() as s:
        job = Job(job_key="k", path="/v/a.mp4", size_bytes=1, sha256="0" * 64, status=Status.DONE, sample_fps=5,
                  model="small", model_sha256="0" * 64, detector="d", tag="t", finished_at=utcnow(),
                  callback_url=f"http://127.0.0.1:{server.server_port}/hook")  # fmt: skip
        s.add(job)
    try:
        assert deliver_due(sessions, settings) == 1  # refused: 503
        with sessions() as s:
            job = s.get(Job, job.id)
            wait = (as_utc(job.webhook_next_at) - utcnow()).total_seconds()
            assert job.webhook_status == "pending" and 1.5 < wait <= 2.0, wait
        assert deliver_due(sessions, settings) == 0  # not due yet
        time.sleep(wait + 0.1)
        assert deliver_due(sessions, settings) == 1
        with sessions() as s:
            job = s.get(Job, job.id)
            assert job.webhook_status == "delivered" and job.webhook_next_at is None
            assert [(d["attempt"], d["status_code"]) for d in job.webhook_deliveries] == [(1, 503), (2, 200)]
        body, signature = Receiver.got[-1]
        assert signature == sign("s3cret", body) and len(Receiver.got) == 2
        doc = json.loads(body)
        assert doc["job_id"] == job.id and doc["status"] == Status.DONE and doc["tag"] == "t"
        assert dt.datetime.fromisoformat(doc["finished_at"]) == as_utc(job.finished_at)
    finally:
        server.shutdown()
