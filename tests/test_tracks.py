"""Track linking on synthetic paths: crossings, missed detections, people leaving and coming back."""

import numpy as np

from fervid.worker.pipeline.tracks import Tracker


def face(cx: float, cy: float, size: float = 80.0) -> tuple[np.ndarray, np.ndarray]:
    box = np.array([cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2])
    lms = np.array([[cx - 18, cy - 10], [cx + 18, cy - 10], [cx, cy + 5], [cx - 14, cy + 22], [cx + 14, cy + 22]])
    return box, lms


def frame(*faces):
    boxes, lms = zip(*faces, strict=True) if faces else ((), ())
    return np.array(boxes).reshape(-1, 4), np.array(lms).reshape(-1, 5, 2)


def test_two_people_crossing_keep_their_ids():
    tr = Tracker()
    seen = {}
    for i in range(40):  # A walks right, B walks left; they pass each other at i = 20 (boxes overlap fully)
        t = i * 200.0
        a, b = face(100 + 10 * i, 200), face(500 - 10 * i, 210)
        order = [a, b] if i % 2 else [b, a]  # detection order varies, as it does by score
        ids = tr.update(t, *frame(*order))
        ida, idb = (ids[0], ids[1]) if i % 2 else (ids[1], ids[0])
        seen.setdefault("a", set()).add(ida)
        seen.setdefault("b", set()).add(idb)
    assert len(seen["a"]) == 1 and len(seen["b"]) == 1 and seen["a"] != seen["b"]


def test_missed_detections_keep_the_track():
    tr = Tracker(max_gap_s=1.0)
    ids = []
    for i in range(30):
        if i in (10, 11, 12):  # the detector misses 3 frames (0.6 s)
            assert tr.update(i * 200.0, *frame()) == []
            continue
        ids += tr.update(i * 200.0, *frame(face(200 + 3 * i, 200)))
    assert set(ids) == {0}


def test_a_long_absence_starts_a_new_track():
    tr = Tracker(max_gap_s=1.0)
    first = tr.update(0.0, *frame(face(200, 200)))
    later = tr.update(2500.0, *frame(face(200, 200)))
    assert first == [0] and later == [1]


def test_far_jump_is_another_person():
    tr = Tracker()
    tr.update(0.0, *frame(face(100, 100)))
    assert tr.update(200.0, *frame(face(600, 300))) == [1]


def test_tracks_stored_a_page_at_a_time_match_one_pass(tmp_path):
    """assign_tracks reads a job's faces in pages; a frame cut by a page boundary must be linked as a whole."""
    from sqlalchemy import select

    from fervid.worker.store.db import open_database
    from fervid.worker.store.rows import assign_tracks
    from fervid.worker.store.schema import EMOTIONS, Face, Job

    sessions = open_database(f"sqlite:///{tmp_path / 't.db'}")
    with sessions.begin() as s:
        job = Job(job_key="k", path="x", size_bytes=1, sha256="0" * 64, sample_fps=5, model="m", model_sha256="-",
                  detector="-")  # fmt: skip
        s.add(job)
        s.flush()
        for i in range(30):  # three people walking, listed in a different order each frame
            people = [face(100 + 5 * i, 200), face(400, 100 + 4 * i), face(700 - 6 * i, 400)]
            for k, p in enumerate(people[i % 3 :] + people[: i % 3]):
                box, lms = p
                s.add(Face(job_id=job.id, frame_index=i, face=k, time_ms=i * 200.0, x1=box[0], y1=box[1], x2=box[2],
                           y2=box[3], det_score=0.99, landmarks=lms.tolist(), emotion="happy",
                           **{e: float(e == "happy") for e in EMOTIONS}))  # fmt: skip
        job_id = job.id

    def tracks(chunk: int) -> list:
        with sessions.begin() as s:
            n = assign_tracks(s, job_id, chunk=chunk)
        with sessions() as s:
            q = select(Face.frame_index, Face.face, Face.track).order_by(Face.frame_index, Face.face)
            return n, s.execute(q).all()

    whole = tracks(10_000)
    assert whole[0] == 3
    for chunk in (4, 5, 7):  # pages end inside frames
        assert tracks(chunk) == whole
