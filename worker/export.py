"""`fervid analyze` exports: the timeline as CSV and JSON (with the job's metadata), and the short summary."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from fervid.worker.schema import EMOTIONS, Job

CSV_COLUMNS = ["job", "frame", "time_s", "face", "x1", "y1", "x2", "y2", "det_score", *EMOTIONS, "emotion"]
ROUNDING = {"time_s": 4, "x1": 1, "y1": 1, "x2": 1, "y2": 1, "det_score": 4} | {e: 5 for e in EMOTIONS}


def export_frame(df: pd.DataFrame) -> pd.DataFrame:
    """The timeline in the CSV's columns and precision."""
    return df[CSV_COLUMNS].round(ROUNDING)


def job_metadata(job: Job) -> dict:
    keys = ["id", "path", "size_bytes", "sha256", "status", "error", "duration_s", "fps", "frame_count", "width",
            "height", "codec", "sample_fps", "start_s", "end_s", "model", "model_sha256", "detector",
            "frames_analyzed", "faces_found", "timings", "worker"]  # fmt: skip
    meta = {k: getattr(job, k) for k in keys}
    for k in ("created_at", "started_at", "finished_at"):
        v = getattr(job, k)
        meta[k] = v.isoformat() if v else None
    return meta


def write_csv(df: pd.DataFrame, path: str | Path) -> None:
    export_frame(df).to_csv(path, index=False)


def write_json(jobs: list[tuple[Job, pd.DataFrame]], path: str | Path) -> None:
    doc = {"jobs": [{**job_metadata(job), "rows": json.loads(export_frame(df).to_json(orient="records"))}
                    for job, df in jobs]}  # fmt: skip
    Path(path).write_text(json.dumps(doc, indent=1))


def summarize(df: pd.DataFrame) -> dict:
    """Frames analysed, faces found, and each emotion's share of the face observations."""
    faces = df[df["face"].notna()]
    share = faces["emotion"].value_counts(normalize=True).to_dict() if len(faces) else {}
    return {
        "frames_analyzed": int(df["frame"].nunique()),
        "frames_with_faces": int(faces["frame"].nunique()),
        "faces_found": len(faces),
        "emotion_share": {e: float(share.get(e, 0.0)) for e in EMOTIONS},
    }
