"""Which files FFmpeg may read: real video containers only, the very file that was checked, under the media roots
when a queued job reads it; and videos whose size or claims would hurt the worker or the database."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys

import cv2
import pytest

from fervid.errors import FervidError
from fervid.worker.pipeline import media as media_mod
from fervid.worker.pipeline import video as video_mod
from fervid.worker.pipeline.media import check_media_path, is_video_container, open_media
from fervid.worker.pipeline.video import MAX_FRAME_PIXELS, FrameBatches, iter_frames, probe
from tests.conftest import ROOT, ffmpeg, shared_path


@pytest.fixture(scope="module")
def outside(tmp_path_factory):
    """Videos outside any media root: what a planted playlist would make FFmpeg read."""
    d = tmp_path_factory.mktemp("outside")
    shutil.copy(shared_path("videos", "pyfeat_single_face.mp4"), d / "v.mp4")  # 72 frames, 640x360
    ffmpeg("-i", str(d / "v.mp4"), "-t", "1", "-c", "copy", "-f", "mpegts", str(d / "seg.ts"))
    return d


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "media"
    r.mkdir()
    return r


def hls(segment: str) -> str:
    return f"#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:2\n#EXTINF:1.0,\n{segment}\n#EXT-X-ENDLIST\n"


def playlists(root, outside) -> list:
    """Files inside the root that lead FFmpeg outside it; each opens as a video in plain OpenCV (see below)."""
    (root / "seg.mp4").symlink_to(outside / "v.mp4")  # a link FFmpeg follows, named by a "safe" ffconcat entry
    files = {
        "absolute.m3u8": hls(str(outside / "seg.ts")),
        "relative.m3u8": hls(os.path.relpath(outside / "seg.ts", root)),
        "list.ffconcat": "ffconcat version 1.0\nfile seg.mp4\n",
    }
    for name, text in files.items():
        (root / name).write_text(text)
    return [root / name for name in files]


PLAIN_OPENCV = """
import json, sys, cv2
print(json.dumps([cv2.VideoCapture(p, cv2.CAP_FFMPEG).isOpened() for p in sys.argv[1:]]))
"""


def test_playlists_in_a_root_read_files_outside_it_in_plain_opencv(root, outside):
    """The finding: without the whitelist, FFmpeg follows each of these out of the root."""
    files = playlists(root, outside)
    env = {k: v for k, v in os.environ.items() if k != "OPENCV_FFMPEG_CAPTURE_OPTIONS"}
    proc = subprocess.run([sys.executable, "-c", PLAIN_OPENCV, *map(str, files)], env=env, capture_output=True,
                          text=True, check=True)  # fmt: skip
    assert json.loads(proc.stdout) == [True] * len(files)
    for f in files:
        assert check_media_path(f, [root]) == f  # the name check alone lets them through


def test_playlists_are_refused(root, outside):
    for f in playlists(root, outside):
        with pytest.raises(FervidError, match="not a video container") as e:
            probe(f)  # fervid analyze: no roots, still refused
        assert str(e.value).startswith(f"{f}: ") and "\n" not in str(e.value)
        with pytest.raises(FervidError, match="not a video container"):
            list(iter_frames(f, 5))
        with pytest.raises(FervidError, match="not a video container"):
            probe(f, roots=[root])


def test_ffmpeg_refuses_playlists_even_past_the_magic_check(root, outside, monkeypatch):
    """The second line of defence: OpenCV really hands the whitelists to FFmpeg."""
    assert os.environ["OPENCV_FFMPEG_CAPTURE_OPTIONS"] == media_mod.FFMPEG_CAPTURE_OPTIONS
    monkeypatch.setattr(media_mod, "is_video_container", lambda head: True)
    for f in playlists(root, outside):
        with pytest.raises(FervidError, match="not a video file, or its format or codec is not supported"):
            probe(f)
        assert not cv2.VideoCapture(str(f), cv2.CAP_FFMPEG).isOpened()
    assert probe(outside / "seg.ts").frame_count > 0  # a real MPEG-TS still opens


def test_file_protocol_only():
    opts = dict(kv.split(";") for kv in media_mod.FFMPEG_CAPTURE_OPTIONS.split("|"))
    assert opts["protocol_whitelist"] == "file"
    assert not {"hls", "concat", "image2", "mpegtsraw", "mpegvideo"} & set(opts["format_whitelist"].split(","))


@pytest.fixture(scope="module")
def containers(tmp_path_factory):
    """Ten frames of 64x48 in every accepted container."""
    d = tmp_path_factory.mktemp("containers")
    codecs = {"mp4": ["-c:v", "mpeg4"], "mov": ["-c:v", "mpeg4"], "3gp": ["-c:v", "mpeg4"],
              "mkv": ["-c:v", "mpeg4"], "webm": ["-c:v", "libvpx"], "avi": ["-c:v", "mpeg4"],
              "ts": ["-c:v", "mpeg2video"], "m2ts": ["-c:v", "mpeg2video", "-f", "mpegts", "-mpegts_m2ts_mode", "1"],
              "mpg": ["-c:v", "mpeg2video", "-f", "vob"], "flv": ["-c:v", "flv"], "wmv": ["-c:v", "wmv2"],
              "ogv": ["-c:v", "libtheora"]}  # fmt: skip
    for ext, args in codecs.items():
        ffmpeg("-f", "lavfi", "-i", "testsrc=s=64x48:r=10:d=1", *args, str(d / f"clip.{ext}"))
    return d


def test_every_accepted_container_still_opens(containers):
    for f in sorted(containers.iterdir()):
        info = probe(f)
        assert (info.width, info.height, info.frame_count) == (64, 48, 10), f
        assert [i for i, _, _ in iter_frames(f, 0)] == list(range(10)), f


def test_magic_bytes():
    assert not is_video_container(b"")
    assert not is_video_container(b"#EXTM3U\n" * 100)
    assert not is_video_container(b"ffconcat version 1.0\nfile a.mp4\n" * 10)
    assert not is_video_container(b"RIFF\x00\x00\x00\x00WAVEfmt " + bytes(500))  # audio, not AVI
    assert not is_video_container(b"\x47" + bytes(500))  # one TS sync byte is not a stream
    assert is_video_container(b"\x00\x00\x00\x20ftypisom")
    assert is_video_container(b"RIFF\x00\x00\x00\x00AVI LIST")


def test_random_bytes_and_text_named_mp4_are_refused(tmp_path):
    text, noise = tmp_path / "notes.mp4", tmp_path / "random.mp4"
    text.write_text("this is not a video\n" * 100)
    noise.write_bytes(random.Random(0).randbytes(200_000))
    assert not is_video_container(noise.read_bytes()[:512])
    for f in (text, noise):
        with pytest.raises(FervidError, match=rf"^{f}: not a video container"):
            probe(f)


def test_missing_and_non_files(tmp_path):
    with pytest.raises(FervidError, match="nope.mp4: file not found"):
        probe(tmp_path / "nope.mp4")
    with pytest.raises(FervidError, match="not a file \\(a directory\\)"):
        probe(tmp_path)
    os.mkfifo(tmp_path / "pipe.mp4")
    with pytest.raises(FervidError, match="pipe.mp4: not a file \\(a named pipe\\)"):
        probe(tmp_path / "pipe.mp4")  # refused, not a worker blocked forever on open()


def test_check_media_path_refuses_non_regular_files(root):
    os.mkfifo(root / "pipe.mp4")
    (root / "folder.mp4").mkdir()
    for name, kind in [("pipe.mp4", "a named pipe"), ("folder.mp4", "a directory")]:
        with pytest.raises(FervidError, match=f"{name}: not a file \\({kind}\\); refusing to read it"):
            check_media_path(root / name, [root])
    if os.path.exists("/dev/zero"):
        with pytest.raises(FervidError, match="a device"):
            check_media_path("/dev/zero", [os.path.realpath("/dev")])
    assert check_media_path(root / "later.mp4", [root]) == root / "later.mp4"  # missing: callers say so
    with pytest.raises(FervidError, match="outside the media roots"):
        check_media_path(root / ".." / "pipe.mp4", [root])


def test_links_out_of_the_root_are_refused_by_the_open_file(root, outside, monkeypatch):
    shutil.copy(outside / "v.mp4", root / "in.mp4")
    (root / "alias.mp4").symlink_to(root / "in.mp4")
    (root / "sub").symlink_to(outside)
    (root / "out.mp4").symlink_to(outside / "v.mp4")
    assert probe(root / "alias.mp4", [root]).frame_count == 72  # a link within the root is fine
    # The open file's real path is what counts, even when the name check before it is fooled.
    monkeypatch.setattr(media_mod, "check_media_path", lambda path, roots=None: path)
    for f in (root / "out.mp4", root / "sub" / "v.mp4", root / ".." / ".." / outside.name / "v.mp4"):
        with pytest.raises(FervidError, match="outside the media roots"):
            probe(f, [root])
        with FrameBatches(f, 5, roots=[root]) as batches, pytest.raises(FervidError, match="outside the media"):
            list(batches)
    assert probe(root / "out.mp4").frame_count == 72  # no roots (fervid analyze): any path


def test_ffmpeg_reads_the_file_that_was_checked(root, outside):
    """A swap of the name after the check changes nothing: FFmpeg opens the checked inode via /proc/self/fd."""
    shutil.copy(shared_path("videos", "pyfeat_WolfgangLanger_Pexels.mp4"), root / "v.mp4")  # 472 frames
    with open_media(root / "v.mp4", [root]) as m:
        (root / "swap.mp4").symlink_to(outside / "v.mp4")  # 72 frames, outside
        os.replace(root / "swap.mp4", root / "v.mp4")
        assert m.ffmpeg_path == f"/proc/self/fd/{m.fd}"
        cap = video_mod._capture(m)
        try:
            assert cap.get(cv2.CAP_PROP_FRAME_COUNT) == 472
            assert video_mod._seek(cap, 10.0) is not None  # seeking works through the fd path
            assert abs(cap.get(cv2.CAP_PROP_POS_MSEC) - 8000) < 100
        finally:
            cap.release()
    assert m.fd == -1
    with pytest.raises(FervidError, match="outside the media roots"):
        probe(root / "v.mp4", [root])


def test_frames_are_read_and_the_file_closed():
    path = shared_path("videos", "pyfeat_single_face.mp4")
    fds = len(os.listdir("/proc/self/fd"))
    assert len(list(iter_frames(path, 5, start_s=1.0))) == 7
    with FrameBatches(path, 5) as batches:
        assert sum(len(b.indices) for b in batches) == 12
    assert len(os.listdir("/proc/self/fd")) == fds


@pytest.fixture(scope="module")
def huge(tmp_path_factory):
    """One 16K (15360x8640) frame, MJPEG in Matroska: small on disk, 400 MB once decoded to BGR."""
    path = tmp_path_factory.mktemp("huge") / "huge.mkv"
    ffmpeg("-f", "lavfi", "-i", "color=c=gray:s=15360x8640:r=1", "-frames:v", "1", "-c:v", "mjpeg", "-q:v", "31",
           str(path))  # fmt: skip
    return path


REFUSE_HUGE = """
import json, sys
from fervid.worker.pipeline.video import iter_frames, probe
errors = []
for call in (lambda: probe(sys.argv[1]), lambda: list(iter_frames(sys.argv[1], 5))):
    try:
        call()
        errors.append(None)
    except Exception as e:
        errors.append(str(e))
