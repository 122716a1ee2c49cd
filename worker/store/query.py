"""Reading emotion timelines: per-track rows, smoothing and summaries, as pandas DataFrames and plain dicts.

The same functions serve the CLI (`fervid timeline|summary|plot`), notebooks (`from fervid import api`) and an
HTTP API; they return data only (plots and annotated videos: worker.render; files: worker.store.export).
Queries filter in SQL on the (job, time) and (job, track, time) indexes, and summaries aggregate in SQL, so
a job of a million faces is never loaded whole to answer them.

A result of a job that is still queued or running is partial, and says so the same way everywhere: its
metadata (a timeline's `df.attrs`, a summary's own keys) holds `job`, `path`, `status` and `partial`, and
`partial_note(result)` is the line to show beside it.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
from sqlalchemy import and_, case, func, select, text, tuple_
from sqlalchemy.orm import Session, sessionmaker

from fervid.errors import FervidError, NotFound
from fervid.worker.settings import SMOOTH_METHODS, Options
from fervid.worker.store.db import BINARY_ROWS, sessions_for
from fervid.worker.store.schema import ACTIVE, EMOTIONS, Face, Frame, Job, Segment, Status

# The columns of a timeline, and of every export of one (worker.store.export).
TIMELINE_COLUMNS = ["job", "frame", "time_s", "face", "track", "x1", "y1", "x2", "y2", "det_score", *EMOTIONS,
                    "emotion"]  # fmt: skip


def get_job(session: Session, job_id: int) -> Job:
    """The job, or a one-line FervidError: no such job, or it failed (with its reason: it has no result)."""
    job = session.get(Job, job_id)
    if job is None:
        raise NotFound(f"no job {job_id} in this database")
    if job.status == Status.FAILED:
        raise FervidError(f"job {job_id} ({job.path}) failed: {job.error}")
    return job


def result_meta(job: Job) -> dict:
    """What every query result carries about its job; `partial` while the job has not ended."""
    return {"job": job.id, "path": job.path, "status": job.status, "partial": job.status in ACTIVE}


def partial_note(result: pd.DataFrame | Mapping) -> str | None:
    """The line to show beside a result (a timeline or a summary) of a job still queued or running; None once the
    job has ended."""
    meta = result.attrs if isinstance(result, pd.DataFrame) else result
    if not meta.get("partial"):
        return None
    so_far = (f"the timeline so far ({meta['job_frames_analyzed']} frames)" if isinstance(result, pd.DataFrame)
              else "this summary covers what exists so far")  # fmt: skip
    return f"job {meta['job']} is still {meta['status']}: {so_far}"


def timeline(
    job_id: int,
    track: int | None = None,
    start_s: float | None = None,
    end_s: float | None = None,
    smooth_s: float | None = None,
    smooth_method: str = Options.smooth_method,
    db: str | sessionmaker | None = None,
) -> pd.DataFrame:
    """One row per face per analysed frame (frames without faces: one row with empty face fields, unless a
    track is asked for), in time order. `smooth_s` smooths each track's probabilities over that much video time:
    a centred moving average ("mean") or an exponential average with that half-life ("ema")."""
    with sessions_for(db)() as s:
        job = get_job(s, job_id)
        if track is not None:
            exists = s.scalar(select(Face.track).where(Face.job_id == job_id, Face.track == track).limit(1))
            if exists is None:
                n = s.scalar(select(func.count(func.distinct(Face.track))).where(Face.job_id == job_id))
                raise FervidError(f"job {job_id} has no track {track} (it has {n} tracks: 0..{max(n - 1, 0)})")
        face_cols = [Face.face, Face.track, Face.x1, Face.y1, Face.x2, Face.y2, Face.det_score,
                     *(getattr(Face, e) for e in EMOTIONS), Face.emotion]  # fmt: skip
        if track is None:
            q = (
                select(Frame.frame_index, Frame.time_ms, *face_cols)
                .outerjoin(Face, and_(Face.job_id == Frame.job_id, Face.frame_index == Frame.frame_index))
                .where(Frame.job_id == job_id)
            )
            t = Frame.time_ms
        else:
            q = select(Face.frame_index, Face.time_ms, *face_cols).where(Face.job_id == job_id, Face.track == track)
            t = Face.time_ms
        # Smoothing near the range's edges needs the frames just outside it; they are trimmed afterwards.
        pad = (smooth_s or 0) * (1 if smooth_method == "mean" else 5)
        if start_s is not None:
            q = q.where(t >= (start_s - pad) * 1000)
        if end_s is not None:
            q = q.where(t < (end_s + pad) * 1000)
        q = q.order_by(t, Face.face)
        df = pd.read_sql(q, s.connection())
    df = df.rename(columns={"frame_index": "frame"})
    df.insert(0, "job", job_id)
    df.insert(2, "time_s", df.pop("time_ms") / 1000)
    for c in ("face", "track"):
        df[c] = df[c].astype("Int64")
    if smooth_s:
        df = smooth(df, smooth_s, smooth_method)
        inside = (df["time_s"] >= (start_s if start_s is not None else -np.inf)) & (
            df["time_s"] < (end_s if end_s is not None else np.inf)
        )
        df = df[inside].reset_index(drop=True)
    if df.empty and (start_s is not None or end_s is not None):
        raise FervidError(f"job {job_id} has no analysed frames between {start_s or 0} s and {end_s or 'the end'}")
    df = df[TIMELINE_COLUMNS]
    # The job's own count, which a partial note quotes (it stays 0 until the job is finished).
    df.attrs.update(result_meta(job), job_frames_analyzed=job.frames_analyzed)
    return df


def smooth(df: pd.DataFrame, seconds: float, method: str = Options.smooth_method) -> pd.DataFrame:
    """Smooth the probabilities of each track over video time (not rows, so uneven sampling is handled)."""
    if method not in SMOOTH_METHODS:
        raise FervidError(f"unknown smoothing {method!r} ({' or '.join(SMOOTH_METHODS)})")
    if seconds <= 0:
        raise FervidError(f"--smooth must be positive, got {seconds}")
    df = df.copy()
    has = df["track"].notna()
    probs = list(EMOTIONS)
    for _, g in df[has].groupby("track"):
        times = pd.to_datetime(g["time_s"], unit="s")  # ewm needs datetimes, not timedeltas
        x = g[probs].set_index(times)
        if method == "mean":
            y = x.rolling(pd.Timedelta(seconds=seconds), center=True, min_periods=1).mean()
        else:
            y = x.ewm(halflife=pd.Timedelta(seconds=seconds), times=times).mean()
        df.loc[g.index, probs] = y.to_numpy()
    df.loc[has, "emotion"] = np.array(EMOTIONS)[df.loc[has, probs].to_numpy(dtype=float).argmax(1)]
    return df


def summary(job_id: int, db: str | sessionmaker | None = None, window_s: float = Options.window_s) -> dict:
    """The job's frames analysed (and how many had faces), and per track and for the whole video: time on screen,
    share of time per dominant emotion, mean probabilities, each emotion's peak (1-second means) and strongest
    rise, and the dominant emotion per window. `video` is None when no face was found."""
    with sessions_for(db)() as s:
        if s.bind.dialect.name == "postgresql":
            # Room to group a long job's seconds in memory rather than by an external sort on disk.
            s.execute(text("SET LOCAL work_mem = '64MB'"))
        job = get_job(s, job_id)
        interval_s = 1 / job.sample_fps if job.sample_fps else (1 / job.fps if job.fps else 0.0)
        probs = [getattr(Face, e) for e in EMOTIONS]
        per_track = pd.read_sql(
            select(Face.track, func.count().label("n"), func.min(Face.time_ms).label("first_ms"),
                   func.max(Face.time_ms).label("last_ms"), *(func.avg(p).label(p.key) for p in probs),
                   *(func.sum(case((Face.emotion == e, 1), else_=0)).label(f"n_{e}") for e in EMOTIONS))
            .where(Face.job_id == job_id).group_by(Face.track).order_by(Face.track),
            s.connection(),
        )  # fmt: skip
        second = func.floor(Face.time_ms / 1000).label("second")
        per_second = pd.read_sql(
            select(Face.track, second, func.count().label("n"), *(func.avg(p).label(p.key) for p in probs))
            .where(Face.job_id == job_id).group_by(Face.track, second).order_by(Face.track, second),
            s.connection(),
        )  # fmt: skip
        n_frames, with_faces = s.execute(
            select(func.count(), func.coalesce(func.sum(case((Frame.n_faces > 0, 1), else_=0)), 0))
            .where(Frame.job_id == job_id)
        ).one()  # fmt: skip

    def describe(rows: pd.DataFrame, seconds: pd.DataFrame) -> dict:
        n = int(rows["n"].sum())
        counts = {e: int(rows[f"n_{e}"].sum()) for e in EMOTIONS}
        mean = {e: float((rows[e] * rows["n"]).sum() / n) for e in EMOTIONS}
        # 1-second means, weighted by faces when several tracks share a second.
        weighted = seconds[list(EMOTIONS)].mul(seconds["n"], axis=0).groupby(seconds["second"]).sum()
        sec = weighted.div(seconds.groupby("second")["n"].sum(), axis=0)
        peaks = {e: {"time_s": float(sec[e].idxmax()), "probability": round(float(sec[e].max()), 4)} for e in EMOTIONS}
        rises = {}
        if len(sec) > 1:
            diff = sec.diff().iloc[1:]
            rises = {e: {"time_s": float(diff[e].idxmax()), "change": round(float(diff[e].max()), 4)} for e in EMOTIONS}
        per_window = sec.groupby((sec.index // window_s * window_s).astype(float)).mean().round(4)
        dominant = per_window.idxmax(axis=1)
        starts, means = per_window.index.tolist(), per_window.to_dict("records")
        windows = [{"from_s": w, "to_s": w + window_s, "dominant": dominant[w], "mean": m}
                   for w, m in zip(starts, means, strict=True)]  # fmt: skip
        return {
            "faces": n,
            "first_s": float(rows["first_ms"].min() / 1000),
            "last_s": float(rows["last_ms"].max() / 1000),
            "time_on_screen_s": round(n * interval_s, 3),
            "dominant_share": {e: round(c / n, 4) for e, c in counts.items()},
            "dominant": max(counts, key=counts.get),
            "mean": {e: round(v, 4) for e, v in mean.items()},
            "peaks": peaks,
            "strongest_rise": rises,
            "windows": windows,
        }

    result = result_meta(job) | {
        "duration_s": job.duration_s, "frames_analyzed": int(n_frames), "frames_with_faces": int(with_faces),
        "window_s": window_s, "tracks": {}, "video": None,
    }  # fmt: skip
    if len(per_track):
        for t in per_track["track"].dropna().astype(int):
            result["tracks"][int(t)] = describe(
                per_track[per_track["track"] == t], per_second[per_second["track"] == t]
            )
        result["video"] = describe(per_track, per_second)
    return result


# ------------------------------------------------------------------------------------------ pages (HTTP clients)

# A face row's key in time order: frame indices grow with time, and the (job, frame, face) primary key serves
# keyset pages without an OFFSET scan.
FaceKey = tuple[int, int]


def list_jobs(session: Session, status: str | None = None, tag: str | None = None, limit: int = 50,
              before_id: int | None = None) -> list[Job]:  # fmt: skip
    """Jobs newest first (by id), optionally of one status and tag, those older than `before_id` (a page's end)."""
    q = select(Job).order_by(Job.id.desc()).limit(limit)
    if status:
        q = q.where(Job.status == status)
    if tag:
        q = q.where(Job.tag == tag)
    if before_id is not None:
        q = q.where(Job.id < before_id)
    return list(session.scalars(q))


# What _face_select reads, in _face_frame's order.
_FACE_COLUMNS = [Face.frame_index, Face.time_ms, Face.face, Face.track, Face.x1, Face.y1, Face.x2, Face.y2,
                 Face.det_score, *(getattr(Face, e) for e in EMOTIONS), Face.emotion]  # fmt: skip


def _face_select(job_id: int, track: int | None, start_s: float | None, end_s: float | None):  # noqa: ANN202
    q = select(*_FACE_COLUMNS).where(Face.job_id == job_id)
    if track is not None:
        q = q.where(Face.track == track)
    if start_s is not None:
        q = q.where(Face.time_ms >= start_s * 1000)
    if end_s is not None:
        q = q.where(Face.time_ms < end_s * 1000)
    return q


def _face_frame(job_id: int, rows: list) -> pd.DataFrame:
    """Face rows of _face_select as a timeline's DataFrame, built column by column from typed arrays: pandas
    inspecting row objects one by one took a large share of an HTTP API page's time."""
    frame, time_ms, face, track, *boxes_probs, emotion = list(zip(*rows, strict=True)) or [()] * len(_FACE_COLUMNS)
    floats = ["x1", "y1", "x2", "y2", "det_score", *EMOTIONS]
    return pd.DataFrame({
        "job": np.full(len(rows), job_id, dtype=np.int64),
        "frame": np.array(frame, dtype=np.int64),
        "time_s": np.array(time_ms, dtype=np.float64) / 1000,
        "face": np.array(face, dtype=np.int64),
        "track": pd.array(track, dtype="Int64"),
        **{c: np.array(v, dtype=np.float64) for c, v in zip(floats, boxes_probs, strict=True)},
        "emotion": np.array(emotion, dtype=object),  # pandas infers its string dtype, as for any text column
    }, columns=TIMELINE_COLUMNS)  # fmt: skip


def face_rows(session: Session, q) -> list:  # noqa: ANN001
    """The rows of a face query, in the driver's binary format where it has one (PostgreSQL)."""
    return session.connection().execute(q.execution_options(**{BINARY_ROWS: True})).all()


def face_page(
    session: Session,
    job_id: int,
    track: int | None = None,
    start_s: float | None = None,
    end_s: float | None = None,
    smooth_s: float | None = None,
    smooth_method: str = Options.smooth_method,
    after: FaceKey | None = None,
    limit: int = 1000,
) -> tuple[pd.DataFrame, FaceKey | None]:
    """One page of a job's face rows in time order (the timeline's columns; frames without faces are not rows
    here), after the key `after`, and the key to ask the next page after (None: this was the last). Smoothing
    reads the rows of the page's time span widened by the smoothing window, so pages agree with a whole timeline
    smoothed at once."""
    job = get_job(session, job_id)
    if track is not None and session.scalar(
        select(Face.track).where(Face.job_id == job_id, Face.track == track).limit(1)
    ) is None:
        raise NotFound(f"job {job_id} has no track {track}")
    q = _face_select(job_id, track, start_s, end_s)
    if after is not None:
        q = q.where(tuple_(Face.frame_index, Face.face) > tuple_(*after))
    rows = face_rows(session, q.order_by(Face.frame_index, Face.face).limit(limit + 1))
    more = len(rows) > limit
    df = _face_frame(job_id, rows[:limit])
    if smooth_s and len(df):
        pad = smooth_s * (1 if smooth_method == "mean" else 5)
        lo, hi = df["time_s"].min() - pad, df["time_s"].max() + pad
        ctx = _face_frame(job_id, face_rows(session, _face_select(job_id, track, lo, hi + 1e-6)
                                            .order_by(Face.frame_index, Face.face)))  # fmt: skip
        ctx = smooth(ctx, smooth_s, smooth_method).set_index(["frame", "face"])
        df = ctx.loc[list(zip(df["frame"], df["face"], strict=True))].reset_index()[TIMELINE_COLUMNS]
    df.attrs.update(result_meta(job))
    last = (int(df["frame"].iloc[-1]), int(df["face"].iloc[-1])) if more else None
    return df, last


def iter_face_pages(sessions: sessionmaker, job_id: int, page: int = 50_000, **selection: object):
    """Every face row of a selection (face_page's arguments), as DataFrames of up to `page` rows, each read in a
    short transaction of its own: a download of millions of rows never holds them all, nor a long transaction."""
    after = None
    while True:
        with sessions() as s:
            df, after = face_page(s, job_id, after=after, limit=page, **selection)
        yield df
        if after is None:
            return


def downsampled_series(session: Session, job_id: int, points: int = 600) -> dict:
    """Each track's mean probabilities per time bucket, at most `points` buckets over the job's span: what a chart
    draws, whatever the video's length, aggregated in SQL."""
    job = get_job(session, job_id)
    lo, hi = session.execute(select(func.min(Face.time_ms), func.max(Face.time_ms)).where(Face.job_id == job_id)).one()
    if lo is None:
        return {"bucket_s": None, "tracks": {}}
    bucket_ms = max((hi - lo) / max(points - 1, 1), 1000 / (job.sample_fps or job.fps or 30.0))
    bucket = func.floor((Face.time_ms - lo) / bucket_ms).label("bucket")
    q = (select(Face.track, bucket, *(func.avg(getattr(Face, e)).label(e) for e in EMOTIONS))
         .where(Face.job_id == job_id, Face.track.is_not(None)).group_by(Face.track, bucket)
         .order_by(Face.track, bucket))  # fmt: skip
    tracks: dict[int, dict] = {}
    for row in session.execute(q):
        t = tracks.setdefault(int(row.track), {"time_s": [], **{e: [] for e in EMOTIONS}})
        t["time_s"].append(round((lo + float(row.bucket) * bucket_ms) / 1000, 3))
        for e in EMOTIONS:
            t[e].append(round(float(getattr(row, e)), 4))
    return {"bucket_s": round(bucket_ms / 1000, 4), "tracks": tracks}


def queue_metrics(session: Session, window_s: float = 60.0, seen_s: float = 300.0) -> dict:
    """Counts for monitoring: jobs by status, segments waiting, segments and faces finished per second over the
    last `window_s`, and the worker processes that ran a segment in the last `seen_s` (or run one now)."""
    import datetime as dt

    now = dt.datetime.now(dt.UTC)
    by_status = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
    depth = session.scalar(select(func.count()).select_from(Segment).join(Job, Job.id == Segment.job_id)
                           .where(Segment.status == Status.QUEUED, Job.status.in_(ACTIVE)))  # fmt: skip
    since = now - dt.timedelta(seconds=window_s)
    finished = select(func.count(), func.coalesce(func.sum(Segment.faces), 0))
    n_seg, n_faces = session.execute(finished.where(Segment.status == Status.DONE, Segment.finished_at >= since)).one()
    seen = now - dt.timedelta(seconds=seen_s)
    workers = session.scalar(select(func.count(func.distinct(Segment.worker))).where(
        (Segment.status == Status.RUNNING) | (Segment.started_at >= seen) | (Segment.finished_at >= seen)))  # fmt: skip
    return {
        "jobs": {s.value: int(by_status.get(s.value, 0)) for s in Status},
        "queue_depth": int(depth or 0),
        "segments_per_second": n_seg / window_s,
        "faces_per_second": float(n_faces) / window_s,
        "workers_seen": int(workers or 0),
    }
