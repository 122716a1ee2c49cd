"""Pictures of a job: its emotions over time as a plot, and its video with each face's box, track and emotion
drawn on. Above both the store (the rows) and the pipeline (the video's frames), which know nothing of it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sqlalchemy.orm import sessionmaker

from fervid.errors import FervidError
from fervid.worker.store.query import timeline
from fervid.worker.store.schema import EMOTIONS


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
    # Here, not at the top: plots and notebooks (fervid.api) need neither OpenCV nor the decoder.
    import cv2

    from fervid.worker.pipeline.video import iter_frames, probe

    df = timeline(job_id, db=db)
    path = df.attrs["path"]
    info = probe(path)
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
    for index, _t, frame in iter_frames(path, sample_fps=0):
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
