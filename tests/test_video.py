"""Frame sampling: the time grid, and time ranges (segments) that together give exactly the whole video's frames."""

import pytest

from fervid.worker.pipeline.video import iter_frames, probe
from fervid.worker.queue.jobs import segment_bounds
from tests.conftest import shared_path


@pytest.mark.parametrize("name", ["pyfeat_WolfgangLanger_Pexels.mp4", "liveportrait_d6.mp4", "pyfeat_noface_face.mov"])
@pytest.mark.parametrize("fps", [0, 5, 3.3])
def test_segments_partition_the_frames(name, fps):
    path = shared_path("videos", name)
    whole = [(i, t) for i, t, _ in iter_frames(path, fps)]
    parts = []
    for a, b in segment_bounds(0.0, None, probe(path).duration_s, 5.5):
        parts += [(i, t) for i, t, _ in iter_frames(path, fps, a, b)]
    assert parts == whole
    assert len({i for i, _ in whole}) == len(whole)


def test_sampling_grid_follows_video_time():
    path = shared_path("videos", "pyfeat_WolfgangLanger_Pexels.mp4")  # 23.976 fps, 19.7 s
    times = [t for _, t, _ in iter_frames(path, 5)]
    assert len(times) == 99
    # One frame per 200 ms grid point: the first frame at or after each point.
    for k, t in enumerate(times):
        assert k * 200 <= t < k * 200 + 1000 / 23.976 + 1e-6
    assert len(list(iter_frames(path, 0))) == 472


def test_segment_bounds():
    assert segment_bounds(0, None, 130, 60) == [(0, 60), (60, 120), (120, None)]
    assert segment_bounds(10, 70, 130, 60) == [(10, 70)]
    assert segment_bounds(0, 125, 130, 60) == [(0, 60), (60, 120), (120, 125)]
    assert segment_bounds(0, None, 0.0, 60) == [(0, None)]  # unknown duration: one segment to the end
