"""Reading emotion timelines: per-track rows, smoothing, summaries and plots, as pandas DataFrames.

The same functions serve the CLI (`fervid timeline|summary|plot`) and notebooks (`from fervid import api`).
Queries filter in SQL on the (job, time) and (job, track, time) indexes, and summaries aggregate in SQL, so
a job of a million faces is never loaded whole to answer them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sqlalchemy import and_, case, func, select, text
from sqlalchemy.orm import Session, sessionmaker

from fervid.errors import FervidError
from fervid.worker.db import database_url, open_database
from fervid.worker.schema import EMOTIONS, Face, Frame, Job

TIMELINE_COLUMNS = ["job", "frame", "time_s", "face", "track", "x1", "y1", "x2", "y2", "det_score", *EMOTIONS,
                    "emotion"]  # fmt: skip


@dataclass
class JobView:
    """A job as queries see it: partial while running; a failed job is an error, with its reason."""

    job: Job
    partial: bool

    @property
    def note(self) -> str | None:
        if self.partial:
            return (
                f"job {self.job.id} is still {self.job.status}: the timeline so far ({self.job.frames_analyzed} frames)"
            )
        return None


@functools.lru_cache(maxsize=8)
def _open_cached(url: str) -> sessionmaker:
    return open_database(url)


def _sessions(db: str | sessionmaker | None) -> sessionmaker:
    """A session factory; URLs are opened (and migrated) once per process, so repeated notebook calls are quick."""
    return db if isinstance(db, sessionmaker) else _open_cached(database_url(db))


def get_job(session: Session, job_id: int, allow_failed: bool = False) -> JobView:
    job = session.get(Job, job_id)
    if job is None:
        raise FervidError(f"no job {job_id} in this database")
    if job.status == "failed" and not allow_failed:
        raise FervidError(f"job {job_id} ({job.path}) failed: {job.error}")
    return JobView(job, partial=job.status in ("queued", "running"))


def timeline(
    job_id: int,
    track: int | None = None,
    start_s: float | None = None,
    end_s: float | None = None,
    smooth_s: float | None = None,
    smooth_method: str = "mean",
    db: str | sessionmaker | None = None,
) -> pd.DataFrame:
    """One row per face per analysed frame (frames without faces: one row with empty face fields, unless a
    track is asked for), in time order. `smooth_s` smooths each track's probabilities over that much video time:
    a centred moving average ("mean") or an exponential average with that half-life ("ema")."""
    sessions = _sessions(db)
    with sessions() as s:
        view = get_job(s, job_id)
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
    df.attrs.update(note=view.note, path=view.job.path)
    return df


def smooth(df: pd.DataFrame, seconds: float, method: str = "mean") -> pd.DataFrame:
    """Smooth the probabilities of each track over video time (not rows, so uneven sampling is handled)."""
    if method not in ("mean", "ema"):
        raise FervidError(f"unknown smoothing {method!r} (mean or ema)")
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


def summary(job_id: int, db: str | sessionmaker | None = None, window_s: float = 5.0) -> dict:
    """Per track and for the whole video: time on screen, share of time per dominant emotion, mean
    probabilities, each emotion's peak (1-second means) and strongest rise, and the dominant emotion per window."""
    sessions = _sessions(db)
    with sessions() as s:
        if s.bind.dialect.name == "postgresql":
            # Room to group a long job's seconds in memory rather than by an external sort on disk.
            s.execute(text("SET LOCAL work_mem = '64MB'"))
        view = get_job(s, job_id)
        job = view.job
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
        n_frames = s.scalar(select(func.count()).select_from(Frame).where(Frame.job_id == job_id))

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

    result = {
        "job": job_id, "path": job.path, "status": job.status, "partial": view.partial,
        "duration_s": job.duration_s, "frames_analyzed": int(n_frames), "window_s": window_s,
        "tracks": {}, "video": None,
    }  # fmt: skip
    if len(per_track):
        for t in per_track["track"].dropna().astype(int):
            result["tracks"][int(t)] = describe(
                per_track[per_track["track"] == t], per_second[per_second["track"] == t]
            )
        result["video"] = describe(per_track, per_second)
    return result


