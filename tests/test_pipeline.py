"""The video pipeline end to end on real clips: timeline rows, exports, reruns, odd and broken inputs."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, inspect, select

from fervid.worker.queue.jobs import analyze_video
from fervid.worker.settings import Settings
from fervid.worker.store.db import make_engine, migrate, open_database
from fervid.worker.store.export import CSV_COLUMNS
from fervid.worker.store.query import timeline
from fervid.worker.store.schema import EMOTIONS, Job, Status
from tests.conftest import ffmpeg, row_counts, run_cli, shared_path


@pytest.fixture
def sessions(tmp_path):
    return open_database(f"sqlite:///{tmp_path / 't.db'}")


def clip(name: str) -> Path:
    return shared_path("videos", name)


def _rows(sessions, job_id) -> list[dict]:
    df = timeline(job_id, db=sessions).astype(object)
    return df.where(df.notna(), None).to_dict("records")


def test_analyze_cli_writes_csv_json_and_plot(tmp_path):
    out = tmp_path
    db = f"sqlite:///{out / 'db.sqlite'}"
    proc = run_cli("analyze", str(clip("pyfeat_single_face.mp4")), "--fps", "10", "--db", db,
                   "--csv", str(out / "t.csv"), "--json", str(out / "t.json"), "--plot", str(out / "t.png"),
                   check=True)  # fmt: skip
    assert "frames analysed" in proc.stdout and "emotions:" in proc.stdout and str(out / "t.png") in proc.stdout
    with open(out / "t.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == CSV_COLUMNS
    assert len(rows) == 24  # 2.4 s at 10 fps, one face in each frame
    assert all(r["face"] == "0" for r in rows)
    for r in rows:
        probs = [float(r[e]) for e in EMOTIONS]
        assert abs(sum(probs) - 1) < 1e-3 and r["emotion"] == EMOTIONS[int(np.argmax(probs))]
    times = [float(r["time_s"]) for r in rows]
    assert times == sorted(times) and times[0] == 0.0 and abs(times[1] - 0.1) < 0.02
    doc = json.loads((out / "t.json").read_text())
    job = doc["jobs"][0]
    assert job["status"] == Status.DONE and job["width"] == 640 and job["height"] == 360 and len(job["rows"]) == 24
    assert job["model"] == "medium-distilled" and job["detector"].startswith("retinaface")
    assert set(job["timings"]) >= {"decode", "detect", "crop", "classify", "write", "total"}
    assert (out / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerun_replaces_rows(sessions, analyzer):
    settings = Settings(sample_fps=5)
    first = analyze_video(clip("pyfeat_single_face.mp4"), settings, sessions, analyzer)
    n_frames, n_faces = row_counts(sessions, first.id)
    assert first.status == Status.DONE and n_frames == 12 and n_faces == 12
    again = analyze_video(clip("pyfeat_single_face.mp4"), settings, sessions, analyzer)
    assert again.id == first.id
    assert row_counts(sessions, first.id) == (n_frames, n_faces)
    other = analyze_video(clip("pyfeat_single_face.mp4"), Settings(sample_fps=2), sessions, analyzer)
    assert other.id != first.id and row_counts(sessions, other.id)[0] == 5
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 2


def test_noface_then_face_hevc(sessions, analyzer):
    job = analyze_video(clip("pyfeat_noface_face.mov"), Settings(sample_fps=5), sessions, analyzer)
    assert job.status == Status.DONE and job.codec == "hevc"
    rows = _rows(sessions, job.id)
    first_half = [r for r in rows if r["time_s"] < 2.5]
    last_part = [r for r in rows if r["time_s"] > 4.5]
    assert first_half and all(r["face"] is None for r in first_half)  # the cartoon: gaps, not missing rows
    assert last_part and all(r["face"] == 0 for r in last_part)
    assert len({r["frame"] for r in rows}) == len(rows)  # one face at most per frame here


def test_time_range(sessions, analyzer):
    job = analyze_video(clip("pyfeat_WolfgangLanger_Pexels.mp4"), Settings(sample_fps=2, start_s=5, end_s=8),
                        sessions, analyzer)  # fmt: skip
    times = [r["time_s"] for r in _rows(sessions, job.id)]
    assert times[0] >= 5 and times[-1] < 8 and len(times) == 6


def test_two_faces_side_by_side(tmp_path, sessions, analyzer):
    two = tmp_path / "two.mp4"
    ffmpeg("-i", str(clip("pyfeat_single_face.mp4")), "-i", str(clip("pyfeat_WolfgangLanger_Pexels.mp4")),
           "-filter_complex", "[0:v][1:v]hstack=inputs=2:shortest=1", "-c:v", "libx264", "-preset", "ultrafast",
           str(two))  # fmt: skip
    job = analyze_video(two, Settings(sample_fps=10), sessions, analyzer)
    assert job.status == Status.DONE and job.width == 1280
    rows = _rows(sessions, job.id)
    frames = sorted({r["frame"] for r in rows})
    assert len(frames) >= 20
    for f in frames:
        faces = sorted((r for r in rows if r["frame"] == f), key=lambda r: r["x1"])
        assert [r["face"] is not None for r in faces] == [True, True], f"frame {f}"
        assert faces[0]["x2"] < 640 < faces[1]["x1"]  # one in each half, each its own row
        assert {r["face"] for r in faces} == {0, 1}


def test_rotated_phone_video(tmp_path, sessions, analyzer):
    # As a phone stores it: pixels turned sideways, plus metadata that turns them upright for display.
    sideways, rotated = tmp_path / "sideways.mp4", tmp_path / "rotated.mp4"
    ffmpeg("-i", str(clip("pyfeat_single_face.mp4")), "-vf", "transpose=1", "-c:v", "libx264", "-preset", "ultrafast",
           str(sideways))  # fmt: skip
    ffmpeg("-display_rotation", "90", "-i", str(sideways), "-c", "copy", str(rotated))
    job = analyze_video(rotated, Settings(sample_fps=5), sessions, analyzer)
    assert job.status == Status.DONE
    assert (job.width, job.height) == (640, 360)  # the frames as displayed, upright
    assert row_counts(sessions, job.id) == (12, 12)


def test_4k_frames(tmp_path, sessions, analyzer):
    big = tmp_path / "4k.mp4"
    ffmpeg("-i", str(clip("pyfeat_single_face.mp4")), "-t", "1", "-vf", "scale=3840:2160", "-c:v", "libx264",
           "-preset", "ultrafast", str(big))  # fmt: skip
    job = analyze_video(big, Settings(sample_fps=5), sessions, analyzer)
    assert job.status == Status.DONE and job.width == 3840
    rows = _rows(sessions, job.id)
    assert len(rows) == 5 and all(r["face"] == 0 for r in rows)
    assert all(r["x2"] - r["x1"] > 600 for r in rows)  # a ~150 px face in 640x360 is ~900 px in 4K


def test_frame_count_that_lies(tmp_path, sessions, analyzer):
    # Matroska written to a pipe has no duration or index: OpenCV cannot know the frame count in advance.
    mkv = tmp_path / "piped.mkv"
    import imageio_ffmpeg

    with open(mkv, "wb") as f:
        subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-i",
                        str(clip("pyfeat_single_face.mp4")), "-c", "copy", "-f", "matroska", "pipe:1"],
                       stdout=f, check=True)  # fmt: skip
    job = analyze_video(mkv, Settings(sample_fps=0), sessions, analyzer)
    assert job.status == Status.DONE
    assert row_counts(sessions, job.id) == (72, 72)


def _fails(path, sessions, analyzer, *needles: str) -> Job:
    job = analyze_video(path, Settings(), sessions, analyzer)
    assert job.status == Status.FAILED
    assert job.error and "\n" not in job.error and all(n in job.error for n in needles), job.error
    assert row_counts(sessions, job.id)[0] == 0
    return job


def test_missing_file(tmp_path, sessions, analyzer):
    from fervid.errors import FervidError

    with pytest.raises(FervidError, match="file not found"):
        analyze_video(tmp_path / "nope.mp4", Settings(), sessions, analyzer)
    proc = run_cli("analyze", str(tmp_path / "nope.mp4"), "--db", f"sqlite:///{tmp_path / 'x.db'}")
    assert proc.returncode != 0 and "nope.mp4" in proc.stderr + proc.stdout and "Traceback" not in proc.stderr


def test_random_bytes(tmp_path, sessions, analyzer):
    bad = tmp_path / "random.mp4"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 200_000, dtype=np.uint8).tobytes())
    _fails(bad, sessions, analyzer, "random.mp4", "not a video")


def test_text_file_named_mp4(tmp_path, sessions, analyzer):
    bad = tmp_path / "notes.mp4"
    bad.write_text("this is not a video\n" * 100)
    _fails(bad, sessions, analyzer, "notes.mp4", "not a video")


def test_no_video_stream(tmp_path, sessions, analyzer):
    silent = tmp_path / "audio_only.mp4"
    ffmpeg("-f", "lavfi", "-i", "anullsrc=r=8000:cl=mono", "-t", "1", str(silent))
    _fails(silent, sessions, analyzer, "audio_only.mp4")


def test_truncated_clip(tmp_path, sessions, analyzer):
    data = clip("pyfeat_WolfgangLanger_Pexels.mp4").read_bytes()
    cut = tmp_path / "truncated.mp4"
    cut.write_bytes(data[: len(data) // 3])  # the index (moov) is at the front: a third of the frames decode
    job = analyze_video(cut, Settings(), sessions, analyzer)
    assert job.status == Status.FAILED, "a truncated file must not look complete"
    assert "truncated.mp4" in job.error and "truncated or corrupt" in job.error and "of 19.7 s" in job.error
    # A segment's rows are written with the segment, in one transaction: a failed segment leaves none behind.
    assert row_counts(sessions, job.id)[0] == 0 and job.frames_analyzed == 0


def test_truncated_before_the_first_frame(tmp_path, sessions, analyzer):
    cut = tmp_path / "stub.mp4"
    cut.write_bytes(clip("pyfeat_WolfgangLanger_Pexels.mp4").read_bytes()[:3000])
    _fails(cut, sessions, analyzer, "stub.mp4")


def test_cli_reports_bad_video_and_goes_on(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_text("not a video")
    proc = run_cli("analyze", str(bad), str(clip("pyfeat_single_face.mp4")), "--fps", "2",
                   "--db", f"sqlite:///{tmp_path / 'x.db'}")  # fmt: skip
    assert proc.returncode == 1
    assert "bad.mp4: FAILED" in proc.stdout and "pyfeat_single_face.mp4: job" in proc.stdout


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_schema_from_migrations(backend, tmp_path, pg_url):
    url = f"sqlite:///{tmp_path / 's.db'}" if backend == "sqlite" else pg_url
    engine = make_engine(url)
    migrate(engine)
    migrate(engine)  # idempotent
    insp = inspect(engine)
    assert {"jobs", "frames", "faces", "alembic_version"} <= set(insp.get_table_names())
    assert [c["name"] for c in insp.get_columns("faces")][:4] == ["job_id", "frame_index", "face", "time_ms"]
    assert "ix_faces_job_time" in {i["name"] for i in insp.get_indexes("faces")}
    assert insp.get_pk_constraint("frames")["constrained_columns"] == ["job_id", "frame_index"]


def test_pipeline_on_postgresql(pg_url, analyzer):
    sessions = open_database(pg_url)
    job = analyze_video(clip("pyfeat_single_face.mp4"), Settings(sample_fps=5), sessions, analyzer)
    assert job.status == Status.DONE and row_counts(sessions, job.id)[1] == 12
    again = analyze_video(clip("pyfeat_single_face.mp4"), Settings(sample_fps=5), sessions, analyzer)
    assert again.id == job.id and row_counts(sessions, job.id)[1] == 12


def test_she_smiles_at_the_end(tmp_path):
    """The product's promise on a real clip: a face in every sampled frame, and Happy in the final seconds."""
    db = f"sqlite:///{tmp_path / 'w.db'}"
    proc = run_cli("analyze", str(clip("pyfeat_WolfgangLanger_Pexels.mp4")), "--db", db, "--csv",
                   str(tmp_path / "w.csv"), check=True)  # fmt: skip
    with open(tmp_path / "w.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 99 and all(r["face"] == "0" for r in rows)
    last = [r["emotion"] for r in rows if float(r["time_s"]) >= 16.0]
    assert max(set(last), key=last.count) == "happy", last
    summary = json.loads(run_cli("summary", "1", "--format", "json", "--db", db, check=True).stdout)
    assert summary["tracks"]["0"]["windows"][-1]["dominant"] == "happy"
    assert "happy" in proc.stdout
