"""fervid from Python (notebooks): emotion timelines as pandas DataFrames.

    from fervid import api
    df = api.timeline(3, smooth_s=1.0)        # one row per face per analysed frame, with track ids
    s = api.summary(3)                         # per track and whole video
    api.plot(api.timeline(3), "job3.png")

Each function takes `db=` (a SQLAlchemy URL); the default is FERVID_DATABASE_URL, else the embedded SQLite file.
"""

from fervid.worker.query import annotate_video, plot, smooth, summary, timeline

__all__ = ["annotate_video", "plot", "smooth", "summary", "timeline"]
