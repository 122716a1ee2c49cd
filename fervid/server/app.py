"""The HTTP application of `fervid serve`: the jobs and timelines of fervid.worker as JSON, CSV, parquet and PNG.

Every error answers {"error": CODE, "detail": MESSAGE} with its status code. Handlers are plain functions (FastAPI
runs them in its thread pool), as the store below them is synchronous SQLAlchemy.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import string
import tempfile
import uuid
from collections.abc import Iterator
from html import escape as html_escape
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from starlette.exceptions import HTTPException as StarletteHTTPException

from fervid.errors import FervidError, Forbidden, NotFound
from fervid.server.auth import Unauthorized, caller
from fervid.server.cursors import BadCursor, Cursors
from fervid.worker.pipeline.media import check_media_path, media_roots
from fervid.worker.queue.jobs import as_utc, cancel_job, delete_job, expected_frames, job_progress
from fervid.worker.settings import SMOOTH_METHODS, Options, ServerSettings, Settings, default
from fervid.worker.store.db import autocommit_sessions, open_database
from fervid.worker.store.schema import ENDED, IdempotencyKey, Job, Status

log = logging.getLogger("fervid.server")
STATUS_PATTERN = "^(" + "|".join(s.value for s in Status) + ")$"


class ApiError(Exception):
    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail


class TooLarge(FervidError):
    pass


# The error code and status of each kind of failure the layers below raise.
ERRORS: list[tuple[type[Exception], int, str]] = [
    (Unauthorized, 401, "unauthorized"),
    (Forbidden, 403, "forbidden"),
    (NotFound, 404, "not_found"),
    (TooLarge, 413, "too_large"),
    (BadCursor, 400, "bad_cursor"),
    (FervidError, 400, "bad_request"),
]


GAUGES = [
    ("queue_depth", "Segments queued, of jobs not ended."),
    ("segments_per_second", "Segments finished per second over the last minute."),
    ("faces_per_second", "Faces written per second over the last minute."),
    ("workers_seen", "Worker processes that ran a segment in the last 5 minutes."),
]


def error_body(error: str, detail: Any) -> dict:
    return {"error": error, "detail": detail}


class JobRequest(BaseModel):
    """POST /v1/jobs as JSON: `fervid submit`'s options, plus a tag and a callback URL."""

    model_config = ConfigDict(extra="forbid")

    paths: list[str] = Field(min_length=1, max_length=1000)
    fps: float = default("sample_fps")
    start: float = default("start_s")
    end: float | None = default("end_s")
    model: str = default("model")
    threshold: float = default("score_threshold")
    min_face: int = default("min_face")
    max_faces: int = default("max_faces")
    priority: int = Field(default=Options.priority, ge=0, le=9)
    segment: float | None = None
    force: bool = False
    tag: str | None = Field(default=None, max_length=128)
    callback_url: str | None = Field(default=None, max_length=2000)

    def settings(self) -> Settings:
        s = Settings(sample_fps=self.fps, start_s=self.start, end_s=self.end, model=self.model,
                     score_threshold=self.threshold, min_face=self.min_face, max_faces=self.max_faces)  # fmt: skip
        s.validate()
        return s


def _iso(t: Any) -> str | None:
    t = as_utc(t)
    return t.isoformat() if t else None


# async, though it awaits nothing: FastAPI runs a plain `def` dependency in its thread pool, one more thread hop
# on every request; checking a token is quick enough for the event loop.
async def _auth(request: Request, authorization: Annotated[str | None, Header()] = None) -> str:
    return caller(authorization, request.app.state.settings.api_tokens)


# The caller of an endpoint: resolving it checks the bearer token (401 when wrong or missing).
Caller = Annotated[str, Depends(_auth)]


