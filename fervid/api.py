"""fervid from Python (notebooks): emotion timelines as pandas DataFrames.

    from fervid import api
    df = api.timeline(3, smooth_s=1.0)        # one row per face per analysed frame, with track ids
    s = api.summary(3)                         # per track and whole video
    api.plot(api.timeline(3), "job3.png")
    api.partial_note(df)                       # "job 3 is still running: ..." while it runs, else None

Each function takes `db=` (a SQLAlchemy URL); the default is FERVID_DATABASE_URL, else the embedded SQLite file.
"""

from fervid.worker.render import annotate_video, plot
from fervid.worker.store.query import partial_note, smooth, summary, timeline

__all__ = ["annotate_video", "partial_note", "plot", "smooth", "summary", "timeline"]
