"""Reading videos: properties, and sampled frames decoded in a background thread, in batches.

Frames are sampled on a fixed time grid (k / fps seconds) using the video's own timestamps, so variable frame
rates are handled and any time range (a segment of a long video) samples exactly the frames that the whole
video would. Frames between samples are only `grab()`bed, not converted.

FFmpeg only ever sees files that `worker.pipeline.media.open_media()` checked and holds open, through `/proc/self/fd/N`,
and only with the file protocol and the demuxers of real video containers (OPENCV_FFMPEG_CAPTURE_OPTIONS below).
"""

from __future__ import annotations

import math
import os
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from fervid.errors import FervidError
from fervid.worker.pipeline.media import FFMPEG_CAPTURE_OPTIONS, MediaFile, open_media
from fervid.worker.settings import Options, Settings

# OpenCV reads this variable at every FFmpeg open and passes it to avformat_open_input: the file protocol only,
# and only container demuxers, so that no playlist or script makes FFmpeg open other files or URLs. Set here,
# before any VideoCapture, and it replaces any value from the environment (a wider one would undo it).
_CAPTURE_OPTIONS_ENV = "OPENCV_FFMPEG_CAPTURE_OPTIONS"
os.environ[_CAPTURE_OPTIONS_ENV] = FFMPEG_CAPTURE_OPTIONS
# OpenCV's FFmpeg backend gives up on a stalled open or read instead of hanging the job.
_OPEN_PARAMS = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, 20_000, cv2.CAP_PROP_READ_TIMEOUT_MSEC, 20_000]
# Frames per batch are capped by pixels so that a 4K batch stays within a few hundred MB.
MAX_BATCH_PIXELS = 48_000_000
# 8K UHD (7680x4320). A larger frame takes over 100 MB per BGR copy and several per batch stage: such videos
# are refused from the container's width and height, before a frame is decoded.
MAX_FRAME_PIXELS = 7680 * 4320
# Claims beyond these are corrupt headers, not videos, and would overflow 32-bit database columns: unknown.
_MAX_FRAME_COUNT = 2**31 - 1
_MAX_DURATION_S = 1e7


@dataclass
class VideoInfo:
    path: Path
    width: int
    height: int
    fps: float
    frame_count: int  # the container's claim; some containers lie, so decoding never trusts it
    duration_s: float
    codec: str


@dataclass
class FrameBatch:
    indices: list[int]  # frame numbers in decode order
    times_ms: list[float]  # the frames' own presentation timestamps
    frames: np.ndarray  # uint8 [B, H, W, 3], BGR as decoded
    gray: np.ndarray  # uint8 [B, H, W], for the face crops (OpenCV's SIMD conversion, here in the decode thread)


def _check_size(path: Path, w: int, h: int) -> None:
    if w * h > MAX_FRAME_PIXELS:
        raise FervidError(
            f"{path}: {w}x{h} frames are larger than the {MAX_FRAME_PIXELS / 1e6:.0f}-megapixel limit (8K UHD)"
        )


def _capture(media: MediaFile) -> cv2.VideoCapture:
    """A capture on the checked, open file; refuses oversized frames before decoding any."""
    if os.environ.get(_CAPTURE_OPTIONS_ENV) != FFMPEG_CAPTURE_OPTIONS:  # changed since import: put it back
        os.environ[_CAPTURE_OPTIONS_ENV] = FFMPEG_CAPTURE_OPTIONS
    cap = cv2.VideoCapture(media.ffmpeg_path, cv2.CAP_FFMPEG, _OPEN_PARAMS)
    if not cap.isOpened():
        raise FervidError(f"{media.path}: not a video file, or its format or codec is not supported")
    try:
        _check_size(media.path, int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)))
    except BaseException:
        cap.release()
        raise
    return cap


def _claims(path: Path, count: float, fps: float) -> tuple[int, float, float]:
    """(frame count, fps, duration s) as the container claims them, 0 where unknown or absurd."""
    fps = fps if math.isfinite(fps) and fps > 0 else 0.0
    if not math.isfinite(count) or count <= 0 or count > _MAX_FRAME_COUNT:
        return 0, fps, 0.0
    duration = count / fps if fps else 0.0
    if duration > _MAX_DURATION_S:  # the count is no better than the duration derived from it
        return 0, fps, 0.0
    return int(count), fps, duration


def probe(path: str | Path, roots: list[Path] | None = None) -> VideoInfo:
    """The video's properties, from its container and its first frame. `roots`: see `media.open_media`."""
    path = Path(path)
    with open_media(path, roots) as media:
        cap = _capture(media)
        try:
            count, fps, duration = _claims(path, cap.get(cv2.CAP_PROP_FRAME_COUNT), cap.get(cv2.CAP_PROP_FPS))
            fourcc = (int(cap.get(cv2.CAP_PROP_FOURCC)) & 0xFFFFFFFF).to_bytes(4, "little")
            ok = cap.grab()
            if not ok:
                raise FervidError(f"{path}: video has no decodable frames")
            ok, first = cap.retrieve()
            if not ok or first is None:
                raise FervidError(f"{path}: video has no decodable frames")
            # Height and width after the rotation metadata is applied (phone videos), from a real frame.
            h, w = first.shape[:2]
            _check_size(path, w, h)  # a container that did not say its size
        finally:
            cap.release()
    return VideoInfo(
        path=path, width=w, height=h, fps=fps, frame_count=count, duration_s=duration,
        codec=fourcc.decode("ascii", "replace").strip("\x00 "),
    )  # fmt: skip