def plot(df: pd.DataFrame, path: str | Path, title: str = "") -> None:
    """Stacked emotion probabilities over time, one panel per track, time in mm:ss, gaps where no face."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    tracks = sorted(df["track"].dropna().unique().tolist()) or [None]
    times = np.sort(df["time_s"].unique())
    fig, axes = plt.subplots(len(tracks), 1, figsize=(11, 2.4 * len(tracks) + 1.0), sharex=True, squeeze=False)
    colors = ["#d62728", "#8c564b", "#9467bd", "#2ca02c", "#1f77b4", "#ff7f0e", "#7f7f7f"]
    labels = [e.capitalize() for e in EMOTIONS]
    for ax, tr in zip(axes[:, 0], tracks, strict=True):
        rows = df[df["track"] == tr].drop_duplicates("time_s").set_index("time_s") if tr is not None else df.iloc[:0]
        probs = rows.reindex(times)[list(EMOTIONS)].to_numpy(dtype=float)
        ax.stackplot(times, np.nan_to_num(probs).T, labels=labels, colors=colors, linewidth=0)
        missing = np.isnan(probs[:, 0])
        if missing.any():
            ax.fill_between(times, 0, 1, where=missing, color="0.88", step="mid", label="no face", linewidth=0)
        ax.set_ylim(0, 1)
        ax.set_ylabel(f"track {tr}" if tr is not None else "no faces")
        ax.margins(x=0)
    axes[-1, 0].set_xlabel("time (mm:ss)")
    axes[-1, 0].xaxis.set_major_locator(MaxNLocator(nbins=12, integer=True))  # whole seconds: mm:ss never repeats
    axes[-1, 0].xaxis.set_major_formatter(FuncFormatter(lambda s, _: f"{int(s // 60):02d}:{int(s % 60):02d}"))
    handles, names = axes[0, 0].get_legend_handles_labels()
    h = fig.get_figheight()  # title and legend take a fixed height (inches) whatever the number of panels
    if title:
        fig.text(0.01, 1 - 0.05 / h, title, fontsize=9, va="top")
    fig.legend(handles, names, loc="upper center", ncol=8, frameon=False, bbox_to_anchor=(0.5, 1 - 0.2 / h))
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.55 / h))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def annotate_video(job_id: int, out: str | Path, db: str | sessionmaker | None = None) -> int:
    """Write the job's video with each face's box, track id and top emotion drawn on; returns frames written.

    Frames between analysed ones carry the last analysed frame's faces, so labels do not flicker."""
    import cv2

    from fervid.worker.video import iter_frames, probe

    df = timeline(job_id, db=db)
    with _sessions(db)() as s:
        job = get_job(s, job_id).job
    info = probe(job.path)
    by_frame = {f: g for f, g in df[df["face"].notna()].groupby("frame")}
    analysed = sorted(df["frame"].unique())
    fps = info.fps or 25.0
    writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"mp4v"), fps, (info.width, info.height))
    if not writer.isOpened():
        raise FervidError(f"{out}: cannot write a video there")
    colors = [(66, 135, 245), (80, 200, 120), (245, 130, 48), (200, 80, 200), (60, 200, 230), (230, 60, 60)]
    current = None
    nxt = 0
    written = 0
    for index, _t, frame in iter_frames(job.path, sample_fps=0):
        while nxt < len(analysed) and analysed[nxt] <= index:
            current = by_frame.get(analysed[nxt])
            nxt += 1
        if current is not None and index <= analysed[-1]:
            for r in current.itertuples():
                c = colors[int(r.track) % len(colors)] if pd.notna(r.track) else (255, 255, 255)
                p1, p2 = (int(r.x1), int(r.y1)), (int(r.x2), int(r.y2))
                cv2.rectangle(frame, p1, p2, c, 2)
                label = f"#{r.track} {r.emotion} {getattr(r, r.emotion):.2f}"
                (tw, th), _ = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, 0.55, 1)
                cv2.rectangle(frame, (p1[0], p1[1] - th - 8), (p1[0] + tw + 6, p1[1]), c, -1)
                cv2.putText(frame, label, (p1[0] + 3, p1[1] - 5), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 1,
                            cv2.LINE_AA)  # fmt: skip
        writer.write(frame)
        written += 1
    writer.release()
    return written