def job_json(job: Job, progress: dict | None) -> dict:
    p = progress or {"segments": 0, "segments_done": 0, "frames": 0, "faces": 0}
    ended = job.status in ENDED
    frames_done = job.frames_analyzed if job.status == Status.DONE else p["frames"]
    total = expected_frames(job)
    return {
        "id": job.id,
        "status": job.status,
        "path": job.path,
        "tag": job.tag,
        "progress": {
            "segments_done": p["segments_done"], "segments_total": p["segments"],
            "frames_done": frames_done, "frames_total": total,
            "faces": job.faces_found if job.status == Status.DONE else p["faces"],
            "fraction": 1.0 if job.status == Status.DONE else
            round(p["segments_done"] / p["segments"], 4) if p["segments"] else 0.0,
        },
        "error": job.error,
        "timings": {"created_at": _iso(job.created_at), "started_at": _iso(job.started_at),
                    "finished_at": _iso(job.finished_at), "seconds": (job.timings or {}).get("wall") if ended else None,
                    "stages": job.timings},
        "video": video_json(job),
        "settings": {"fps": job.sample_fps, "start": job.start_s, "end": job.end_s, "model": job.model,
                     "threshold": job.score_threshold, "min_face": job.min_face, "max_faces": job.max_faces,
                     "priority": job.priority, "segment": job.segment_s},
        "webhook": None if not job.callback_url else {
            "url": job.callback_url, "status": job.webhook_status, "deliveries": job.webhook_deliveries or []},
    }  # fmt: skip


def video_json(job: Job) -> dict:
    return {"path": job.path, "size_bytes": job.size_bytes, "sha256": job.sha256, "duration_s": job.duration_s,
            "fps": job.fps, "frame_count": job.frame_count, "width": job.width, "height": job.height,
            "codec": job.codec}  # fmt: skip


def _settle_heap() -> None:
    """Loads what the polled reads use (pandas, the queries) before the server takes requests, then moves every
    object made so far out of the cyclic garbage collector's reach (`gc.freeze`).

    Without it the first pages of each server process paid for the imports (page p99 394 ms in a benchmark's first
    5 s), and every full collection walked the ~140,000 objects of the loaded libraries, about 65 ms charged to
    whichever request set it off: BENCHMARKS.md, `fervid serve` under 50 polling clients.
    """
    import gc

    import fervid.worker.store.export  # noqa: F401
    import fervid.worker.store.query  # noqa: F401

    gc.collect()
    gc.freeze()


def app_from_env() -> FastAPI:
    """The application as `fervid serve --workers N` builds it in each worker process: everything from the
    environment (FERVID_DATABASE_URL, FERVID_BROKER_URL, the server settings)."""
    return create_app()