# VmHWM: the peak of this program alone (getrusage's maxrss also counts the parent's memory at fork time).
peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"errors": errors, "max_rss_mb": peak_kb / 1024}))
"""


def test_frames_larger_than_8k_are_refused_before_decoding(huge):
    proc = subprocess.run([sys.executable, "-c", REFUSE_HUGE, str(huge)], cwd=ROOT, capture_output=True, text=True,
                          check=True)  # fmt: skip
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = f"{huge}: 15360x8640 frames are larger than the 33-megapixel limit (8K UHD)"
    assert out["errors"] == [expected, expected]
    assert out["max_rss_mb"] < 300, out  # one decoded frame alone would be ~600 MB (YUV + BGR)


def test_frame_size_limit_is_8k_uhd(tmp_path):
    assert MAX_FRAME_PIXELS == 7680 * 4320
    video_mod._check_size(tmp_path, 7680, 4320)
    video_mod._check_size(tmp_path, 4320, 7680)  # portrait
    with pytest.raises(FervidError, match="7681x4320 frames are larger"):
        video_mod._check_size(tmp_path, 7681, 4320)


@pytest.mark.parametrize(
    "count, fps, expected",
    [
        (1e12, 30.0, (0, 0.0)),  # would overflow a 32-bit column
        (2.0**31, 30.0, (0, 0.0)),
        (float("nan"), 30.0, (0, 0.0)),
        (float("inf"), 30.0, (0, 0.0)),
        (-5.0, 30.0, (0, 0.0)),
        (2e9, 30.0, (0, 0.0)),  # fits, but 771 days of video: a corrupt header
        (72.0, 1e-6, (0, 0.0)),  # a near-zero frame rate makes the same absurd duration
        (72.0, float("nan"), (72, 0.0)),  # unknown rate: frames known, duration unknown
        (72.0, 30.0, (72, 2.4)),
    ],
)
def test_absurd_container_claims_are_unknown(count, fps, expected, monkeypatch):
    real_capture = cv2.VideoCapture

    class Lying:  # a wrapper: subclasses of OpenCV's types crash when collected
        def __init__(self, *args: object) -> None:
            self._cap = real_capture(*args)

        def get(self, prop: int) -> float:
            if prop == cv2.CAP_PROP_FRAME_COUNT:
                return count
            if prop == cv2.CAP_PROP_FPS:
                return fps
            return self._cap.get(prop)

        def __getattr__(self, name: str) -> object:
            return getattr(self._cap, name)

    monkeypatch.setattr(video_mod.cv2, "VideoCapture", Lying)
    info = probe(shared_path("videos", "pyfeat_single_face.mp4"))
    assert (info.frame_count, info.duration_s) == pytest.approx(expected)
    assert 0 <= info.frame_count <= 2**31 - 1 and isinstance(info.frame_count, int)
    assert (info.width, info.height) == (640, 360)
