"""`fervid serve` over real HTTP: a uvicorn process on 127.0.0.1 running its jobs in-process, against SQLite and
PostgreSQL; every endpoint and every error of the API, a webhook received and its signature checked, and a cancel
that stops a job's segments for good."""

from __future__ import annotations

import csv
import hashlib
import hmac
import http.client
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest
from conftest import ROOT, free_port, shared_path, wait_for

TOKEN = "test-token-1"
SECRET = "webhook-secret"
MAX_UPLOAD = 1_000_000  # the single-face clip (208 kB) fits; 1.5 MB does not


class Api:
    def __init__(self, base: str, token: str | None = TOKEN) -> None:
        self.base, self.token = base, token

    def call(self, method: str, path: str, body: object = None, headers: dict | None = None,
             token: str | None | bool = True) -> tuple[int, dict, bytes]:  # fmt: skip
        headers = dict(headers or {})
        token = self.token if token is True else token
        if token:
            headers["Authorization"] = f"Bearer {token}"
        data = body
        if isinstance(body, dict):
            data = json.dumps(body).encode()
            headers.setdefault("Content-Type", "application/json")
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def json(self, method: str, path: str, body: object = None, expect: int = 200, **kw: object) -> dict:
        status, _, raw = self.call(method, path, body, **kw)
        assert status == expect, (method, path, status, raw[:500])
        return json.loads(raw)