def create_app(settings: ServerSettings | None = None, db: str | None = None, broker: bool | None = None) -> FastAPI:
    """The application. `broker`: submit to the Celery queue (default: when FERVID_BROKER_URL is set); otherwise
    jobs run in this process (fervid.server.runner)."""
    from fervid import __version__

    cfg = settings or ServerSettings.from_env()
    upload_dir = Path(cfg.upload_dir or Path(os.environ.get("FERVID_HOME", Path.home() / ".local/share/fervid"))
                      / "uploads").expanduser().resolve()  # fmt: skip
    upload_dir.mkdir(parents=True, exist_ok=True)
    # Uploads are videos like any other: the upload folder is a media root of this process (workers reading
    # them through a broker need it among their own FERVID_MEDIA_ROOTS, at the same path).
    roots = [r for r in os.environ.get("FERVID_MEDIA_ROOTS", "").split(os.pathsep) if r.strip()]
    if str(upload_dir) not in roots:
        os.environ["FERVID_MEDIA_ROOTS"] = os.pathsep.join([*roots, str(upload_dir)])
    sessions = open_database(db)
    reads = autocommit_sessions(sessions)  # the polled reads: a job, a list of jobs, a page of faces
    use_broker = bool(os.environ.get("FERVID_BROKER_URL")) if broker is None else broker
    cursors = Cursors(cfg.cursor_secret)

    from fervid.server.runner import EmbeddedRunner
    from fervid.server.webhooks import Notifier

    runner = None if use_broker else EmbeddedRunner(sessions, cfg.embedded_threads)
    notifier = Notifier(sessions, cfg)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):  # noqa: ANN202
        _settle_heap()
        if runner:
            runner.start()
        notifier.start()
        yield
        notifier.stop()
        if runner:
            runner.stop()

    app = FastAPI(title="fervid", version=__version__, lifespan=lifespan,
                  description="Video emotion timelines: submit videos, follow jobs, read face rows, summaries, plots.")
    app.state.sessions, app.state.runner, app.state.settings = sessions, runner, cfg

    @app.exception_handler(ApiError)
    async def _api_error(_req: Request, e: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return JSONResponse(error_body(e.error, e.detail), status_code=e.status, headers=headers)

    @app.exception_handler(FervidError)
    async def _fervid_error(req: Request, e: FervidError) -> JSONResponse:
        return await _api_error(req, as_api_error(e))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req: Request, e: RequestValidationError) -> JSONResponse:
        detail = "; ".join(f"{'.'.join(str(x) for x in err['loc'] if x != 'body')}: {err['msg']}"
                           for err in e.errors())  # fmt: skip
        return JSONResponse(error_body("invalid_request", detail), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        return JSONResponse(error_body(code, str(e.detail)), status_code=e.status_code)

    def load_job(s: Session, job_id: int) -> Job:
        job = s.get(Job, job_id)
        if job is None:
            raise NotFound(f"no job {job_id} in this database")
        return job

    # ----------------------------------------------------------------------------------------------- service

    @app.get("/healthz", tags=["service"])
    def healthz() -> dict:
        from sqlalchemy import text

        with sessions() as s:
            s.execute(text("SELECT 1"))
        return {"status": "ok", "database": sessions.kw["bind"].dialect.name,
                "queue": "celery" if use_broker else "embedded", "pid": os.getpid()}  # fmt: skip

    @app.get("/metrics", tags=["service"], response_class=PlainTextResponse)
    def metrics(_who: Caller) -> PlainTextResponse:
        from fervid.worker.store.query import queue_metrics

        with sessions() as s:
            m = queue_metrics(s)
        lines = ["# HELP fervid_jobs Jobs by status.", "# TYPE fervid_jobs gauge"]
        lines += [f'fervid_jobs{{status="{k}"}} {v}' for k, v in m["jobs"].items()]
        for name, help_ in GAUGES:
            lines += [f"# HELP fervid_{name} {help_}", f"# TYPE fervid_{name} gauge", f"fervid_{name} {m[name]:g}"]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    # ---------------------------------------------------------------------------------------------- submit

    @app.post("/v1/jobs", tags=["jobs"], summary="Submit videos by path (JSON) or by upload (multipart/form-data)")
    async def submit_jobs(request: Request, who: Caller,
                          idempotency_key: Annotated[str | None, Header(max_length=200)] = None) -> JSONResponse:
        from starlette.concurrency import run_in_threadpool

        if idempotency_key:
            earlier = await run_in_threadpool(_claim_key, who, idempotency_key)
            if earlier is not None:
                return earlier
        try:
            status, body = await _submit(request)
        except (ApiError, FervidError) as e:
            err = e if isinstance(e, ApiError) else as_api_error(e)
            status, body = err.status, error_body(err.error, err.detail)
        except BaseException:
            if idempotency_key:
                await run_in_threadpool(_forget_key, who, idempotency_key)
            raise
        if idempotency_key:
            await run_in_threadpool(_store_key, who, idempotency_key, status, body)
        return JSONResponse(body, status_code=status)

    def _claim_key(who: str, key: str) -> JSONResponse | None:
        """None when this request is the key's first (recorded as in flight); else the first one's answer."""
        try:
            with sessions.begin() as s:
                s.add(IdempotencyKey(scope=who, key=key))
            return None
        except IntegrityError:
            with sessions() as s:
                row = s.get(IdempotencyKey, (who, key))
            if row is None or row.response is None:
                return JSONResponse(error_body("conflict", "a request with this Idempotency-Key is still in progress"),
                                    status_code=409)  # fmt: skip
            return JSONResponse(row.response, status_code=row.status_code, headers={"Idempotent-Replayed": "true"})

    def _store_key(who: str, key: str, status: int, body: dict) -> None:
        with sessions.begin() as s:
            row = s.get(IdempotencyKey, (who, key))
            row.status_code, row.response = status, body

    def _forget_key(who: str, key: str) -> None:
        with sessions.begin() as s:
            s.execute(delete(IdempotencyKey).where(IdempotencyKey.scope == who, IdempotencyKey.key == key))

    async def _submit(request: Request) -> tuple[int, dict]:
        from starlette.concurrency import run_in_threadpool

        ctype = request.headers.get("content-type", "")
        uploaded: list[Path] = []
        if ctype.startswith("multipart/form-data"):
            fields, uploaded = await _receive_upload(request, upload_dir, cfg.max_upload_bytes)
            try:
                raw = {k: v for k, v in fields.items() if v != ""}
                raw["paths"] = [str(p) for p in uploaded]
                if not uploaded:
                    raise FervidError("no file in the form: send the video as a field named 'file'")
                req = _parse(raw)
                return await run_in_threadpool(_record, req, uploaded)
            except BaseException:
                for p in uploaded:
                    shutil.rmtree(p.parent, ignore_errors=True)
                raise
        try:
            raw = await request.json()
        except ValueError:
            raise FervidError("the body must be JSON ({\"paths\": [...], ...}) or a multipart upload") from None
        return await run_in_threadpool(_record, _parse(raw), [])

    def _parse(raw: Any) -> JobRequest:
        from pydantic import ValidationError

        if not isinstance(raw, dict):
            raise FervidError("the body must be a JSON object")
        try:
            return JobRequest.model_validate(raw)
        except ValidationError as e:
            detail = "; ".join(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors())
            raise ApiError(422, "invalid_request", detail) from None

    def _record(req: JobRequest, uploaded: list[Path]) -> tuple[int, dict]:
        from fervid.worker.queue.client import SubmitResult, submit_videos

        settings = req.settings()
        if req.callback_url is not None:
            if not req.callback_url.startswith(("http://", "https://")):
                raise FervidError("callback_url must be an http:// or https:// URL")
            if not cfg.webhook_secret:
                raise FervidError("callbacks need FERVID_WEBHOOK_SECRET on the server, to sign them")
        # Every path is checked before anything is recorded: one outside the roots refuses the whole request.
        allowed = media_roots()
        for p in req.paths:
            check_media_path(p, allowed)
        subs = submit_videos(req.paths, settings, db=sessions, priority=req.priority, segment_s=req.segment,
                             force=req.force, tag=req.tag, callback_url=req.callback_url,
                             sender=runner.send if runner else None, expand=False)  # fmt: skip
        jobs = []
        for sub in subs:
            if sub.result == SubmitResult.REFUSED:
                jobs.append({"id": None, "status": "refused", "path": str(sub.path), "result": sub.result,
                             "error": sub.error})  # fmt: skip
                continue
            if sub.result == SubmitResult.DUPLICATE and sub.path in uploaded:
                shutil.rmtree(sub.path.parent, ignore_errors=True)  # the same video was uploaded before: one copy
            jobs.append({"id": sub.job_id, "status": sub.status or Status.QUEUED, "path": str(sub.path),
                         "result": sub.result, "segments": sub.segments, "error": sub.error})  # fmt: skip
        if not any(j["id"] for j in jobs):
            raise ApiError(400, "refused", "; ".join(j["error"] for j in jobs))
        return 201 if any(j["result"] != SubmitResult.DUPLICATE for j in jobs) else 200, {"jobs": jobs}

    # -------------------------------------------------------------------------------------------- reading

    @app.get("/v1/jobs", tags=["jobs"], summary="Jobs, newest first")
    def list_jobs(_who: Caller, status: Annotated[str | None, Query(pattern=STATUS_PATTERN)] = None,
                  tag: str | None = None, limit: Annotated[int, Query(ge=1, le=500)] = 50,
                  cursor: str | None = None) -> dict:  # fmt: skip
        from fervid.worker.store.query import list_jobs as query_jobs

        scope = {"list": "jobs", "status": status, "tag": tag}
        before = cursors.load(cursor, scope)[0] if cursor else None
        with reads() as s:
            jobs = query_jobs(s, status, tag, limit + 1, before)
            page = jobs[:limit]
            progress = job_progress(s, [j.id for j in page])
        nxt = cursors.dump(scope, [page[-1].id]) if len(jobs) > limit else None
        return {"items": [job_json(j, progress.get(j.id)) for j in page], "next_cursor": nxt}

    @app.get("/v1/jobs/{job_id}", tags=["jobs"])
    def get_job(job_id: int, _who: Caller) -> dict:
        with reads() as s:
            job = load_job(s, job_id)
            progress = job_progress(s, [job_id])
        return job_json(job, progress.get(job_id))

    @app.get("/v1/jobs/{job_id}/faces", tags=["timelines"],
             summary="Face rows in time order: JSON pages, or the whole selection as CSV or parquet")
    def faces(job_id: int, _who: Caller,
              from_: Annotated[float | None, Query(alias="from", ge=0)] = None,
              to: Annotated[float | None, Query(gt=0)] = None,
              track: Annotated[int | None, Query(ge=0)] = None,
              smooth: Annotated[float | None, Query(gt=0)] = None,
              smooth_method: Annotated[str, Query(pattern="^(" + "|".join(SMOOTH_METHODS) + ")$")] =
              Options.smooth_method,
              limit: Annotated[int, Query(ge=1)] = 1000,
              cursor: str | None = None,
              format: Annotated[str, Query(pattern="^(json|csv|parquet)$")] = "json") -> Response:  # fmt: skip
        from fervid.worker.store.export import iter_csv, iter_parquet
        from fervid.worker.store.query import face_page, get_job, iter_face_pages

        selection = {"track": track, "start_s": from_, "end_s": to, "smooth_s": smooth, "smooth_method": smooth_method}
        if format != "json":
            with sessions() as s:
                get_job(s, job_id)  # unknown: 404; failed: 400 with its reason
            first = iter_face_pages(sessions, job_id, **selection)
            probe = next(first)  # errors (an unknown track) answer before the download starts
            pages = _chain(probe, first)
            body, media = (iter_csv(pages), "text/csv") if format == "csv" else \
                (iter_parquet(pages), "application/vnd.apache.parquet")  # fmt: skip
            name = f"job{job_id}-faces.{format}"
            return StreamingResponse(body, media_type=media,
                                     headers={"Content-Disposition": f'attachment; filename="{name}"'})  # fmt: skip
        limit = min(limit, cfg.max_page)
        scope = {"list": "faces", "job": job_id, **selection}
        with reads() as s:  # one session: one pooled connection for the job and its page
            job = get_job(s, job_id)  # unknown: 404; failed: 400 with its reason
            after = tuple(cursors.load(cursor, scope)) if cursor else None
            df, last = face_page(s, job_id, after=after, limit=limit, **selection)
        nxt = cursors.dump(scope, list(last)) if last else None
        # Built as text: pandas writes a page of rows as JSON far faster than a dict per row would be.
        items = df.drop(columns=["job"]).to_json(orient="records", double_precision=6)
        rest = json.dumps({"next_cursor": nxt, "video": video_json(job),
                           "job": {"id": job.id, "status": job.status, "partial": job.status not in ENDED}})
        body = '{"items":' + items + "," + rest[1:]
        return Response(body, media_type="application/json")

    @app.get("/v1/jobs/{job_id}/series", tags=["timelines"],
             summary="Each track's probabilities averaged over at most `points` time buckets (for charts)")
    def series(job_id: int, _who: Caller, points: Annotated[int, Query(ge=10, le=5000)] = 600) -> dict:
        from fervid.worker.store.query import downsampled_series

        with sessions() as s:
            return {"job": job_id, **downsampled_series(s, job_id, points)}

    @app.get("/v1/jobs/{job_id}/summary", tags=["timelines"])
    def summary(job_id: int, _who: Caller, window: Annotated[float, Query(gt=0)] = Options.window_s) -> dict:
        from fervid.worker.store.query import summary as query_summary

        return query_summary(job_id, db=sessions, window_s=window)

    @app.get("/v1/jobs/{job_id}/plot.png", tags=["timelines"], response_class=Response)
    def plot(job_id: int, _who: Caller, track: Annotated[int | None, Query(ge=0)] = None,
             smooth: Annotated[float | None, Query(gt=0)] = None) -> Response:  # fmt: skip
        from fervid.worker.render import plot as render_plot
        from fervid.worker.store.query import timeline

        df = timeline(job_id, track=track, smooth_s=smooth, db=sessions)
        if df.empty:
            raise FervidError(f"job {job_id} has no analysed frames yet: nothing to plot")
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "plot.png"
            render_plot(df, out, title=f"job {job_id}: {Path(df.attrs['path']).name}")
            return Response(out.read_bytes(), media_type="image/png")

    # ----------------------------------------------------------------------------------------- changing

    @app.post("/v1/jobs/{job_id}/cancel", tags=["jobs"])
    def cancel(job_id: int, _who: Caller) -> JSONResponse:
        with sessions() as s:
            before = load_job(s, job_id).status
        if runner:
            runner.cancelled.add(job_id)
        status = cancel_job(sessions, job_id)
        if before in ENDED:
            raise ApiError(409, "conflict", f"job {job_id} already ended ({status}): nothing to cancel")
        return JSONResponse(get_job(job_id, _who))

    @app.delete("/v1/jobs/{job_id}", tags=["jobs"])
    def remove(job_id: int, _who: Caller) -> dict:
        if runner:
            runner.cancelled.add(job_id)
        path = Path(delete_job(sessions, job_id))
        # An uploaded video goes with its job, unless another job analyses the same file.
        if path.is_relative_to(upload_dir):
            with sessions() as s:
                if s.scalar(select(Job.id).where(Job.path == str(path)).limit(1)) is None:
                    shutil.rmtree(path.parent, ignore_errors=True)
        return {"id": job_id, "deleted": True}

    # ---------------------------------------------------------------------------------------- the web page

    # The pages are shells (no data in them): their script reads the API with the token the user gives it.
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def jobs_page() -> HTMLResponse:
        options = "".join(f'<option value="{s.value}">{s.value}</option>' for s in Status)
        return page("fervid jobs", "jobs.html", fps=f"{default('sample_fps'):g}", status_options=options)

    @app.get("/jobs/{job_id}", response_class=HTMLResponse, include_in_schema=False)
    def job_page(job_id: int) -> HTMLResponse:
        from fervid.worker.store.schema import EMOTIONS

        return page(f"job {job_id}", "job.html", job_id=str(job_id), emotions=json.dumps(list(EMOTIONS)))

    return app


HERE = Path(__file__).resolve().parent


def page(title: str, template: str, **values: str) -> HTMLResponse:
    body = string.Template((HERE / "templates" / template).read_text()).substitute(values)
    html = string.Template((HERE / "templates" / "base.html").read_text()).substitute(title=html_escape(title),
                                                                                     body=body)  # fmt: skip
    return HTMLResponse(html)


def as_api_error(e: FervidError) -> ApiError:
    for kind, status, code in ERRORS:
        if isinstance(e, kind):
            return ApiError(status, code, str(e))
    return ApiError(400, "bad_request", str(e))


def _chain(first: Any, rest: Iterator) -> Iterator:
    yield first
    yield from rest


async def _receive_upload(request: Request, upload_dir: Path, limit: int) -> tuple[dict[str, str], list[Path]]:
    """Stream a multipart form's files to their own folders under `upload_dir` as they arrive (never whole in
    memory), its other fields as text. Over `limit` bytes: TooLarge, and nothing is left on disk."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise TooLarge(f"upload of {int(length):,} bytes is over the limit of {limit:,} (FERVID_MAX_UPLOAD_BYTES)")
    _, params = parse_options_header(request.headers["content-type"])
    boundary = params.get(b"boundary")
    if not boundary:
        raise FervidError("multipart upload without a boundary")
    fields: dict[str, str] = {}
    files: list[Path] = []
    part: dict = {}

    def on_part_begin() -> None:
        part.clear()
        part.update(headers={}, field=b"", value=b"", data=bytearray(), file=None)

    def on_header_field(data: bytes, start: int, end: int) -> None:
        part["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        part["value"] += data[start:end]

    def on_header_end() -> None:
        part["headers"][part["field"].decode("latin-1").lower()] = part["value"]
        part["field"] = part["value"] = b""

    def on_headers_finished() -> None:
        _, disp = parse_options_header(part["headers"].get("content-disposition", b""))
        part["name"] = disp.get(b"name", b"").decode()
        filename = disp.get(b"filename")
        if filename is not None:
            # Only the name's last component, and a folder of its own: names from clients never choose a path.
            safe = Path(filename.decode(errors="replace").replace("\\", "/")).name.lstrip(".") or "upload"
            folder = upload_dir / uuid.uuid4().hex
            folder.mkdir(parents=True)
            path = folder / safe[-200:]
            files.append(path)
            part["file"] = open(path, "wb")  # noqa: SIM115 - closed at the part's end

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if part["file"] is not None:
            part["file"].write(data[start:end])
        else:
            part["data"] += data[start:end]
            if len(part["data"]) > 64 * 1024:
                raise FervidError(f"form field {part['name']!r} is too long")

    def on_part_end() -> None:
        if part["file"] is not None:
            part["file"].close()
        else:
            fields[part["name"]] = part["data"].decode()

    parser = MultipartParser(boundary, {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_headers_finished": on_headers_finished, "on_part_data": on_part_data,
        "on_part_end": on_part_end})  # fmt: skip
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise TooLarge(f"upload is over the limit of {limit:,} bytes (FERVID_MAX_UPLOAD_BYTES)")
            parser.write(chunk)
        parser.finalize()
    except BaseException:
        if part.get("file") is not None:
            part["file"].close()
        for p in files:
            shutil.rmtree(p.parent, ignore_errors=True)
        raise
    return fields, files
