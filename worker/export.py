"""Reading a job's timeline back: rows for CSV/JSON, the per-video summary, and the plot."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from sqlalchemy import and_, select
from sqlalchemy.orm import Session

from worker.schema import EMOTIONS, Face, Frame, Job

CSV_COLUMNS = ["job", "frame", "time_s", "face", "x1", "y1", "x2", "y2", "det_score", *EMOTIONS, "emotion"]


def timeline_rows(session: Session, job_id: int) -> list[dict]:
    """One row per face per analysed frame; a frame without faces is one row with empty face fields."""
    q = (
        select(Frame.frame_index, Frame.time_ms, Face)
        .outerjoin(Face, and_(Face.job_id == Frame.job_id, Face.frame_index == Frame.frame_index))
        .where(Frame.job_id == job_id)
        .order_by(Frame.frame_index, Face.face)
    )
    rows = []
    for frame_index, time_ms, face in session.execute(q):
        row = {"job": job_id, "frame": frame_index, "time_s": round(time_ms / 1000, 4)}
        if face is None:
            row.update({c: None for c in CSV_COLUMNS[3:]})
        else:
            row.update(face=face.face, x1=round(face.x1, 1), y1=round(face.y1, 1), x2=round(face.x2, 1),
                       y2=round(face.y2, 1), det_score=round(face.det_score, 4), emotion=face.emotion)  # fmt: skip
            row.update({e: round(getattr(face, e), 5) for e in EMOTIONS})
        rows.append(row)
    return rows


def job_metadata(job: Job) -> dict:
    keys = ["id", "path", "size_bytes", "sha256", "status", "error", "duration_s", "fps", "frame_count", "width",
            "height", "codec", "sample_fps", "start_s", "end_s", "model", "model_sha256", "detector",
            "frames_analyzed", "faces_found", "timings", "worker"]  # fmt: skip
    meta = {k: getattr(job, k) for k in keys}
    for k in ("created_at", "started_at", "finished_at"):
        v = getattr(job, k)
        meta[k] = v.isoformat() if v else None
    return meta


def write_csv(rows: list[dict], path: str | Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        w.writerows(rows)


def write_json(jobs: list[tuple[Job, list[dict]]], path: str | Path) -> None:
    doc = {"jobs": [{**job_metadata(job), "rows": rows} for job, rows in jobs]}
    Path(path).write_text(json.dumps(doc, indent=1))


def summarize(job: Job, rows: list[dict]) -> dict:
    """Duration, frames analysed, faces found, and each emotion's share of the face observations."""
    faces = [r for r in rows if r["face"] is not None]
    share = {e: 0.0 for e in EMOTIONS}
    for r in faces:
        share[r["emotion"]] += 1 / len(faces)
    return {
        "job": job.id,
        "path": job.path,
        "status": job.status,
        "error": job.error,
        "duration_s": job.duration_s,
        "frames_analyzed": len({r["frame"] for r in rows}),
        "frames_with_faces": len({r["frame"] for r in faces}),
        "faces_found": len(faces),
        "emotion_share": share,
    }


def plot_timeline(job: Job, rows: list[dict], path: str | Path) -> None:
    """Emotion probabilities over time, one panel per face index (stacked areas; gaps where no face)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    frames = sorted({(r["frame"], r["time_s"]) for r in rows})
    face_ids = sorted({r["face"] for r in rows if r["face"] is not None}) or [0]
    fig, axes = plt.subplots(len(face_ids), 1, figsize=(11, 2.6 * len(face_ids) + 0.8), sharex=True, squeeze=False)
    colors = plt.get_cmap("tab10").colors
    by_key = {(r["frame"], r["face"]): r for r in rows if r["face"] is not None}
    t = np.array([ts for _, ts in frames])
    for ax, fid in zip(axes[:, 0], face_ids, strict=True):
        probs = np.array([[by_key[(fi, fid)][e] if (fi, fid) in by_key else np.nan for e in EMOTIONS]
                          for fi, _ in frames]).reshape(len(frames), len(EMOTIONS))  # fmt: skip
        ax.stackplot(t, np.nan_to_num(probs).T, labels=[e.capitalize() for e in EMOTIONS], colors=colors[:7],
                     alpha=0.9)  # fmt: skip
        missing = np.isnan(probs[:, 0])
        if missing.any():
            ax.fill_between(t, 0, 1, where=missing, color="0.85", step="mid", label="no face")
        ax.set_ylim(0, 1)
        ax.set_ylabel(f"face {fid}" if len(face_ids) > 1 else "probability")
        ax.margins(x=0)
    axes[-1, 0].set_xlabel("time (mm:ss)")
    axes[-1, 0].xaxis.set_major_formatter(
        matplotlib.ticker.FuncFormatter(lambda s, _: f"{int(s // 60)}:{s % 60:04.1f}")
    )
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=8, frameon=False)
    fig.suptitle(Path(job.path).name, y=0.995, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=110)
    plt.close(fig)