def multipart(fields: dict[str, str], file_name: str, content: bytes) -> tuple[bytes, str]:
    boundary = "fervidtestboundary"
    out = io.BytesIO()
    for k, v in fields.items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
    out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{file_name}"\r\n'
              "Content-Type: video/mp4\r\n\r\n".encode())  # fmt: skip
    out.write(content + f"\r\n--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


class Hooks(BaseHTTPRequestHandler):
    """The test's webhook receiver: the first delivery is answered 500 (so the server must retry), then 200."""

    received: list[tuple[dict, bytes]] = []

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Hooks.received.append((dict(self.headers), body))
        self.send_response(500 if len(Hooks.received) == 1 else 200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def start_server(tmp: Path, db_url: str | None, extra_env: dict | None = None, host: str = "127.0.0.1",
                 tokens: str = TOKEN + ",other-token", args: tuple[str, ...] = ()
                 ) -> tuple[subprocess.Popen, str]:  # fmt: skip
    port = free_port()
    env = {**os.environ, "FERVID_HOME": str(tmp / "home"), "FERVID_MEDIA_ROOTS": str(shared_path("videos")),
           "FERVID_API_TOKENS": tokens, "FERVID_WEBHOOK_SECRET": SECRET, "FERVID_MAX_UPLOAD_BYTES": str(MAX_UPLOAD),
           "FERVID_WEBHOOK_BACKOFF_S": "0.3", "FERVID_WEBHOOK_POLL_S": "0.2", "FERVID_HEARTBEAT_S": "1",
           "FERVID_DEVICE": "cpu"}  # fmt: skip
    env.pop("FERVID_BROKER_URL", None)  # the embedded runner, unless the test names a broker
    env.pop("FERVID_DATABASE_URL", None)
    if db_url:
        env["FERVID_DATABASE_URL"] = db_url
    env.update(extra_env or {})
    # Its log goes to a file: a pipe that nobody reads fills up after a thousand or so access-log lines, and the
    # server then blocks on its next line.
    log = tmp / f"serve-{port}.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "fervid.cli", "serve", "--host", host, "--port", str(port),
                                 *args], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"fervid serve exited ({proc.returncode}):\n{log.read_text()}")
        try:
            with urllib.request.urlopen(base + "/healthz", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    wait_for(up, 120, "fervid serve answers /healthz", interval=0.3)
    return proc, base


@pytest.fixture(params=["sqlite", "postgresql"])
def server(request, tmp_path):
    db_url = request.getfixturevalue("pg_url") if request.param == "postgresql" else None
    hooks = ThreadingHTTPServer(("127.0.0.1", 0), Hooks)
    Hooks.received = []
    threading.Thread(target=hooks.serve_forever, daemon=True).start()
    proc, base = start_server(tmp_path, db_url)
    api = Api(base)
    api.db = db_url or f"sqlite:///{tmp_path / 'home' / 'fervid.db'}"  # the server's database, to check against
    yield api, f"http://127.0.0.1:{hooks.server_address[1]}/hook", tmp_path / "home" / "uploads"
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
    hooks.shutdown()


def wait_job(api: Api, job_id: int, status: str = "done", timeout: float = 300) -> dict:
    def ended() -> dict | None:
        job = api.json("GET", f"/v1/jobs/{job_id}")
        assert job["status"] in ("queued", "running", status), job
        return job if job["status"] == status else None

    return wait_for(ended, timeout, f"job {job_id} {status}", interval=0.3)


@pytest.mark.slow
def test_every_endpoint_and_error_over_http(server):
    api, hook_url, uploads = server
    clip = str(shared_path("videos", "pyfeat_single_face.mp4"))

    # Service endpoints and the schema.
    assert api.json("GET", "/healthz", token=None)["status"] == "ok"
    assert "/v1/jobs" in api.json("GET", "/openapi.json", token=None)["paths"]
    assert api.call("GET", "/docs", token=None)[0] == 200

    # Security errors, each with its message, and nothing written.
    for token, message in [(None, "missing bearer token: send 'Authorization: Bearer TOKEN'"),
                           ("wrong", "invalid bearer token")]:
        status, headers, raw = api.call("GET", "/v1/jobs", token=token)
        assert status == 401 and json.loads(raw) == {"error": "unauthorized", "detail": message}
        assert headers["www-authenticate"] == "Bearer"
    assert api.call("POST", "/v1/jobs", {"paths": [clip]}, token=None)[0] == 401
    err = api.json("POST", "/v1/jobs", {"paths": [clip, "/etc/passwd"]}, expect=403)
    assert err["error"] == "forbidden" and "outside the media roots" in err["detail"]
    # A declared length over the limit is refused before the body is read (so only the headers are sent here: a
    # client still sending would race the server's answer).
    _, ctype = multipart({}, "big.mp4", b"")
    conn = http.client.HTTPConnection(api.base.removeprefix("http://"), timeout=30)
    conn.putrequest("POST", "/v1/jobs")
    for k, v in {"Authorization": f"Bearer {TOKEN}", "Content-Type": ctype, "Content-Length": "1500000"}.items():
        conn.putheader(k, v)
    conn.endheaders()
    resp = conn.getresponse()
    err = json.loads(resp.read())
    conn.close()
    assert resp.status == 413 and err["error"] == "too_large" and "FERVID_MAX_UPLOAD_BYTES" in err["detail"]
    # Without a length (chunked), the bytes are counted as they stream in.
    too_big, ctype = multipart({"fps": "2"}, "big.mp4", b"\0" * (MAX_UPLOAD + 100))
    chunked = (too_big[i:i + 65536] for i in range(0, len(too_big), 65536))
    status, _, raw = api.call("POST", "/v1/jobs", chunked, headers={"Content-Type": ctype,
                                                                    "Transfer-Encoding": "chunked"})  # fmt: skip
    assert status == 413, raw
    assert not uploads.exists() or not any(uploads.iterdir())
    assert api.json("GET", "/v1/jobs")["items"] == []
    err = api.json("GET", "/v1/jobs/999", expect=404)
    assert err == {"error": "not_found", "detail": "no job 999 in this database"}
    assert api.json("POST", "/v1/jobs", {"paths": [clip], "fps": -1}, expect=400)["error"] == "bad_request"
    err = api.json("POST", "/v1/jobs", {"paths": [clip], "callback_url": "file:///etc/passwd"}, expect=400)
    assert "callback_url" in err["detail"]

    # Submit by path, with a tag and a callback; the same request again under its Idempotency-Key.
    body = {"paths": [clip], "fps": 2, "segment": 1, "tag": "by-path", "callback_url": hook_url}
    first = api.json("POST", "/v1/jobs", body, headers={"Idempotency-Key": "abc"}, expect=201)
    again = api.json("POST", "/v1/jobs", body, headers={"Idempotency-Key": "abc"}, expect=201)
    assert again == first and len(first["jobs"]) == 1
    job_id = first["jobs"][0]["id"]
    assert first["jobs"][0]["status"] == "queued" and first["jobs"][0]["segments"] == 3

    # ...and by upload (a multipart form, streamed to the upload folder).
    form, ctype = multipart({"fps": "1", "tag": "uploaded"}, "my clip.mp4", Path(clip).read_bytes())
    up = api.json("POST", "/v1/jobs", form, headers={"Content-Type": ctype}, expect=201)["jobs"][0]
    assert Path(up["path"]).parent.parent == uploads.resolve() and Path(up["path"]).name == "my clip.mp4"

    job = wait_job(api, job_id)
    assert job["progress"] == {"segments_done": 3, "segments_total": 3, "frames_done": 5, "frames_total": 5,
                               "faces": 5, "fraction": 1.0}  # fmt: skip
    assert job["video"]["width"] == 640 and job["video"]["duration_s"] == pytest.approx(2.4)
    assert job["timings"]["finished_at"] and job["tag"] == "by-path" and job["error"] is None
    wait_job(api, up["id"])

    # The list: newest first, filters, cursor pages; a forged or foreign cursor is refused.
    assert [j["id"] for j in api.json("GET", "/v1/jobs")["items"]] == [up["id"], job_id]
    assert [j["id"] for j in api.json("GET", "/v1/jobs?tag=by-path")["items"]] == [job_id]
    assert api.json("GET", "/v1/jobs?status=failed")["items"] == []
    page = api.json("GET", "/v1/jobs?limit=1")
    assert [j["id"] for j in page["items"]] == [up["id"]] and page["next_cursor"]
    page2 = api.json("GET", f"/v1/jobs?limit=1&cursor={page['next_cursor']}")
    assert [j["id"] for j in page2["items"]] == [job_id] and page2["next_cursor"] is None
    forged = page["next_cursor"][:-2] + ("AA" if not page["next_cursor"].endswith("AA") else "BB")
    assert api.json("GET", f"/v1/jobs?limit=1&cursor={forged}", expect=400)["error"] == "bad_cursor"
    assert api.json("GET", f"/v1/jobs?status=done&cursor={page['next_cursor']}", expect=400)["error"] == "bad_cursor"

    # Face rows: pages of at most `limit`, the video on every page, the same rows as the CSV and parquet downloads.
    rows, cursor = [], ""
    while True:
        page = api.json("GET", f"/v1/jobs/{job_id}/faces?limit=2" + (f"&cursor={cursor}" if cursor else ""))
        assert len(page["items"]) <= 2 and page["video"]["sha256"] == job["video"]["sha256"]
        rows += page["items"]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert len(rows) == 5 and [r["time_s"] for r in rows] == [0.0, 0.5, 1.0, 1.5, 2.0]
    from fervid.worker.store.schema import EMOTIONS

    assert set(rows[0]) >= {"time_s", "frame", "track", "x1", "y1", "x2", "y2", *EMOTIONS}
    # The pages hold what the Python API's timeline holds (read on another path: pandas.read_sql), value by value.
    from fervid.worker.store.query import timeline

    numbers = ["time_s", "x1", "y1", "x2", "y2", "det_score", *EMOTIONS]
    expected = timeline(job_id, db=api.db).to_dict("records")
    assert [(r["frame"], r["face"], r["track"], r["emotion"]) for r in rows] == \
        [(e["frame"], e["face"], e["track"], e["emotion"]) for e in expected]  # fmt: skip
    assert [r[c] for r in rows for c in numbers] == pytest.approx([e[c] for e in expected for c in numbers],
                                                                  abs=1e-6)  # fmt: skip
    assert api.json("GET", f"/v1/jobs/{job_id}/faces?cursor={cursor or 'x.y'}", expect=400)["error"] == "bad_cursor"
    status, headers, raw = api.call("GET", f"/v1/jobs/{job_id}/faces?format=csv")
    assert status == 200 and headers["content-type"].startswith("text/csv") and "attachment" in headers[
        "content-disposition"]  # fmt: skip
    table = list(csv.DictReader(io.StringIO(raw.decode())))
    assert [int(r["frame"]) for r in table] == [r["frame"] for r in rows]
    assert float(table[2]["happy"]) == pytest.approx(rows[2]["happy"], abs=1e-5)
    status, _, raw = api.call("GET", f"/v1/jobs/{job_id}/faces?format=parquet")
    pq = pd.read_parquet(io.BytesIO(raw))
    assert status == 200 and pq["frame"].tolist() == [r["frame"] for r in rows]
    window = api.json("GET", f"/v1/jobs/{job_id}/faces?from=0.5&to=1.5&track=0&smooth=1")["items"]
    assert [r["time_s"] for r in window] == [0.5, 1.0]
    assert api.json("GET", f"/v1/jobs/{job_id}/faces?track=7", expect=404)["error"] == "not_found"
    assert len(api.json("GET", f"/v1/jobs/{job_id}/series?points=10")["tracks"]["0"]["time_s"]) == 5

    # Summary and plot.
    summ = api.json("GET", f"/v1/jobs/{job_id}/summary")
    assert summ["job"] == job_id and summ["frames_analyzed"] == 5 and summ["video"]["faces"] == 5
    status, headers, raw = api.call("GET", f"/v1/jobs/{job_id}/plot.png")
    assert status == 200 and headers["content-type"] == "image/png" and raw.startswith(b"\x89PNG")

    # The webhook: refused once by the receiver, retried, delivered; signed; both attempts recorded on the job.
    wait_for(lambda: len(Hooks.received) >= 2, 30, "the callback delivered after a retry", interval=0.1)
    for headers, raw in Hooks.received[:2]:
        expected = "sha256=" + hmac.new(SECRET.encode(), raw, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(headers["X-Fervid-Signature"], expected)
        doc = json.loads(raw)
        assert doc["job_id"] == job_id and doc["status"] == "done" and doc["tag"] == "by-path"
        assert doc["error"] is None and doc["finished_at"]

    def delivered() -> dict | None:
        hook = api.json("GET", f"/v1/jobs/{job_id}")["webhook"]
        return hook if hook["status"] == "delivered" else None

    hook = wait_for(delivered, 10, "the delivery recorded")
    assert [(d["attempt"], d["status_code"]) for d in hook["deliveries"]] == [(1, 500), (2, 200)]

    # Metrics in Prometheus' text format.
    status, headers, raw = api.call("GET", "/metrics")
    text = raw.decode()
    assert status == 200 and headers["content-type"].startswith("text/plain")
    assert 'fervid_jobs{status="done"} 2' in text and "fervid_queue_depth 0" in text
    assert "fervid_workers_seen 1" in text and "fervid_segments_per_second" in text
    assert api.call("GET", "/metrics", token=None)[0] == 401

    # Cancel: a long job with many short segments, cancelled while it runs; nothing of it runs or is written after.
    long_clip = str(shared_path("videos", "liveportrait_d6.mp4"))
    long_id = api.json("POST", "/v1/jobs", {"paths": [long_clip], "fps": 4, "segment": 2},
                       expect=201)["jobs"][0]["id"]  # fmt: skip
    wait_for(lambda: api.json("GET", f"/v1/jobs/{long_id}")["progress"]["segments_done"] >= 1, 300,
             "the long job's first segment")  # fmt: skip
    cancelled = api.json("POST", f"/v1/jobs/{long_id}/cancel")
    assert cancelled["status"] == "cancelled" and cancelled["progress"]["segments_total"] == 17
    done_then = cancelled["progress"]["segments_done"]
    assert done_then < 17
    faces_then = len(list(csv.DictReader(io.StringIO(api.call("GET", f"/v1/jobs/{long_id}/faces?format=csv")[2]
                                                     .decode()))))  # fmt: skip
    time.sleep(6)  # several heartbeats and segments' worth of time
    after = api.json("GET", f"/v1/jobs/{long_id}")
    assert after["status"] == "cancelled" and after["progress"]["segments_done"] == done_then
    faces_after = len(list(csv.DictReader(io.StringIO(api.call("GET", f"/v1/jobs/{long_id}/faces?format=csv")[2]
                                                      .decode()))))  # fmt: skip
    assert faces_after == faces_then
    assert "fervid_queue_depth 0" in api.call("GET", "/metrics")[2].decode()
    err = api.json("POST", f"/v1/jobs/{long_id}/cancel", expect=409)
    assert "already ended (cancelled)" in err["detail"]
    # A cancelled job submitted again starts over (like a failed one), rather than being a duplicate.
    again = api.json("POST", "/v1/jobs", {"paths": [long_clip], "fps": 4, "segment": 2, "end": 2}, expect=201)
    assert again["jobs"][0]["id"] != long_id

    # Delete: the job and its rows; an uploaded video goes with its job.
    assert api.json("DELETE", f"/v1/jobs/{up['id']}") == {"id": up["id"], "deleted": True}
    assert not Path(up["path"]).exists()
    assert api.json("GET", f"/v1/jobs/{up['id']}/faces", expect=404)["error"] == "not_found"
    assert api.json("DELETE", f"/v1/jobs/{up['id']}", expect=404)["error"] == "not_found"
    assert api.json("DELETE", f"/v1/jobs/{long_id}")["deleted"]
    assert api.json("GET", f"/v1/jobs/{long_id}/summary", expect=404)["error"] == "not_found"


def test_without_tokens_the_server_listens_on_loopback_only(tmp_path):
    env = {**os.environ, "FERVID_HOME": str(tmp_path), "FERVID_API_TOKENS": ""}
    cmd = [sys.executable, "-m", "fervid.cli", "serve", "--host", "0.0.0.0", "--port", str(free_port())]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "refusing to listen on 0.0.0.0 without API tokens" in proc.stderr


def test_without_tokens_loopback_is_open(tmp_path):
    proc, base = start_server(tmp_path, None, tokens="")
    try:
        assert Api(base, token=None).json("GET", "/v1/jobs") == {"items": [], "next_cursor": None}
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_several_server_processes_need_the_queue(tmp_path):
    env = {**os.environ, "FERVID_HOME": str(tmp_path), "FERVID_API_TOKENS": TOKEN}
    env.pop("FERVID_BROKER_URL", None)
    cmd = [sys.executable, "-m", "fervid.cli", "serve", "--port", str(free_port()), "--workers", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == ("fervid: error: --workers above 1 needs the queue (FERVID_BROKER_URL): without "
                                   "it, jobs run inside the server's one process")  # fmt: skip


@pytest.mark.slow
def test_with_a_broker_jobs_go_to_the_queue_workers(tmp_path, pg_url):
    """Two server processes (`--workers 2`, no cursor secret set) in front of a queue worker: every request is
    answered whichever process takes it, a page cursor from one process is read by the other, and a killed
    process is replaced while the other answers."""
    from tests.cluster import Cluster, RedisServer

    redis = RedisServer(tmp_path)
    cluster = Cluster(tmp_path, pg_url, redis)
    cluster.start_workers(1)
    env = {"FERVID_BROKER_URL": redis.url}
    proc, base = start_server(tmp_path, pg_url, extra_env=env, args=("--workers", "2"))
    try:
        api = Api(base)
        assert api.json("GET", "/healthz", token=None)["queue"] == "celery"
        clip = str(shared_path("videos", "pyfeat_single_face.mp4"))
        job = api.json("POST", "/v1/jobs", {"paths": [clip], "fps": 2}, expect=201)["jobs"][0]
        assert job["result"] == "queued"
        done = wait_job(api, job["id"], timeout=240)
        assert done["progress"]["frames_done"] == 5 and done["progress"]["faces"] == 5

        # One keep-alive connection, as a polling client keeps it, alternating a page and a status poll: no answer
        # waits out the client's delayed ACK (~40 ms on Linux), as every one after the first did while the
        # processes' shared socket lacked TCP_NODELAY (uvicorn #3149; BENCHMARKS.md, `fervid serve`).
        conn = http.client.HTTPConnection("127.0.0.1", int(base.rsplit(":", 1)[1]), timeout=30)
        took = []
        for _ in range(10):
            for path in (f"/v1/jobs/{job['id']}/faces", f"/v1/jobs/{job['id']}"):
                t = time.perf_counter()
                conn.request("GET", path, headers={"Authorization": f"Bearer {TOKEN}"})
                resp = conn.getresponse()
                assert resp.status == 200 and resp.read()
                took.append(time.perf_counter() - t)
        conn.close()
        assert sorted(took)[len(took) // 2] < 0.035, [round(t * 1000) for t in took]

        def together(fn, n: int = 24) -> list:  # new connections at once, which the kernel hands to both processes
            out: list = [None] * n
            threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, fn())) for i in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            return out

        def two_serving(without: int = 0) -> set[int] | None:
            pids = {h["pid"] for h in together(lambda: api.json("GET", "/healthz", token=None))}
            return pids if len(pids) == 2 and without not in pids else None

        serving = wait_for(two_serving, 60, "both server processes answer")
        first = api.json("GET", f"/v1/jobs/{job['id']}/faces?limit=2")
        answers = together(lambda: api.call("GET", f"/v1/jobs/{job['id']}/faces?limit=2&cursor={first['next_cursor']}"))
        assert [status for status, _, _ in answers] == [200] * len(answers), [raw[:200] for _, _, raw in answers]
        pages = [json.loads(raw) for _, _, raw in answers]
        assert all(p == pages[0] for p in pages) and [i["frame"] for i in pages[0]["items"]] == \
            [i["frame"] for i in api.json("GET", f"/v1/jobs/{job['id']}/faces")["items"]][2:4]  # fmt: skip

        # A server process killed: the other one answers meanwhile, and a new one takes the dead one's place.
        victim = min(serving)
        os.kill(victim, signal.SIGKILL)
        assert [api.call("GET", f"/v1/jobs/{job['id']}")[0] for _ in range(10)] == [200] * 10
        wait_for(lambda: two_serving(without=victim), 120, "a new server process in place of the killed one")
        assert proc.poll() is None
        with cluster.sessions() as s:
            from fervid.worker.store.schema import Segment

            (seg,) = s.query(Segment).filter_by(job_id=job["id"]).all()
        assert not seg.worker.endswith(f":{proc.pid}")  # a queue worker ran it, not the server
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        cluster.stop()
        redis.stop()
