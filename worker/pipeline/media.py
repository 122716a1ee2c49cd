"""Which files may be read as videos: regular files in a real video container, and for a queued job only those
under the configured media roots.

Paths are resolved to real paths first, so `..` and symbolic links cannot lead out of a root. A name check
alone cannot stop a swap between the check and FFmpeg's open, nor a playlist (HLS, ffconcat) inside a root that
makes FFmpeg open other files, so `open_media()` opens the file once, checks the open file itself (its kind, its
real path, its first bytes) and hands FFmpeg `/proc/self/fd/N`: FFmpeg reads the very inode that was checked.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from fervid.errors import FervidError, Forbidden

# FFmpeg demuxers for the containers that `is_video_container()` accepts, and nothing else: no HLS, ffconcat,
# image sequences or other demuxers that open further files or URLs. The mov demuxer's external data
# references (`enable_drefs`) stay off by default. Names as FFmpeg spells them (`ffmpeg -demuxers`).
FFMPEG_DEMUXERS = ("mov", "mp4", "m4a", "3gp", "3g2", "mj2", "matroska", "webm", "avi", "mpegts", "mpeg", "flv",
                   "asf", "ogg")  # fmt: skip
# For OpenCV's OPENCV_FFMPEG_CAPTURE_OPTIONS (`key;value` pairs separated by `|`): local files only.
FFMPEG_CAPTURE_OPTIONS = f"protocol_whitelist;file|format_whitelist;{','.join(FFMPEG_DEMUXERS)}"

# The first bytes read to recognise the container; MPEG-TS needs its second sync byte at 188 (192 for M2TS).
_HEAD_BYTES = 512
_ISO_BMFF_BOXES = {b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot"}  # MP4, MOV, 3GP at offset 4
_ASF_GUID = bytes.fromhex("3026b2758e66cf11a6d900aa0062ce6c")


def is_video_container(head: bytes) -> bool:
    """True when `head` (a file's first bytes) starts a container that `FFMPEG_DEMUXERS` reads.

    Recognised by magic bytes, not by FFmpeg's probe: FFmpeg also recognises playlists and scripts, and a
    file that is none of these containers is refused before any demuxer sees it.
    """
    return (
        head[4:8] in _ISO_BMFF_BOXES
        or head.startswith(b"\x1a\x45\xdf\xa3")  # Matroska, WebM (EBML)
        or (head.startswith(b"RIFF") and head[8:12] == b"AVI ")
        or (len(head) > 188 and head[0] == 0x47 and head[188] == 0x47)  # MPEG-TS
        or (len(head) > 196 and head[4] == 0x47 and head[196] == 0x47)  # M2TS (AVCHD): 4-byte timestamp first
        or head.startswith(b"\x00\x00\x01\xba")  # MPEG-PS pack header
        or head.startswith(b"FLV\x01")
        or head.startswith(_ASF_GUID)  # ASF, WMV
        or head.startswith(b"OggS")
    )


def media_roots() -> list[Path]:
    raw = os.environ.get("FERVID_MEDIA_ROOTS", "")
    roots = [Path(p).expanduser().resolve() for p in raw.split(os.pathsep) if p.strip()]
    if not roots:
        raise FervidError(
            "FERVID_MEDIA_ROOTS is not set: set it to the folders (separated by ':') that jobs may read videos from"
        )
    return roots


def _under(real: Path, roots: list[Path]) -> bool:
    # Roots given by a caller may be relative or contain links (/tmp on some systems): compare real paths.
    resolved = [Path(r).expanduser().resolve() for r in roots]
    return any(real == r or real.is_relative_to(r) for r in resolved)


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a special file"


def _outside(path: str | Path) -> FervidError:
    return Forbidden(f"{path}: outside the media roots (FERVID_MEDIA_ROOTS); refusing to read it")


def check_media_path(path: str | Path, roots: list[Path] | None = None) -> Path:
    """The real path of `path` if it lies under a media root and is a regular file or missing; FervidError
    otherwise. A missing file passes, so that callers can say how it went missing."""
    roots = roots if roots is not None else media_roots()
    real = Path(path).expanduser().resolve()
    if not _under(real, roots):
        raise _outside(path)  # checked first: nothing about files outside the roots is revealed
    try:
        mode = real.stat().st_mode
    except OSError:
        return real
    if not stat.S_ISREG(mode):
        # A FIFO would block the worker forever, a device would be read without end.
        raise FervidError(f"{path}: not a file ({_kind(mode)}); refusing to read it")
    return real


def _fd_real_path(fd: int) -> Path | None:
    """Where the open file really is (the kernel's answer, after every link), or None where it cannot say."""
    try:
        return Path(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        pass
    try:
        import fcntl

        return Path(fcntl.fcntl(fd, fcntl.F_GETPATH, bytes(1024)).rstrip(b"\0").decode())  # macOS
    except (ImportError, AttributeError, OSError, UnicodeDecodeError):
        return None


@dataclass
class MediaFile:
    """A checked video file, open: FFmpeg must read `ffmpeg_path` (this very inode) while it stays open."""

    path: Path  # as given, for messages
    real: Path
    fd: int
    ffmpeg_path: str = field(init=False)

    def __post_init__(self) -> None:
        # Opening /proc/self/fd/N opens the inode behind fd N, whatever its name now points to. (/dev/fd/N
        # elsewhere duplicates the descriptor; its shared offset is harmless: this side only uses pread.)
        proc = f"/proc/self/fd/{self.fd}"
        self.ffmpeg_path = proc if os.path.exists(proc) else f"/dev/fd/{self.fd}"

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> MediaFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_media(path: str | Path, roots: list[Path] | None = None) -> MediaFile:
    """Open a video file for FFmpeg: a regular file, in a container of `FFMPEG_DEMUXERS`, and when `roots` is
    given (queued jobs) really under one of them. `roots=None` (in-process `fervid analyze`: the user's own
    files) skips only the root check. Close the result (or use it as a context manager) after decoding."""
    path = Path(path)
    if roots is not None:
        check_media_path(path, roots)  # the readable message for the usual case; the check below is the real one
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise FervidError(f"{path}: file not found") from None
    except OSError as e:
        raise FervidError(f"{path}: cannot read it ({e.strerror})") from None
    if not stat.S_ISREG(mode):  # before open(): opening a device can have effects of its own
        raise FervidError(f"{path}: not a file ({_kind(mode)})")
    # Links are followed (a link to a video is fine) because the open file's real path is checked afterwards,
    # which also covers links in the parent folders that O_NOFOLLOW would not. O_NONBLOCK: a FIFO swapped in
    # after the stat above must not block the open.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise FervidError(f"{path}: file not found") from None
    except OSError as e:
        raise FervidError(f"{path}: cannot read it ({e.strerror})") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise FervidError(f"{path}: not a file ({_kind(mode)})")
        real = _fd_real_path(fd)
        if roots is not None and (real is None or not _under(real, roots)):
            raise _outside(path)
        if not is_video_container(os.pread(fd, _HEAD_BYTES, 0)):
            raise FervidError(
                f"{path}: not a video container (a playlist or other file that could make FFmpeg open other "
                "files); refusing it"
            )
        return MediaFile(path, real or path, fd)
    except BaseException:
        os.close(fd)
        raise
