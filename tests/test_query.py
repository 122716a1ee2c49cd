"""Querying timelines as a user would: `fervid timeline|summary|plot` and the pandas API."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from fervid import api
from fervid.worker.queue.jobs import analyze_video
from fervid.worker.settings import Settings
from fervid.worker.store.db import open_database
from fervid.worker.store.export import CSV_COLUMNS
from fervid.worker.store.schema import EMOTIONS, Face, Frame, Job, Status
from tests.conftest import ffmpeg, run_cli, shared_path


@pytest.fixture(scope="module")
def db(tmp_path_factory, analyzer):
    """A database holding a real two-person job, and synthetic running and failed jobs."""
    tmp = tmp_path_factory.mktemp("query")
    url = f"sqlite:///{tmp / 'q.db'}"
    sessions = open_database(url)
    two = tmp / "two.mp4"
    ffmpeg("-i", str(shared_path("videos", "pyfeat_single_face.mp4")),
           "-i", str(shared_path("videos", "pyfeat_WolfgangLanger_Pexels.mp4")),
           "-filter_complex", "[1:v][0:v]hstack=inputs=2:shortest=1", "-c:v", "libx264", "-preset", "ultrafast",
           str(two))  # fmt: skip
    job = analyze_video(two, Settings(sample_fps=10), sessions, analyzer)
    assert job.status == Status.DONE
    with sessions.begin() as s:
        common = dict(size_bytes=1, sha256="0" * 64, sample_fps=4.0, model="small", model_sha256="x", detector="d")
        running = Job(job_key="running", path="/v/running.mp4", status=Status.RUNNING, frames_analyzed=3, **common)
        failed = Job(job_key="failed", path="/v/bad.mp4", status=Status.FAILED, error="/v/bad.mp4: not a video",
                     **common)  # fmt: skip
        s.add_all([running, failed])
        s.flush()
        # Uneven sampling: frames at 0, 0.1, 0.2 and 3.0 s; happy jumps from 0 to 1 at 0.2 s.
        for i, (t, happy) in enumerate([(0, 0.0), (100, 0.0), (200, 1.0), (3000, 1.0)]):
            s.add(Frame(job_id=running.id, frame_index=i, time_ms=t, n_faces=1))
            probs = {e: 0.0 for e in EMOTIONS} | {"happy": happy, "neutral": 1 - happy}
            s.add(
                Face(
                    job_id=running.id,
                    frame_index=i,
                    face=0,
                    track=0,
                    time_ms=t,
                    x1=0,
                    y1=0,
                    x2=10,
                    y2=10,
                    det_score=0.99,
                    landmarks=[[0, 0]] * 5,
                    emotion="happy" if happy else "neutral",
                    **probs,
                )
            )
    return {"url": url, "two": job.id, "running": running.id, "failed": failed.id}


def cli(db, *args):
    return run_cli(*args, "--db", db["url"])


def test_each_person_keeps_one_track(db):
    df = api.timeline(db["two"], db=db["url"])
    faces = df[df["face"].notna()]
    assert faces.groupby("frame").size().eq(2).all()  # both people in every frame
    left = faces[faces["x2"] < 640]
    right = faces[faces["x1"] > 640]
    assert len(left) + len(right) == len(faces)
    assert left["track"].nunique() == 1 and right["track"].nunique() == 1
    assert set(faces["track"]) == {0, 1}


def test_timeline_formats(db, tmp_path):
    proc = cli(db, "timeline", str(db["two"]), "--format", "csv", "--out", str(tmp_path / "t.csv"))
    assert proc.returncode == 0, proc.stderr
    csv_df = pd.read_csv(tmp_path / "t.csv")
    assert list(csv_df.columns) == CSV_COLUMNS[:4] + ["track"] + CSV_COLUMNS[4:]
    proc = cli(db, "timeline", str(db["two"]), "--format", "json", "--track", "1", "--from", "1", "--to", "2")
    rows = json.loads(proc.stdout)
    assert rows and {r["track"] for r in rows} == {1} and all(1 <= r["time_s"] < 2 for r in rows)
    proc = cli(db, "timeline", str(db["two"]), "--format", "parquet", "--out", str(tmp_path / "t.parquet"))
    assert proc.returncode == 0, proc.stderr
    pq = pd.read_parquet(tmp_path / "t.parquet")
    assert len(pq) == len(csv_df) and list(pq.columns) == list(csv_df.columns)
    table = cli(db, "timeline", str(db["two"]), "--to", "0.5").stdout
    assert table.splitlines()[0].split()[:5] == ["job", "frame", "time_s", "face", "track"]


def test_smoothing_is_over_time_not_rows(db):
    df = api.timeline(db["running"], smooth_s=0.5, db=db["url"])
    # Centred 0.5 s window: the frames at 0, 0.1 and 0.2 s each average those three (happy 1/3); the lone frame
    # at 3 s keeps 1. Three rows centred on the row would give 2/3 at 0.2 s instead.
    assert np.allclose(df["happy"], [1 / 3, 1 / 3, 1 / 3, 1.0])
    ema = api.timeline(db["running"], smooth_s=0.5, smooth_method="ema", db=db["url"])
    # Exponential weights halve every 0.5 s of video time: at 0.2 s, weights 2^-0.4, 2^-0.2 and 1 for 0, 0, 1.
    assert ema["happy"].iloc[1] == 0.0
    assert ema["happy"].iloc[2] == pytest.approx(1 / (1 + 2**-0.2 + 2**-0.4))
    assert ema["happy"].iloc[3] > 0.95
    assert (ema["emotion"] == np.array(EMOTIONS)[ema[list(EMOTIONS)].to_numpy().argmax(1)]).all()


def test_summary(db):
    proc = cli(db, "summary", str(db["two"]), "--format", "json")
    s = json.loads(proc.stdout)
    assert set(s["tracks"]) == {"0", "1"}
    for t in s["tracks"].values():
        assert abs(sum(t["dominant_share"].values()) - 1) < 1e-3 and abs(sum(t["mean"].values()) - 1) < 1e-3
        assert t["time_on_screen_s"] == pytest.approx(t["faces"] / 10)
        assert set(t["peaks"]) == set(EMOTIONS) and t["windows"]
    assert s["video"]["faces"] == sum(t["faces"] for t in s["tracks"].values())
    assert s["frames_with_faces"] == s["frames_analyzed"] > 0  # both people in every frame
    text = cli(db, "summary", str(db["two"])).stdout
    assert "track 0" in text and "track 1" in text and "dominant" in text and "peaks" in text


def test_plot_and_annotated_video(db, tmp_path):
    import cv2

    proc = cli(db, "plot", str(db["two"]), "--out", str(tmp_path / "p.png"), "--annotate-video",
               str(tmp_path / "a.mp4"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    cap = cv2.VideoCapture(str(tmp_path / "a.mp4"))
    assert cap.get(cv2.CAP_PROP_FRAME_WIDTH) == 1280 and cap.get(cv2.CAP_PROP_FRAME_COUNT) >= 70


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["timeline", "999"], "no job 999"),
        (["summary", "999"], "no job 999"),
        (["timeline", "{failed}"], "failed: /v/bad.mp4: not a video"),
        (["timeline", "{two}", "--track", "7"], "has no track 7"),
        (["timeline", "{two}", "--from", "50", "--to", "60"], "no analysed frames between 50"),
        (["plot", "999", "--out", "x.png"], "no job 999"),
    ],
)
def test_bad_requests_get_one_clear_line(db, args, needle):
    proc = cli(db, *[a.format(**db) for a in args])
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_running_job_shows_partial_timeline(db):
    proc = cli(db, "timeline", str(db["running"]), "--format", "csv")
    assert proc.returncode == 0 and "still running" in proc.stderr
    assert len(proc.stdout.strip().splitlines()) == 5
    assert "still running" in cli(db, "summary", str(db["running"])).stderr
    # Timelines and summaries mark a partial result the same way, and say so in one line.
    df, summ = api.timeline(db["running"], db=db["url"]), api.summary(db["running"], db=db["url"])
    for result in (df.attrs, summ):
        assert (result["job"], result["status"], result["partial"]) == (db["running"], Status.RUNNING, True)
    assert api.partial_note(df) == f"job {db['running']} is still running: the timeline so far (3 frames)"
    assert api.partial_note(summ) == f"job {db['running']} is still running: this summary covers what exists so far"
    done = api.timeline(db["two"], db=db["url"])
    assert done.attrs["partial"] is False and api.partial_note(done) is None
    assert api.partial_note(api.summary(db["two"], db=db["url"])) is None


def test_smoothing_a_range_uses_the_frames_around_it(db):
    whole = api.timeline(db["two"], smooth_s=1.0, db=db["url"])
    part = api.timeline(db["two"], start_s=1.0, end_s=1.5, smooth_s=1.0, db=db["url"])
    want = whole[(whole["time_s"] >= 1.0) & (whole["time_s"] < 1.5)].reset_index(drop=True)
    assert len(part) == 10
    pd.testing.assert_frame_equal(part, want, check_dtype=False)