def _sampled(t_ms: float, prev_ms: float | None, sample_fps: float) -> bool:
    """True when a grid point k / sample_fps lies in (prev, t]: one frame per grid point, the first at or after it."""
    if sample_fps <= 0 or prev_ms is None:
        return True
    k_now = math.floor(t_ms * sample_fps / 1000 + 1e-6)
    k_prev = math.floor(prev_ms * sample_fps / 1000 + 1e-6)
    return k_now > k_prev


@dataclass
class DecodeState:
    """How far decoding got: the last frame grabbed (sampled or not) and whether the stream itself ended."""

    last_index: int = -1
    last_ms: float = -1.0
    reached_eof: bool = False


def _seek(cap: cv2.VideoCapture, start_s: float) -> int | None:
    """Jump to ~2 s before `start_s` (a previous frame keeps the sampling grid); returns the index of the next
    frame, or None when the container's timestamps don't map to frame numbers (variable frame rate), where only
    decoding from the start gives the true frame numbers."""
    fps = cap.get(cv2.CAP_PROP_FPS)
    if start_s < 5 or not fps or not math.isfinite(fps):
        return None
    cap.set(cv2.CAP_PROP_POS_MSEC, (start_s - 2) * 1000)
    index = int(cap.get(cv2.CAP_PROP_POS_FRAMES))
    if not cap.grab():
        return None
    t_ms = cap.get(cv2.CAP_PROP_POS_MSEC)
    if abs(t_ms - index * 1000 / fps) > 250 / fps:
        return None
    return index


def iter_frames(
    path: str | Path, sample_fps: float = Settings.sample_fps, start_s: float = 0.0, end_s: float | None = None,
    state: DecodeState | None = None, roots: list[Path] | None = None,
) -> Iterator[tuple[int, float, np.ndarray]]:  # fmt: skip
    """(frame index, timestamp ms, BGR frame) for each sampled frame with start <= t < end.

    Frame numbers count from the start of the stream, also when the range starts later (a segment): those seek
    where the container's timestamps allow it and decode from the start otherwise. `roots`: see
    `worker.pipeline.media.open_media`; the file stays open (and is the one decoded) until the iteration ends.
    """
    path = Path(path)
    state = state if state is not None else DecodeState()
    with open_media(path, roots) as media:
        cap = _capture(media)
        try:
            index, prev_ms, grabbed = -1, None, False
            if start_s > 0:
                seek_index = _seek(cap, start_s)
                if seek_index is not None:
                    index, grabbed = seek_index - 1, True
                else:
                    cap.release()
                    cap = _capture(media)  # the same open file again, from its start
            start_ms, end_ms = start_s * 1000, (end_s * 1000 if end_s is not None else math.inf)
            while True:
                if grabbed:
                    grabbed = False  # _seek already grabbed this frame
                elif not cap.grab():
                    state.reached_eof = True
                    break
                index += 1
                t_ms = cap.get(cv2.CAP_PROP_POS_MSEC)
                if t_ms >= end_ms:
                    break
                state.last_index, state.last_ms = index, t_ms
                take = t_ms >= start_ms and _sampled(t_ms, prev_ms, sample_fps)
                prev_ms = t_ms
                if not take:
                    continue
                ok, frame = cap.retrieve()
                if not ok or frame is None:
                    raise FervidError(f"{path}: frame {index} at {t_ms / 1000:.2f} s could not be decoded")
                _check_size(path, frame.shape[1], frame.shape[0])  # a stream that grows mid-way
                yield index, t_ms, frame
        finally:
            cap.release()


class FrameBatches:
    """Sampled frames in batches, decoded ahead in a background thread while the models run on the last batch.

    `roots`: see `worker.pipeline.media.open_media`; a refused file raises on iteration, like any decoding error.
    """

    _END = object()

    def __init__(
        self, path: str | Path, sample_fps: float, start_s: float = 0.0, end_s: float | None = None,
        batch_size: int = Options.batch_size, prefetch: int = 3, roots: list[Path] | None = None,
    ) -> None:  # fmt: skip
        self._args = (Path(path), sample_fps, start_s, end_s)
        self._roots = roots
        self._batch_size = batch_size
        self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self.decode_seconds = 0.0
        self.state = DecodeState()
        self._thread = threading.Thread(target=self._run, name="fervid-decode", daemon=True)
        self._thread.start()

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        import time

        try:
            idx: list[int] = []
            times: list[float] = []
            frames: list[np.ndarray] = []
            grays: list[np.ndarray] = []
            limit = self._batch_size
            t0 = time.perf_counter()
            for i, t_ms, frame in iter_frames(*self._args, state=self.state, roots=self._roots):
                if not frames:
                    limit = max(1, min(self._batch_size, MAX_BATCH_PIXELS // (frame.shape[0] * frame.shape[1])))
                if frames and frame.shape != frames[0].shape:  # a resolution change mid-stream
                    self.decode_seconds += time.perf_counter() - t0
                    if not self._put(FrameBatch(idx, times, np.stack(frames), np.stack(grays))):
                        return
                    idx, times, frames, grays, t0 = [], [], [], [], time.perf_counter()
                idx.append(i)
                times.append(t_ms)
                frames.append(frame)
                grays.append(cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY))
                if len(frames) == limit:
                    batch = FrameBatch(idx, times, np.stack(frames), np.stack(grays))
                    self.decode_seconds += time.perf_counter() - t0
                    if not self._put(batch):
                        return
                    idx, times, frames, grays, t0 = [], [], [], [], time.perf_counter()
            if frames:
                self.decode_seconds += time.perf_counter() - t0
                self._put(FrameBatch(idx, times, np.stack(frames), np.stack(grays)))
            self._put(self._END)
        except BaseException as e:  # handed to the consumer, which raises it
            self._put(e)

    def __iter__(self) -> Iterator[FrameBatch]:
        while True:
            item = self._queue.get()
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def __enter__(self) -> FrameBatches:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
